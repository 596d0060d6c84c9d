r"""Label-free model selection (DEV) and the proxy A-distance of each alignment level.

  python -m experiments.select RUN_DIR... [--out FILE.json] [--max_examples N]

Each RUN_DIR is what `drivlm_jax.train` writes. The runs are ranked without a target label
by Deep Embedded Validation (DEV: You, Wang, Chen, Wang and Jordan, "Towards Accurate Model
Selection in Deep Unsupervised Domain Adaptation", ICML 2019), and the ranking is compared
with the oracle's: each run's target test action mAP in eval.json, read only to report the
agreement (Spearman rank correlation, top-1 regret), never to select.

DEV, the paper's Algorithm 1, with features f = the attention-pooled visual feature the
action head reads ("pooled_visual"):
  1. F_s = {f(x_j)}: the labelled source validation examples (the source "test" split; source
     labels are allowed), F_t = {f(x)}: unlabelled target examples (the target "train" split;
     its labels are never read).
  2. A domain classifier d(f) = p(target | f) (logistic regression on standardised features)
     learns F_t (label 1) against F_s (label 0).
  3. Density ratio of each source validation example:
       w_j = n_s / n_t * d(f_j) / (1 - d(f_j))   (= n_s / n_t * exp(logit_j))
     with n_s, n_t the classifier's source and target training counts.
  4. Weighted losses L_j = w_j * l_j, l_j the per-example loss (here the binary
     cross-entropy of the action head, mean over the 4 actions).
  5. Control variate: eta = -Cov(L, W) / Var(W)   (eta = 0 when every w_j is equal).
  6. R_DEV = mean(L) + eta * mean(W) - eta.  Lower is better.
The paper fits the classifier on the source training features and weighs the validation
ones; here the source validation split is cross-fitted instead: it is cut into two fixed
halves, and each half's w_j comes from a classifier fit on the other half (and every target
example), so every w_j is predicted on an example the classifier did not see and no training
example (whose features the model has fit) enters the estimate.

Proxy A-distance (Ben-David et al.): PAD = 2 (1 - 2 eps), eps = the held-out error of a
linear classifier (the same logistic regression) telling source test from target test
features on a fixed 50/50 split (half of each domain's images train it; no label is read),
clipped to eps <= 0.5 so PAD lies in [0, 2]. One PAD per alignment level the discriminators
see: "image" (the mean of the visual tokens, `alignment.image_level`), "token" (16 fixed
random token positions per image) and "instance" (`discriminators.box_pool` over the real
boxes, box_mask > 0). Token and instance rows are split by image, so the rows of one image
never sit on both sides. Before vs after adaptation: `pad_by_method` averages the runs of
each config `method` (source_only against the adapted methods).

Prints a markdown table and the agreement lines; --out writes everything as JSON. Every split
is read in order (no shuffle, no augmentation), up to --max_examples examples, and every
seed is fixed, so a rerun gives the same numbers.
"""
import argparse
import dataclasses
import functools
import math

import jax
import numpy as np
import tqdm
from scipy import special, stats
from sklearn import linear_model, pipeline as sk_pipeline, preprocessing

from drivlm_jax import metrics, run as run_lib
from drivlm_jax.adapt import alignment
from drivlm_jax.data import pipeline
from drivlm_jax.model import discriminators, vlm
from export import inputs

SEED = 0
BATCH_SIZE = 32
TOKENS_PER_IMAGE = 16
LEVELS = ("image", "token", "instance")
MODEL_INPUTS = ("image", "instruction_ids", "instruction_mask", "boxes", "box_mask",
                "box_camera")


#### DEV (You et al., 2019, Algorithm 1)

def dev_risk(losses, weights) -> dict:
  """Steps 4-6: per-example losses l [n] and density ratios w [n] of the source validation
  examples -> {"risk": R_DEV, "eta", "weighted_loss": mean(L), "mean_weight": mean(W)}.

  Cov and Var share one normalisation, which cancels in eta; equal weights (Var(W) = 0) give
  eta = 0, so R_DEV = mean(L) (= the mean loss when every w is 1)."""
  losses, weights = np.asarray(losses, np.float64), np.asarray(weights, np.float64)
  weighted = weights * losses
  centred = weights - weights.mean()
  var = np.mean(centred ** 2)
  eta = -np.mean((weighted - weighted.mean()) * centred) / var if var > 0 else 0.0
  risk = weighted.mean() + eta * weights.mean() - eta
  return {"risk": float(risk), "eta": float(eta), "weighted_loss": float(weighted.mean()),
          "mean_weight": float(weights.mean())}


