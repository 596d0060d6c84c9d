r"""Throughput of the procedural world and of the input pipeline, next to what the demo
config's training step consumes.

  python -m experiments.bench_input [--images 1000] [--batches 40] [--out bench_input.json]

1. sim: seconds to write `--images` BDD-OIA-layout images at 640x360 (day, then night+rain).
2. build: the bdd_oia TFDS builder over them.
3. pipeline: examples/s of `drivlm_jax.data.pipeline.batches` (source day + target
   night+rain, half each) at the demo config's batch size and image size, with 0 and 2
   grain workers.
4. consumption: examples/s of a jitted AdamW step of the demo config's model on those
   batches (task losses), i.e. what the pipeline has to keep up with.
"""
if __name__ == "__main__":  # before JAX loads: the restarted process loads it once
  from drivlm_jax import host
  host.restart_with_tunables()

import argparse
import json
import tempfile
import time

import jax
import optax

from configs import demo
from data_builders import __main__ as build_cli
from drivlm_jax import train
from drivlm_jax.data import pipeline, preprocess
from drivlm_jax.model import vlm
from drivlm_jax.sim import bdd_oia as sim_bdd
from drivlm_jax.sim import tokenizer as sim_tokenizer
from experiments import machine


def _rate(iterator, batches, batch_size):
  next(iterator)   # start-up (workers, first reads) is not throughput
  start = time.perf_counter()
  for _ in range(batches):
    next(iterator)
  return batches * batch_size / (time.perf_counter() - start)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--images", type=int, default=1000)
  parser.add_argument("--batches", type=int, default=40)
  parser.add_argument("--out", default="bench_input.json")
  args = parser.parse_args()
  config = demo.get_config()
  cfg = vlm.config_from_dict(config.model)
  result = {"machine": machine.describe()}
  with tempfile.TemporaryDirectory() as tmp:
    specs = {}
    for domain in ("day", "night+rain"):
      manual = f"{tmp}/{domain}"
      start = time.perf_counter()
      sim_bdd.write(manual, domain, args.images, seed=0 if domain == "day" else 1)
      seconds = time.perf_counter() - start
      result[f"sim_{domain}_s"] = seconds
      print(f"sim: {args.images} BDD-OIA images 640x360 ({domain}) in {seconds:.1f} s "
            f"({args.images / seconds:.0f} images/s)")
      start = time.perf_counter()
      splits, skipped = build_cli.build("bdd_oia", manual, manual + "/tfds")
      result[f"build_{domain}_s"] = time.perf_counter() - start
      print(f"build: bdd_oia {domain} {splits} (skipped {skipped}) in "
            f"{result[f'build_{domain}_s']:.1f} s")
      specs[domain] = pipeline.SourceSpec("bdd_oia", manual + "/tfds")

    features = pipeline.Features(tokenizer=sim_tokenizer.write(tmp),
                                 statistics=preprocess.statistics(cfg.vision),
                                 image_size=cfg.vision.image_size,
                                 num_image_tokens=cfg.num_visual_tokens, max_len=160)
    spec, target = specs["day"], specs["night+rain"]
    for workers in (0, 2):
      ds = pipeline.batches(spec, features, config.batch_size, target=target, seed=0,
                            workers=workers)
      rate = _rate(iter(ds), args.batches, config.batch_size)
      result[f"pipeline_workers{workers}_examples_per_s"] = rate
      print(f"pipeline: {rate:.0f} examples/s with {workers} grain workers "
            f"(batch {config.batch_size}, {cfg.vision.image_size}px)")

    batches = list(_take(pipeline.batches(spec, features, config.batch_size, target=target),
                         args.batches + 1))
  params = vlm.init(cfg, jax.random.key(0))
  tx = optax.adamw(1e-3)
  state = {"step": 0, "params": params, "opt_state": tx.init(params)}
  step = jax.jit(train.make_train_step(cfg, tx, dict(config.loss)),
                 compiler_options=train.step_compiler_options(cfg.vision.dtype,
                                                              cfg.language.dtype))
  device_batches = [{k: jax.numpy.asarray(b[k]) for k in train.BATCH_KEYS} for b in batches]
  state, _ = step(state, device_batches[0], {})
  jax.block_until_ready(state)
  start = time.perf_counter()
  for b in device_batches[1:]:
    state, _ = step(state, b, {})
  jax.block_until_ready(state)
  consumed = args.batches * config.batch_size / (time.perf_counter() - start)
  result["train_step_examples_per_s"] = consumed
  best = max(result["pipeline_workers0_examples_per_s"], result["pipeline_workers2_examples_per_s"])
  print(f"training step (demo config, tiny model): consumes {consumed:.0f} examples/s; the "
        f"pipeline supplies {best / consumed:.1f}x that")
  with open(args.out, "w") as f:
    json.dump(result, f, indent=1)


def _take(ds, n):
  it = iter(ds)
  return [next(it) for _ in range(n)]


if __name__ == "__main__":
  main()
