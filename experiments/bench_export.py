r"""The exported student on this CPU: onnxruntime vs the jitted JAX function at batch 1,
GFLOPs per frame (XLA cost analysis) and params, at keep_ratio 1.0 and 0.25, in one run.

  python -m experiments.bench_export [--run runs/demo/seed0/drivlm_student] [--vit-b16]
      [--keep 1,0.25] [--iters 50] [--out bench_export.json]

--run: a trained demo student (its target test frames); --vit-b16: a random-weight CLIP
ViT-B/16-224 student (random frames). Each case is exported with export.to_onnx (checked
against JAX), the JAX student compiled with this CPU's fastest XLA kernels (export.kernels:
the choice and each candidate's p50 are printed), then both timed by drivlm_jax.timing
(backends alternated, each timed call after an untimed one of its own; p50/p90/p99).
"""
if __name__ == "__main__":  # before JAX loads: the restarted process loads it once
  from drivlm_jax import host
  host.restart_with_tunables()

import argparse
import json
import os
import tempfile

import jax
import numpy as np
import onnxruntime as ort

from drivlm_jax import timing
from experiments import bench_pruning, machine
from export import benchmark, graphs, inputs, kernels, to_onnx


def _random_feeds(cfg, n=4):
  rng = np.random.default_rng(0)
  return {"image": rng.uniform(0, 255, (n, *graphs.image_shape(cfg))).astype(np.float32),
          "instruction_ids": rng.integers(4, 1000, (n, 12)).astype(np.int32),
          "instruction_mask": np.ones((n, 12), np.int32)}


def _kernel_times(p50: dict) -> str:
  return ", ".join(f"{name} {ms:.1f} ms" for name, ms in p50.items())


def bench_case(name, cfg, params, feeds, keep, iters, tmp):
  path = os.path.join(tmp, f"{name.replace(' ', '_')}_{keep}.onnx")
  report = to_onnx.export_student(cfg, params, path, keep_ratio=keep, feeds=feeds)
  options = ort.SessionOptions()
  options.intra_op_num_threads = os.cpu_count()
  session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
  one = {k: v[:1] for k, v in feeds.items()}
  student = graphs.student(cfg, params, keep)
  fn, kernel, kernels_p50 = kernels.fastest(student, list(one.values()))
  latency = timing.time_backends(
      {"onnxruntime": lambda: session.run(None, one),
       "jax": lambda: jax.block_until_ready(fn(*one.values()))}, warmup=5, iters=iters)
  return {"student": name, "keep_ratio": keep, "params": benchmark.onnx_params(path),
          "gflops_per_frame": kernels.gflops(student, list(one.values()), 1),
          "jax_kernel": kernel,
          "jax_kernels_p50_ms": kernels_p50,
          "max_abs_diff": max(max(d.values()) for d in report["max_abs_diff"].values()),
          "latency": latency}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--run")
  parser.add_argument("--vit-b16", action="store_true")
  parser.add_argument("--keep", default="1,0.25")
  parser.add_argument("--iters", type=int, default=50)
  parser.add_argument("--out", default="bench_export.json")
  args = parser.parse_args()
  cases = []
  if args.run:
    _, cfg, params, _ = to_onnx.load(args.run)
    cases.append(("demo student", cfg, params, inputs.from_run(args.run, 4)))
  if args.vit_b16:
    cfg, params = bench_pruning.vit_b16_student()
    # Fresh gates have gain 0, so every score ties and top-k may keep any token (XLA and
    # onnxruntime break ties differently); random gates score like trained ones.
    rng = np.random.default_rng(0)
    params["reweighting"] = jax.tree.map(
        lambda a: a + rng.normal(size=a.shape).astype(a.dtype), params["reweighting"])
    cases.append(("CLIP ViT-B/16-224 student", graphs.for_export(cfg),
                  graphs.constants(params), _random_feeds(cfg)))
  if not cases:
    parser.error("give --run and/or --vit-b16")
  rows = []
  print(f"{'student':26s} {'keep':>5s} {'M params':>9s} {'GFLOPs':>8s} {'ORT p50 ms':>11s} "
        f"{'JAX p50 ms':>11s} {'ORT FPS':>8s} {'JAX FPS':>8s} {'ORT/JAX':>8s}  JAX kernels")
  with tempfile.TemporaryDirectory() as tmp:
    for name, cfg, params, feeds in cases:
      for keep in (float(k) for k in args.keep.split(",")):
        row = bench_case(name, cfg, params, feeds, keep, args.iters, tmp)
        rows.append(row)
        o, j = row["latency"]["onnxruntime"], row["latency"]["jax"]
        print(f"{name:26s} {keep:5g} {row['params'] / 1e6:9.2f} "
              f"{row['gflops_per_frame']:8.3f} {o['p50_ms']:11.2f} {j['p50_ms']:11.2f} "
              f"{o['fps']:8.1f} {j['fps']:8.1f} {o['p50_ms'] / j['p50_ms']:8.2f}  "
              f"{row['jax_kernel']} ({_kernel_times(row['jax_kernels_p50_ms'])})", flush=True)
  with open(args.out, "w") as f:
    json.dump({"machine": machine.describe(), "device": jax.devices()[0].device_kind,
               "rows": rows}, f, indent=1)


if __name__ == "__main__":
  main()
