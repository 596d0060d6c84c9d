r"""Instruction-guided pruning: speed and accuracy of the deployable student (vision tower +
reweighting + heads, jitted) at keep_ratio 1.0 vs smaller ratios, in one run.

  python -m experiments.bench_pruning --run runs/demo/seed0/drivlm_student [--keep 1,0.5,0.25]
      [--batch 1,32] [--vit-b16]

With --run: the trained run's params, and its target/source test action mAP at each keep
ratio. --vit-b16 adds a random-weight CLIP ViT-B/16-224 student (speed only). Timings are
interleaved (each round times every ratio once) and the median over rounds is reported.
Writes --out (default bench_pruning.json).
"""
if __name__ == "__main__":  # before JAX loads: the restarted process loads it once
  from drivlm_jax import host
  host.restart_with_tunables()

import argparse
import dataclasses
import json

import jax
import numpy as np

from configs import common
from drivlm_jax import run as run_lib, timing
from drivlm_jax.data import sources
from drivlm_jax.evals import heads
from drivlm_jax.model import vlm
from export import graphs


def _student(cfg, params, keep):
  return jax.jit(lambda p, x, i, m: vlm.encode_image(cfg, p, x, i, m, keep)["action_logits"])


def time_ratios(cfg, params, keeps, batch, rounds=15) -> dict:
  """Median ms per forward at each keep ratio (interleaved rounds)."""
  rng = np.random.default_rng(0)
  x = jax.device_put(rng.normal(size=(batch, *graphs.image_shape(cfg))).astype(np.float32))
  ids = jax.device_put(rng.integers(4, 100, size=(batch, 12)).astype(np.int32))
  mask = jax.device_put(np.ones((batch, 12), np.int32))
  fns = {k: _student(cfg, params, k) for k in keeps}
  calls = {k: (lambda fn=fn: jax.block_until_ready(fn(params, x, ids, mask)))
           for k, fn in fns.items()}
  times = timing.interleaved(calls, warmup=1, iters=rounds)
  return {k: 1e3 * float(np.median(v)) for k, v in times.items()}


def accuracy(run_dir, keeps) -> dict:
  """{keep: {"target"|"source": action_mAP}} on the test splits."""
  run = run_lib.load(run_dir)
  data = sources.prepare(run.config.data, run_dir)
  feats = run_lib.features(run.config, run.cfg, data["tokenizer"])
  out = {}
  for keep in keeps:
    out[keep] = {role: heads.Heads(name=f"{role}_keep_{keep:g}", every=1, role=role,
                                   keep_ratio=keep).run(run.cfg, run.params, data,
                                                        feats)["action_mAP"]
                 for role in ("target", "source")}
  return out, run.cfg, run.params


def vit_b16_student():
  model = common.model_config("clip_b16_qwen05b")
  model.language.num_layers = 1     # the LM is not part of the deployed student
  cfg = dataclasses.replace(vlm.config_from_dict(model), reweight=True, reweight_layer=0)
  return cfg, jax.jit(lambda k: vlm.init(cfg, k))(jax.random.key(0))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--run", help="a trained run dir with model.reweight (the demo student)")
  parser.add_argument("--keep", default="1,0.5,0.25")
  parser.add_argument("--batch", default="1,32")
  parser.add_argument("--vit-b16", action="store_true")
  parser.add_argument("--out", default="bench_pruning.json")
  args = parser.parse_args()
  keeps = [float(k) for k in args.keep.split(",")]
  batches = [int(b) for b in args.batch.split(",")]
  result = {"device": jax.devices()[0].device_kind, "cases": []}
  cases = []
  if args.run:
    acc, cfg, params = accuracy(args.run, keeps)
    result["action_mAP"] = {str(k): v for k, v in acc.items()}
    cases.append(("demo student", cfg, params))
  if args.vit_b16:
    cases.append(("CLIP ViT-B/16-224 student", *vit_b16_student()))
  if not cases:
    parser.error("give --run and/or --vit-b16")
  print(f"{'student':28s} {'batch':>5s} " + " ".join(f"{f'keep {k:g} ms':>13s}" for k in keeps)
        + f" {'speed-up at ' + str(keeps[-1]):>18s}")
  for name, cfg, params in cases:
    for batch in batches:
      ms = time_ratios(cfg, params, keeps, batch)
      speedup = ms[keeps[0]] / ms[keeps[-1]]
      result["cases"].append({"student": name, "batch": batch, "ms": {str(k): v for k, v in
                                                                      ms.items()},
                              "speedup": speedup})
      print(f"{name:28s} {batch:5d} " + " ".join(f"{ms[k]:13.2f}" for k in keeps)
            + f" {speedup:17.2f}x")
  if "action_mAP" in result:
    print("action mAP (test) by keep ratio: " + ", ".join(
        f"{k}: target {v['target']:.1f} / source {v['source']:.1f}"
        for k, v in result["action_mAP"].items()))
  with open(args.out, "w") as f:
    json.dump(result, f, indent=1)


if __name__ == "__main__":
  main()
