r"""Tables and plots from finished runs: `python -m experiments.report RUN_DIR... --out DIR`
(a RUN_DIR may be a quoted glob, "gs://b/sweeps/demo/*" too).

Each run dir is what `drivlm_jax.train` writes (config.json, eval.json, metrics.jsonl). Runs
are grouped by method (config.json "method", else the dir name) and, for sweep runs, by
their overrides other than the seed (sweep.json); the runs of one group are seeds. Writes
DIR/results.json ({"methods": {name: {"target"|"source": {metric: [one value per seed]}}},
"seeds": {name: [seed per value]}}), DIR/report.md (mean ± std [95% interval] over seeds,
and `paired_table`s: differences of matched seeds against a reference method),
DIR/results.csv, DIR/curves.png (training loss) and DIR/target_mAP.png (bars with std error
bars).

Intervals are Student-t 95% confidence intervals of the mean over seeds (n - 1 degrees of
freedom): they say how well a figure is known from these seeds, not how a single run on
another machine will land (the seeds' spread, ±, says that).
"""
import argparse
import collections
import csv
import glob
import io
import json

import numpy as np
from scipy import stats

from drivlm_jax import run as run_lib

TABLE_METRICS = ("action_mAP", "action_mF1", "reason_mAP", "reason_mF1", "ROUGE-L", "CIDEr")


def _method(run_dir: str) -> str:
  """The run's group: its method, plus a sweep run's non-seed overrides (sweep.json), so the
  seeds of one setting are averaged and settings are not."""
  path = run_lib.path(run_dir, "config.json")
  method = run_lib.read_json(path).get("method") if path.exists() else None
  method = method or run_lib.path(run_dir).name
  path = run_lib.path(run_dir, "sweep.json")
  if path.exists():
    overrides = run_lib.read_json(path)["overrides"]
    setting = ",".join(f"{k}={v}" for k, v in sorted(overrides.items()) if k != "seed")
    method += f" ({setting})" if setting else ""
  return method


def collect(run_dirs, split="test") -> dict:
  """{"methods": {method: {domain: {metric: [value per run]}}}, "runs": {method: [dirs]},
  "seeds": {method: [config seed per run]}}."""
  methods, runs, seeds = {}, collections.defaultdict(list), collections.defaultdict(list)
  for run_dir in run_dirs:
    path = run_lib.path(run_dir, "eval.json")
    if not path.exists():
      raise FileNotFoundError(f"{path} not found: has {run_dir} finished training?")
    result = run_lib.read_json(path)
    if split not in result:
      raise KeyError(f"{path} has no {split!r} split (has {sorted(result)})")
    method, seed = _method(run_dir), run_lib.read_config(run_dir).get("seed", 0)
    if seed in seeds[method]:   # not two seeds of one setting: its interval would lie
      other = runs[method][seeds[method].index(seed)]
      raise ValueError(f"{other} and {run_dir} are both {method!r} at seed {seed}: a group "
                       f"averages seeds of one setting; report them apart (or name their "
                       f"methods apart: config.method)")
    runs[method].append(run_dir)
    seeds[method].append(seed)
    for domain, values in result[split].items():
      for metric, value in values.items():
        methods.setdefault(method, {}).setdefault(domain, {}).setdefault(metric, []).append(
            value)
  return {"methods": methods, "runs": dict(runs), "seeds": dict(seeds)}


def interval(values, level=0.95) -> tuple:
  """(mean, sample std, low, high): the Student-t interval of the mean."""
  values = np.asarray(values, np.float64)
  mean, std = values.mean(), values.std(ddof=1)
  half = stats.t.ppf(0.5 + level / 2, len(values) - 1) * std / np.sqrt(len(values))
  return mean, std, mean - half, mean + half


def _cell(values) -> str:
  values = np.asarray(values, np.float64)
  if len(values) == 1:
    return f"{values[0]:.1f}"
  mean, std, low, high = interval(values)
  return f"{mean:.1f} ± {std:.1f} [{low:.1f}, {high:.1f}]"


def paired(results, a, b, metric="action_mAP", domain_a="target", domain_b="target"):
  """Per-seed differences a - b of `metric` over the seeds both methods ran (or None)."""
  values = lambda m, d: dict(zip(results["seeds"].get(m, []),
                                 results["methods"].get(m, {}).get(d, {}).get(metric, [])))
  va, vb = values(a, domain_a), values(b, domain_b)
  common = sorted(set(va) & set(vb))
  return np.array([va[s] - vb[s] for s in common]) if common else None


def paired_table(results, rows, metric="action_mAP") -> str:
  """Paired differences, one row per (label, a, b[, domain_a, domain_b]): mean ± std over
  matched seeds, its 95% interval, and whether the interval includes 0 (then the seeds do
  not show a difference)."""
  lines = [f"| difference ({metric}, points) | seeds | mean ± std | 95% interval | "
           f"interval includes 0 |", "|---|---|---|---|---|"]
  for label, *pair in rows:
    d = paired(results, *pair[:2], metric, *pair[2:])
    if d is None or len(d) < 2:
      continue
    mean, std, low, high = interval(d)
    lines.append(f"| {label} | {len(d)} | {mean:+.1f} ± {std:.1f} | [{low:+.1f}, {high:+.1f}] "
                 f"| {'yes: no difference shown' if low <= 0 <= high else 'no'} |")
  return "\n".join(lines)


