r"""The demo on the embedded default: the tiny VLM trained on the procedural world's day
domain (source) and evaluated on night+fog (target), source-only next to the oracle trained on
labelled target too (the upper bound adaptation is measured against).

  python -m drivlm_jax.demo [--workdir workdirs/demo] [--steps 1200]

Each run is `python -m drivlm_jax.train --config configs/demo.py:method=M ...`; re-running
resumes or reuses them. Results: <workdir>/<method>/eval.json and a summary table.
"""
import json
import os

from absl import app, flags, logging

from configs import demo as demo_config
from drivlm_jax import train

_WORKDIR = flags.DEFINE_string("workdir", "workdirs/demo", "Where the runs go.")
_STEPS = flags.DEFINE_integer("steps", None, "Training steps (default: the config's).")
METHODS = ("source_only", "oracle")


def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  rows = {}
  for method in METHODS:
    arg = f"method={method}" + (f",steps={_STEPS.value}" if _STEPS.value else "")
    config = demo_config.get_config(arg)
    config.data.cache_dir = os.path.join(_WORKDIR.value, "data")   # one sim for both runs
    workdir = os.path.join(_WORKDIR.value, method)
    print(f"== {method}: python -m drivlm_jax.train --config configs/demo.py:{arg} "
          f"--workdir {workdir} --config.data.cache_dir={config.data.cache_dir}")
    train.train(config, workdir)
    with open(os.path.join(workdir, "eval.json")) as f:
      rows[method] = json.load(f)["test"]
  print("\nDemo (sim day -> night+fog, test split, points):")
  print(f"{'method':12s} {'source action mAP':>18s} {'target action mAP':>18s} "
        f"{'target reason mAP':>18s} {'target ROUGE-L':>15s}")
  for method, r in rows.items():
    print(f"{method:12s} {r['source']['action_mAP']:18.1f} {r['target']['action_mAP']:18.1f} "
          f"{r['target']['reason_mAP']:18.1f} {r['target'].get('ROUGE-L', float('nan')):15.1f}")


if __name__ == "__main__":
  app.run(main)
