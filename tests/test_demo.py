"""The README's demo command runs end to end (short)."""
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_demo_runs_both_methods(tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "drivlm_jax.demo", "--steps", "20", "--workdir", str(tmp_path)],
      capture_output=True, text=True, timeout=900, check=True, cwd=ROOT)
  lines = result.stdout.strip().splitlines()
  assert lines[-2].startswith("source_only") and lines[-1].startswith("oracle"), result.stdout
  for method in ("source_only", "oracle"):
    assert (tmp_path / method / "eval.json").exists()
    assert (tmp_path / method / "metrics.jsonl").exists()