def domain_classifier(class_weight=None):
  """The linear domain classifier of DEV and of the PAD: logistic regression (target = 1)
  on standardised features, fixed seed. DEV's density ratio needs the plain class prior (it
  corrects for n_s / n_t itself); the PAD weighs the domains equally ("balanced")."""
  return sk_pipeline.make_pipeline(
      preprocessing.StandardScaler(),
      linear_model.LogisticRegression(max_iter=1000, random_state=SEED,
                                      class_weight=class_weight))


def halves(groups, seed: int = SEED) -> np.ndarray:
  """A fixed split of rows by group (the image each row comes from): a seeded permutation of
  the distinct groups, whose first ceil(half) are the True side. -> bool [rows]."""
  groups = np.asarray(groups)
  distinct = np.unique(groups)
  if len(distinct) < 2:
    raise ValueError(f"a 50/50 split needs rows from at least 2 images, got {len(distinct)}")
  chosen = np.random.default_rng(seed).permutation(distinct)[:(len(distinct) + 1) // 2]
  return np.isin(groups, chosen)


def density_ratios(source, target) -> np.ndarray:
  """Step 3, cross-fitted: source validation features [n_s, D] and unlabelled target
  features [n_t, D] -> w [n_s], each half's from a classifier fit on the other half."""
  first = halves(np.arange(len(source)))
  weights = np.empty(len(source))
  for query in (first, ~first):
    fit = source[~query]
    x = np.concatenate([fit, target])
    y = np.r_[np.zeros(len(fit)), np.ones(len(target))]
    logits = domain_classifier().fit(x, y).decision_function(source[query])
    weights[query] = np.exp(logits) * len(fit) / len(target)
  return weights


def action_losses(logits, labels) -> np.ndarray:
  """Binary cross-entropy of the action head, mean over the actions: logits, labels [n, 4]
  -> [n] (softplus(z) - y z, the stable form of -y log s(z) - (1 - y) log(1 - s(z)))."""
  z, y = np.asarray(logits, np.float64), np.asarray(labels, np.float64)
  return np.mean(np.logaddexp(0.0, z) - y * z, axis=1)


#### Proxy A-distance

def proxy_a_distance(source, target, source_groups=None, target_groups=None) -> dict:
  """PAD between source [n_s, D] and target [n_t, D] features -> {"pad", "error"}.

  `*_groups` [n]: the image of each row (default: one image per row). The classifier trains
  on `halves(source_groups, SEED)` and `halves(target_groups, SEED + 1)`, the domains
  weighed equally, and is scored on the rest; "error" is its held-out balanced error eps
  (the mean of the two domains' errors: Ben-David et al.'s 2 sup |P_s(A) - P_t(A)| =
  2 (1 - 2 eps) whatever the domains' sizes; a plain error would give identical domains of
  unequal size a PAD near 1), unclipped; "pad" = 2 (1 - 2 min(eps, 0.5))."""
  source_groups = np.arange(len(source)) if source_groups is None else source_groups
  target_groups = np.arange(len(target)) if target_groups is None else target_groups
  x = np.concatenate([source, target])
  y = np.r_[np.zeros(len(source)), np.ones(len(target))]
  train = np.r_[halves(source_groups, SEED), halves(target_groups, SEED + 1)]
  predicted = domain_classifier("balanced").fit(x[train], y[train]).predict(x[~train])
  truth = y[~train]
  error = float(0.5 * (np.mean(predicted[truth == 0] != 0)
                       + np.mean(predicted[truth == 1] != 1)))
  return {"pad": 2.0 * (1.0 - 2.0 * min(error, 0.5)), "error": error}


#### Features of a run

def token_positions(num_tokens: int) -> np.ndarray:
  """The fixed random token positions of the token level (the same for every image, domain
  and run): min(TOKENS_PER_IMAGE, num_tokens) of them, sorted."""
  rng = np.random.default_rng(SEED)
  return np.sort(rng.choice(num_tokens, min(TOKENS_PER_IMAGE, num_tokens), replace=False))


@functools.partial(jax.jit, static_argnums=(0, 3))
def _features(cfg: vlm.Config, params, batch, keep_ratio: float = 1.0) -> dict:
  """One batch -> "pooled" [B, D] (DEV's f), "action_logits" [B, 4], and the features of each
  PAD level: "image" [B, D], "token" [B, k, D], "instance" [B, M, D]. With `keep_ratio` < 1
  the first two are the model's pruned to that share of its visual tokens, as deployed; the
  PAD levels read every token (pruned ones have no fixed positions)."""
  out = vlm.encode_image(cfg, params, batch["image"], batch["instruction_ids"],
                         batch["instruction_mask"])
  deployed = out if keep_ratio == 1.0 else vlm.encode_image(
      cfg, params, batch["image"], batch["instruction_ids"], batch["instruction_mask"],
      keep_ratio=keep_ratio)
  tokens = out["visual_tokens"]
  cells, valid = vlm.on_grid(cfg, tokens)   # the patch grids, as in training
  instances = discriminators.box_pool(cells, cfg.vision.grid, batch["boxes"], batch["box_mask"],
                                      batch["box_camera"], cfg.num_cameras, valid)
  return {"pooled": deployed["pooled_visual"], "action_logits": deployed["action_logits"],
          "image": alignment.image_level(tokens),
          "token": tokens[:, token_positions(tokens.shape[1])], "instance": instances}


def extract(cfg, params, spec, feats, max_examples: int, labelled: bool = False,
            keep_ratio: float = 1.0) -> dict:
  """The first `max_examples` examples of `spec` (in order, no augmentation, the whole split
  on every host) -> numpy float32 `_features` plus "box_mask" [n, M], and "actions" [n, 4]
  only when `labelled`. Every batch is padded to one shape, so a model compiles once."""
  rows = min(BATCH_SIZE, max_examples)
  ds = pipeline.batch_dataset(spec, dataclasses.replace(feats, augment=False), rows,
                              train=False, shard_index=0, shard_count=1)
  pad = lambda x: np.concatenate([x, np.repeat(x[-1:], rows - len(x), axis=0)])
  keys = ("box_mask", "actions", "action_mask") if labelled else ("box_mask",)
  parts, n = {}, 0
  for i in range(len(ds)):
    if n >= max_examples:
      break
    batch = ds[i]
    count = min(len(batch["image"]), max_examples - n)
    out = jax.device_get(_features(cfg, params, {k: pad(batch[k]) for k in MODEL_INPUTS},
                                   keep_ratio))
    for key, value in {**out, **{k: batch[k] for k in keys}}.items():
      parts.setdefault(key, []).append(np.asarray(value[:count], np.float32))
    n += count
  if not n:
    raise ValueError(f"{spec.name} {spec.split} holds no example")
  return {k: np.concatenate(v) for k, v in parts.items()}


def _level_rows(features: dict, level: str):
  """An `extract` output -> (rows [R, D], the image of each row [R]) of one PAD level: an
  image each, its fixed tokens, or its real boxes."""
  x = features[level]
  if level == "image":
    return x, np.arange(len(x))
  if level == "token":
    return x.reshape(-1, x.shape[-1]), np.repeat(np.arange(len(x)), x.shape[1])
  real = features["box_mask"] > 0
  return x[real], np.nonzero(real)[0]


def _level_pads(source, target, name: str, notes: list) -> dict:
  """{level: proxy_a_distance} of source vs target `extract` outputs; a level is None (with
  a note) when a side has its rows in fewer than 2 images (the instance level without
  boxes)."""
  out = {}
  for level in LEVELS:
    (s, s_groups), (t, t_groups) = _level_rows(source, level), _level_rows(target, level)
    if min(len(np.unique(s_groups)), len(np.unique(t_groups))) < 2:
      notes.append(f"{name}: {level} PAD skipped: the source or target test split has "
                   f"{level} features in fewer than 2 images")
      out[level] = None
    else:
      out[level] = proxy_a_distance(s, t, s_groups, t_groups)
  return out


#### One run, then the sweep

def oracle_map(run_dir, domain: str = "target") -> float | None:
  """The run's target test action mAP (eval.json's `domain`: "target", or "target_pruned"
  as deployed; None when the target has no labels to score), after checking that `run_dir`
  is a finished run (eval.json and checkpoints)."""
  for part in ("eval.json", "checkpoints"):
    if not run_lib.path(run_dir, part).exists():
      raise run_lib.RunError(f"{run_dir}: no {part}; is it a finished run of drivlm_jax.train?")
  result = run_lib.read_json(run_lib.path(run_dir, "eval.json"))
  value = result.get("test", {}).get(domain, {}).get("action_mAP")
  return None if value is None else float(value)


def deployed_keep_ratio(run_dir, config) -> float:
  """The keep ratio a run is deployed at: its pruned evaluator's (`evals.target_pruned`, the
  student's), else an error naming the run."""
  pruned = config.get("evals", {}).get("target_pruned")
  if not pruned or "keep_ratio" not in pruned:
    raise ValueError(f"{run_dir}: no evals.target_pruned.keep_ratio in its config: only a "
                     f"pruned student is scored as deployed")
  return float(pruned["keep_ratio"])


def output_spread(action_logits) -> float:
  """[n, C] action logits -> the mean over classes of the std of the probabilities over the
  rows: how much the heads' outputs vary with the input (no label read). A domain whose
  spread is a small fraction of the source's gets nearly the class prior for every image."""
  return float(special.expit(np.asarray(action_logits, np.float64)).std(axis=0).mean())


COLLAPSED = 0.1   # target spread / source spread below this: the target outputs compressed


def score_run(run_dir: str, max_examples: int, notes: list, deployed: bool = False) -> dict:
  """One run's row: DEV risk, the source validation loss and mAP, PAD per level, oracle.
  `deployed`: DEV, the losses, the spread and the oracle are those of the run pruned as
  deployed (`deployed_keep_ratio`; eval.json's "target_pruned")."""
  oracle = oracle_map(run_dir, "target_pruned" if deployed else "target")
  run = run_lib.load(run_dir)
  keep = deployed_keep_ratio(run_dir, run.config) if deployed else 1.0
  _, data, feats = inputs.run_features(run_dir)
  get = lambda role, split, labelled=False: extract(run.cfg, run.params, data[role, split],
                                                    feats, max_examples, labelled, keep)
  source = get("source", "test", labelled=True)
  unlabelled = get("target", "train")
  target_test = get("target", "test")
  # The risk over the rows with actions (nuScenes-Drive: not a scene's last 3 s); PAD below
  # compares every row.
  rows = source["action_mask"] > 0
  labelled = {k: source[k][rows] for k in ("action_logits", "actions", "pooled")}
  losses = action_losses(labelled["action_logits"], labelled["actions"])
  dev = dev_risk(losses, density_ratios(labelled["pooled"], unlabelled["pooled"]))
  if not 0.5 <= dev["mean_weight"] <= 2.0:   # E_source[w] = 1 for the true density ratio
    notes.append(f"{run_dir}: DEV's mean density ratio is {dev['mean_weight']:.3g} (1 in "
                 f"theory): source and target features barely overlap (or the domain "
                 f"classifier is ill calibrated), so DEV's control variate extrapolates")
  probabilities = special.expit(labelled["action_logits"].astype(np.float64))
  spread = {"source": output_spread(source["action_logits"]),
            "target": output_spread(unlabelled["action_logits"])}
  if spread["target"] < COLLAPSED * spread["source"]:
    notes.append(f"{run_dir}: its action heads give nearly the same output for every target "
                 f"train image (std of the probabilities {spread['target']:.2g}, source "
                 f"{spread['source']:.2g}): its target representation is compressed towards "
                 f"the class prior, so thresholded target metrics (F1) say little and its "
                 f"target ranking (mAP) rests on small differences")
  pads = _level_pads(source, target_test, run_dir, notes)
  try:
    source_map = metrics.multilabel("action", probabilities, labelled["actions"])["action_mAP"]
  except ValueError as e:   # non-finite outputs: name the run
    raise ValueError(f"{run_dir}: {e}") from None
  return {"run_dir": str(run_dir), "method": run.config.get("method") or "", "step": run.step,
          "dev_risk": dev["risk"], "dev": dev, "source_loss": float(losses.mean()),
          "source_mAP": source_map,
          "pad": {k: None if v is None else v["pad"] for k, v in pads.items()},
          "pad_error": {k: None if v is None else v["error"] for k, v in pads.items()},
          "oracle_target_mAP": oracle, "output_spread": spread, "keep_ratio": keep,
          "examples": {"source_test": len(losses), "target_train": len(unlabelled["pooled"]),
                       "target_test": len(target_test["pooled"])}}


def _finite(x):
  return None if x is None or not math.isfinite(x) else float(x)


def agreement(scores, oracle, run_dirs) -> dict:
  """How a label-free score (higher = better) agrees with the oracle mAP: Spearman's rho
  (None for fewer than 2 runs or a constant side), the selected run (the highest score, the
  first on ties) and its top-1 regret = max oracle - oracle of the selected run."""
  scores, oracle = np.asarray(scores, np.float64), np.asarray(oracle, np.float64)
  rho = None
  if len(scores) > 1 and np.ptp(scores) > 0 and np.ptp(oracle) > 0:
    rho = _finite(stats.spearmanr(scores, oracle).statistic)
  pick = int(np.argmax(scores))
  return {"spearman": rho, "selected": run_dirs[pick],
          "regret": float(oracle.max() - oracle[pick])}


def select(run_dirs, max_examples: int = 512) -> dict:
  """The report of a sweep: {"runs": [row per run, with "dev_rank" (1 = lowest DEV risk)],
  "agreement": {criterion: agreement}, "pad_by_method": {method: {level: mean PAD}},
  "notes": [...]}. Criteria: "dev" (-DEV risk, the selection), and the label-free baselines
  "source_loss" (-loss) and "source_mAP" on the source validation split."""
  for run_dir in run_dirs:   # fail before any model is loaded
    oracle_map(run_dir)
  notes = []
  rows = [score_run(d, max_examples, notes) for d in tqdm.tqdm(run_dirs, desc="runs")]
  order = np.argsort([r["dev_risk"] for r in rows], kind="stable")
  for rank, i in enumerate(order, 1):
    rows[i]["dev_rank"] = rank
  oracle, dirs = [r["oracle_target_mAP"] for r in rows], [r["run_dir"] for r in rows]
  criteria = {"dev": [-r["dev_risk"] for r in rows],
              "source_loss": [-r["source_loss"] for r in rows],
              "source_mAP": [r["source_mAP"] for r in rows]}
  if None in oracle:   # a target without labels: the selection stands, unchecked
    notes.append("no target test action_mAP in some runs' eval.json (a target without "
                 "labels): DEV ranks the runs, its agreement with the oracle is not measured")
  return {"runs": rows, "max_examples": max_examples,
          "agreement": {} if None in oracle else {k: agreement(v, oracle, dirs)
                                                  for k, v in criteria.items()},
          "pad_by_method": pad_by_method(rows), "notes": notes}


def pad_by_method(rows) -> dict:
  """{method: {level: mean PAD over its runs, None where none has one}}: source_only is the
  feature gap before adaptation, the adapted methods' after."""
  groups = {}
  for row in rows:
    groups.setdefault(row["method"], []).append(row["pad"])
  out = {}
  for method, pads in groups.items():
    out[method] = {}
    for level in LEVELS:
      values = [p[level] for p in pads if p[level] is not None]
      out[method][level] = float(np.mean(values)) if values else None
  return out


#### Output

def _cell(x, digits=3) -> str:
  return "-" if x is None else f"{x:.{digits}f}"


def markdown(report: dict) -> str:
  """The runs table, the PAD by method and the agreement lines."""
  lines = ["| run | method | DEV risk | source val loss | source mAP | PAD image | PAD token "
           "| PAD instance | oracle target mAP | DEV rank |", "|" + "---|" * 10]
  for r in report["runs"]:
    lines.append(
        f"| {r['run_dir']} | {r['method']} | {_cell(r['dev_risk'], 4)} | "
        f"{_cell(r['source_loss'], 4)} | {_cell(r['source_mAP'], 1)} | "
        + " | ".join(_cell(r["pad"][level]) for level in LEVELS)
        + f" | {_cell(r['oracle_target_mAP'], 1)} | {r['dev_rank']} |")
  lines += ["", "| method | PAD image | PAD token | PAD instance |", "|---|---|---|---|"]
  lines += [f"| {m} | " + " | ".join(_cell(p[level]) for level in LEVELS) + " |"
            for m, p in report["pad_by_method"].items()]
  dev = report["agreement"].get("dev")
  if dev is None:
    best = min(report["runs"], key=lambda r: r["dev_rank"])["run_dir"]
    lines += ["", f"DEV selects {best}"]
  else:
    lines += ["", f"Spearman(-DEV risk, oracle target mAP): {_cell(dev['spearman'])}",
              f"top-1 regret: {dev['regret']:.2f} mAP points (DEV selects {dev['selected']})"]
    for name in ("source_loss", "source_mAP"):
      a = report["agreement"][name]
      lines.append(f"baseline {name}: Spearman {_cell(a['spearman'])}, top-1 regret "
                   f"{a['regret']:.2f}")
  return "\n".join(lines + [f"note: {n}" for n in report["notes"]])


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("run_dirs", nargs="+")
  parser.add_argument("--out", default="", help="JSON file for the report (default: print)")
  parser.add_argument("--max_examples", type=int, default=512,
                      help="examples read from each split of each run")
  args = parser.parse_args()
  if args.max_examples < 2:
    parser.error("--max_examples must be at least 2 (the 50/50 splits)")
  try:
    report = select(args.run_dirs, args.max_examples)
  except run_lib.RunError as e:
    raise SystemExit(f"error: {e}")
  print(markdown(report))
  if args.out:
    run_lib.write_json(run_lib.path(args.out), report)
    print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
