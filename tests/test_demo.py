"""The README's demo command runs end to end (short), and its outputs hold together."""
import json
import pathlib
import subprocess
import sys

import pytest
from scipy import stats

from experiments import select

ROOT = pathlib.Path(__file__).resolve().parents[1]
# The baselines (dann, entmin) are left out here to keep the suite short; their configs are
# checked in test_configs, entmin's loss in test_components and test_adaptation.
METHODS = ("source_only", "drivlm_teacher", "drivlm_student", "oracle")


def test_demo_runs_every_method(tmp_path, monkeypatch, capsys):
  result = subprocess.run(
      [sys.executable, "-m", "experiments.demo", "--steps", "8", "--smoke", "--nobaselines",
       "--workdir", str(tmp_path)],
      capture_output=True, text=True, timeout=900, check=False, cwd=ROOT)
  assert result.returncode == 0, result.stderr[-3000:]
  results = json.loads((tmp_path / "results.json").read_text())
  assert tuple(results["methods"]) == METHODS
  for method in METHODS:
    run = tmp_path / "seed0" / method
    evaluation = json.loads((run / "eval.json").read_text())["test"]
    for domain in ("source", "target"):
      # results.json carries eval.json's metrics, one value per seed.
      assert results["methods"][method][domain] == {k: [v] for k, v in
                                                    evaluation[domain].items()}
    assert (run / "metrics.jsonl").exists()
  # The full method: the student warm-started from the CLIP stage, distilled from this
  # seed's teacher, which is larger than the student, and evaluated pruned.
  student = json.loads((tmp_path / "seed0" / "drivlm_student" / "config.json").read_text())
  teacher = json.loads((tmp_path / "seed0" / "drivlm_teacher" / "config.json").read_text())
  assert student["distill"]["teacher"] == str(tmp_path / "seed0" / "drivlm_teacher")
  assert student["init_from"] == str(tmp_path / "seed0" / "clip_finetune")
  assert (tmp_path / "seed0" / "clip_finetune" / "eval.json").exists()
  for part in ("vision", "language"):
    assert teacher["model"][part]["hidden_size"] > student["model"][part]["hidden_size"]
  assert student["evals"]["target_pruned"]["keep_ratio"] < 1.0
  pruned = json.loads((tmp_path / "seed0" / "drivlm_student" / "eval.json").read_text())
  assert results["methods"]["drivlm_student"]["target_pruned"] == {
      k: [v] for k, v in pruned["test"]["target_pruned"].items()}
  rows = json.loads((tmp_path / "seed0" / "drivlm_student" / "metrics.jsonl")
                    .read_text().splitlines()[-1])
  assert {"loss_kd_heads", "loss_kd_lm", "loss_kd_feature", "loss_da_token"} <= set(rows)
  exported = results["student_export"]
  assert exported["onnx_max_abs_diff"] <= 1e-4 and exported["keep_ratio"] == 0.25
  assert set(exported["batch1_p50_ms"]) == {"onnxruntime", "jax"}
  assert {"jitted_keep_1_ms", "jitted_keep_0.25_ms"} <= set(exported)
  assert (tmp_path / "student.onnx").exists() and (tmp_path / "student.json").exists()
  for name in ("report.md", "results.csv", "curves.png", "target_mAP.png", "pca.png",
               "reweighting.png"):
    assert (tmp_path / name).stat().st_size > 0, name
  report = (tmp_path / "report.md").read_text()
  assert all(f"| {m} | 1 |" in report for m in METHODS), report
  assert "| drivlm_student | 1 |" in result.stdout

  # Label-free selection over the demo's runs: DEV ranks them without target labels,
  # and its agreement with the oracle ranking is scipy's Spearman and the top-1 regret.
  runs = [str(tmp_path / "seed0" / m) for m in METHODS]
  out = tmp_path / "select.json"
  monkeypatch.setattr(sys, "argv", ["experiments.select", *runs, "--out", str(out),
                                    "--max_examples", "16"])
  select.main()
  printed = capsys.readouterr().out
  report = json.loads(out.read_text())
  rows = report["runs"]
  assert [r["run_dir"] for r in rows] == runs and "Spearman" in printed
  assert sorted(r["dev_rank"] for r in rows) == list(range(1, len(runs) + 1))
  by_rank = sorted(rows, key=lambda r: r["dev_rank"])
  assert all(a["dev_risk"] <= b["dev_risk"] for a, b in zip(by_rank, by_rank[1:]))
  oracle = [r["oracle_target_mAP"] for r in rows]
  assert oracle == [results["methods"][m]["target"]["action_mAP"][0] for m in METHODS]
  dev = report["agreement"]["dev"]
  rho = stats.spearmanr([-r["dev_risk"] for r in rows], oracle).statistic
  assert dev["spearman"] == (None if rho != rho else pytest.approx(rho, abs=1e-12))
  assert dev["selected"] == by_rank[0]["run_dir"]
  assert dev["regret"] == pytest.approx(max(oracle) - by_rank[0]["oracle_target_mAP"])
  assert dev["regret"] >= 0
  for row in rows:
    assert set(row["pad"]) == {"image", "token", "instance"}
    assert all(0.0 <= pad <= 2.0 for pad in row["pad"].values() if pad is not None)
  assert set(report["pad_by_method"]) == set(METHODS)
