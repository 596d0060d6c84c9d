"""experiments.report aggregates runs by method over seeds; experiments.ablate's flags."""
import csv
import json

import numpy as np
import pytest
from scipy import stats

from configs import demo
from drivlm_jax import run as run_lib
from experiments import ablate, report, runs


def _run(path, method, target_map, step_losses, seed=0):
  path.mkdir(parents=True)
  (path / "config.json").write_text(json.dumps({"method": method, "seed": seed}))
  (path / "eval.json").write_text(json.dumps({"test": {
      "target": {"action_mAP": target_map, "ROUGE-L": 10.0},
      "source": {"action_mAP": 90.0, "ROUGE-L": 20.0}}, "step": 5}))
  (path / "metrics.jsonl").write_text("".join(
      json.dumps({"step": i + 1, "loss_action": v, "loss_reason": v}) + "\n"
      for i, v in enumerate(step_losses)))
  return str(path)


def test_report_means_and_stds_over_seeds(tmp_path):
  runs = [_run(tmp_path / f"s{s}" / "a", "alpha", v, [1.0, 0.5] * 4, seed=s)
          for s, v in enumerate([60.0, 64.0, 71.0])]
  runs.append(_run(tmp_path / "s0" / "b", "beta", 80.0, [1.0] * 8))
  results = report.write(runs, str(tmp_path / "out"))
  saved = json.loads((tmp_path / "out" / "results.json").read_text())
  assert saved["methods"]["alpha"]["target"]["action_mAP"] == [60.0, 64.0, 71.0]
  assert saved["seeds"]["alpha"] == [0, 1, 2]
  table = report.markdown_table(results, "target")
  values = np.array([60.0, 64.0, 71.0])
  low, high = stats.t.interval(0.95, 2, loc=values.mean(), scale=stats.sem(values))
  assert (f"| alpha | 3 | {values.mean():.1f} ± {values.std(ddof=1):.1f} "
          f"[{low:.1f}, {high:.1f}] |") in table
  assert "| beta | 1 | 80.0 |" in table
  rows = list(csv.DictReader(open(tmp_path / "out" / "results.csv")))
  row = next(r for r in rows if r["method"] == "alpha" and r["domain"] == "target"
             and r["metric"] == "action_mAP")
  assert float(row["std"]) == pytest.approx(values.std(ddof=1), abs=1e-3)
  for name in ("curves.png", "target_mAP.png", "report.md"):
    assert (tmp_path / "out" / name).stat().st_size > 0
  with pytest.raises(FileNotFoundError, match="has .* finished training"):
    report.collect([str(tmp_path / "missing")])
  again = _run(tmp_path / "again" / "a", "alpha", 50.0, [1.0], seed=1)   # not a 4th seed
  with pytest.raises(ValueError, match=r"s1/a and .*again/a are both 'alpha' at seed 1"):
    report.collect(runs + [again])


def test_paired_differences_match_a_paired_t_test(tmp_path):
  """Matched seeds (one seed only one method ran is left out), the interval of scipy's
  paired t-test, and "includes 0" when it does."""
  a, b, c = [61.0, 70.0, 66.0, 75.0], [58.0, 69.0, 60.0, 71.0, 99.0], [62.0, 69.0, 67.0, 74.0]
  runs = [_run(tmp_path / f"{m}{s}", m, v, [1.0], seed=s)
          for m, values in (("a", a), ("b", b), ("c", c)) for s, v in enumerate(values)]
  results = report.collect(runs)
  np.testing.assert_allclose(report.paired(results, "a", "b"), np.subtract(a, b[:4]))
  table = report.paired_table(results, [("a - b", "a", "b"), ("c - a", "c", "a")])
  for label, x, y in (("a - b", a, b[:4]), ("c - a", c, a)):
    ci = stats.ttest_rel(x, y).confidence_interval(0.95)
    d = np.subtract(x, y)
    zero = "yes: no difference shown" if ci.low <= 0 <= ci.high else "no"
    assert (f"| {label} | 4 | {d.mean():+.1f} ± {d.std(ddof=1):.1f} | "
            f"[{ci.low:+.1f}, {ci.high:+.1f}] | {zero} |") in table, table
  assert "| c - a | 4 | +0.0" in table and "yes" in table.splitlines()[-1]
  assert table.splitlines()[2].endswith("| no |")


def test_each_ablation_is_one_component_off_by_existing_config_keys():
  full = ablate.ABLATIONS["drivlm_student"]
  for name, overrides in ablate.ABLATIONS.items():
    changed = {k for k in {*full, *overrides} if full.get(k) != overrides.get(k)}
    if name == "no_da":   # the discriminators as one component: every level off
      assert changed == {"loss.da_image", "loss.da_token", "loss.da_instance"}
    elif name == "no_reweighting":   # the gates, and the pruning they make (and its KD)
      assert changed == {"model.reweight", "loss.kd_pruned"}
    else:
      assert len(changed) == (name != "drivlm_student"), name   # one flag off the full method
    config = demo.get_config("method=drivlm,teacher=/x")
    ablate.apply_overrides(config, overrides)
  with pytest.raises(KeyError, match="no such config key"):
    ablate.apply_overrides(demo.get_config("method=drivlm,teacher=/x"), {"da.imgae": 0.0})


def test_a_finished_run_is_reused_and_a_changed_config_is_named(tmp_path, capsys):
  config = demo.get_config("method=source_only,steps=30")
  run = tmp_path / "run"
  run.mkdir()
  (run / "config.json").write_text(config.to_json_best_effort(indent=1))
  assert not run_lib.finished(str(run), config)           # no evaluation yet
  (run / "eval.json").write_text(json.dumps({"step": 20}))
  assert not run_lib.finished(str(run), config)           # not its final step
  (run / "eval.json").write_text(json.dumps({"step": 30}))
  assert run_lib.finished(str(run), config)
  assert "warning" not in capsys.readouterr().out
  config.optimizer.learning_rate = 5e-4
  config.seed = 3
  assert run_lib.finished(str(run), config)
  out = capsys.readouterr().out
  assert "differs at optimizer.learning_rate, seed" in out and str(run) in out
  # A run from before a loss term existed stored no weight for it: 0, the same config as
  # one that turns it off; the student's default weight is a change.
  student = demo.get_config("method=drivlm_student,teacher=t,steps=30")
  old = student.to_dict()
  del old["loss"]["kd_relation"]
  (run / "config.json").write_text(json.dumps(old))
  assert run_lib.config_changes(str(run), student) == ["loss.kd_relation"]
  student.loss.kd_relation = 0.0
  assert run_lib.config_changes(str(run), student) == []
  # The experiments' job builder says it in this process, not only in the worker's log.
  capsys.readouterr()
  student.loss.kd_relation = 0.3
  runs.train_job("student", student, str(run))
  assert "differs at loss.kd_relation" in capsys.readouterr().out