def markdown_table(results: dict, domain="target", metrics=TABLE_METRICS) -> str:
  methods = results["methods"]
  metrics = [m for m in metrics if any(m in methods[k].get(domain, {}) for k in methods)]
  seeds = {k: len(next(iter(v[domain].values()))) for k, v in methods.items() if domain in v}
  lines = [f"| method ({domain}) | runs | " + " | ".join(metrics) + " |",
           "|---|---|" + "---|" * len(metrics)]
  for name, domains in methods.items():
    if domain not in domains:
      continue
    cells = [_cell(domains[domain][m]) if m in domains[domain] else "" for m in metrics]
    lines.append(f"| {name} | {seeds[name]} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def write_csv(results: dict, path: str):
  text = io.StringIO()
  writer = csv.writer(text)
  writer.writerow(["method", "domain", "metric", "mean", "std", "n", "values"])
  for name, domains in results["methods"].items():
    for domain, values in domains.items():
      for metric, v in values.items():
        v = np.asarray(v, np.float64)
        writer.writerow([name, domain, metric, f"{v.mean():.3f}",
                         f"{v.std(ddof=1) if len(v) > 1 else 0.0:.3f}", len(v),
                         " ".join(f"{x:.3f}" for x in v)])
  run_lib.write_text(run_lib.path(path), text.getvalue())


def _curve(run_dir, key):
  steps, values = [], []
  path = run_lib.path(run_dir, "metrics.jsonl")
  if path.exists():
    with path.open() as f:
      for line in f:
        row = json.loads(line)
        if key in row:
          steps.append(row["step"])
          values.append(row[key])
  return np.asarray(steps), np.asarray(values)


def plot_curves(results: dict, path: str, keys=("loss_action", "loss_reason")):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.5), squeeze=False)
  for ax, key in zip(axes[0], keys):
    for method, dirs in results["runs"].items():
      curves = [_curve(d, key) for d in dirs]
      curves = [c for c in curves if len(c[0])]
      if not curves:
        continue
      n = min(len(c[0]) for c in curves)
      mean = np.mean([c[1][:n] for c in curves], axis=0)
      smooth = np.convolve(mean, np.ones(5) / 5, mode="valid") if n >= 5 else mean
      ax.plot(curves[0][0][:len(smooth)], smooth, label=method)
    ax.set_xlabel("step")
    ax.set_title(f"train {key} (source rows; mean over runs)")
    ax.legend(fontsize=8)
  fig.tight_layout()
  with run_lib.path(path).open("wb") as f:
    fig.savefig(f, dpi=120, format="png")
  plt.close(fig)


def plot_bars(results: dict, path: str, metric="action_mAP"):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  names = [k for k, v in results["methods"].items() if metric in v.get("target", {})]
  fig, ax = plt.subplots(figsize=(1.6 * len(names) + 2, 3.5))
  for i, domain in enumerate(("source", "target")):
    values = [np.asarray(results["methods"][k][domain][metric]) for k in names]
    ax.bar(np.arange(len(names)) + (i - 0.5) * 0.38, [v.mean() for v in values], 0.38,
           yerr=[v.std(ddof=1) if len(v) > 1 else 0 for v in values], capsize=3,
           label=domain)
  ax.set_xticks(np.arange(len(names)), names, fontsize=8)
  ax.set_ylabel(f"{metric} (test)")
  ax.legend()
  fig.tight_layout()
  with run_lib.path(path).open("wb") as f:
    fig.savefig(f, dpi=120, format="png")
  plt.close(fig)


def write(run_dirs, out: str, title="Results", notes="") -> dict:
  """Everything above into `out`; returns the results dict."""
  run_lib.path(out).mkdir(parents=True, exist_ok=True)
  results = collect(run_dirs)
  run_lib.write_json(run_lib.path(out, "results.json"), {"methods": results["methods"],
                                                         "seeds": results["seeds"]})
  write_csv(results, run_lib.path(out, "results.csv"))
  plot_curves(results, run_lib.path(out, "curves.png"))
  plot_bars(results, run_lib.path(out, "target_mAP.png"))
  pruned = any("target_pruned" in v for v in results["methods"].values())
  run_lib.write_text(
      run_lib.path(out, "report.md"),
      f"# {title}\n\n{notes}\n\nTest split, points (0-100), mean ± std over runs.\n\n"
      + markdown_table(results, "target") + "\n\n"
      + (markdown_table(results, "target_pruned") + "\n\n" if pruned else "")
      + markdown_table(results, "source")
      + "\n\n![training curves](curves.png)\n\n![action mAP](target_mAP.png)\n")
  return results


def expand(run_dirs) -> list:
  """The command line's run dirs, a quoted glob expanded here (the shell cannot expand
  "gs://b/sweeps/demo/*"): its matching folders, sorted. A glob matching none is an error."""
  out = []
  for pattern in run_dirs:
    if not glob.has_magic(pattern):
      out.append(pattern)
      continue
    parts = pattern.split("/")
    first = next(i for i, p in enumerate(parts) if glob.has_magic(p))
    base = run_lib.path("/".join(parts[:first]) or ".")
    found = sorted(str(p) for p in base.glob("/".join(parts[first:])) if p.is_dir())
    if not found:
      raise FileNotFoundError(f"{pattern} matches no folder")
    out += found
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("run_dirs", nargs="+", help="run folders, or globs (quote a gs:// one)")
  parser.add_argument("--out", required=True)
  args = parser.parse_args()
  try:
    results = write(expand(args.run_dirs), args.out)
  except (OSError, KeyError, ValueError) as e:
    raise SystemExit(f"error: {e}")
  print(markdown_table(results, "target"))
  print(f"wrote {args.out}/report.md, results.json, results.csv, curves.png, target_mAP.png")


if __name__ == "__main__":
  main()
