"""The README's demo command runs end to end (short)."""
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_demo_smoke_training_learns():
  result = subprocess.run(
      [sys.executable, "-m", "drivlm_jax.demo", "--config", "configs/demo.py:steps=120"],
      capture_output=True, text=True, timeout=600, check=True, cwd=ROOT)
  last = result.stdout.strip().splitlines()[-1]
  accuracy = float(last.split("held-out action accuracy ")[1].split("%")[0])
  assert accuracy > 80.0, result.stdout
