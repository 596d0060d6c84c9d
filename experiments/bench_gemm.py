r"""The CPU GEMM kernels behind the deployed student (`drivlm_jax.model.cpu_gemm`), ours
against ours: a weight that is a constant of the jitted function on the packed-weight kernel,
the same weight through MKL's sgemm (`cpu_gemm.packing(False)`), and XLA's dots.

  python -m experiments.bench_gemm [--rows 1,50,197] [--iters 15] [--out bench_gemm.json]

Cases, float32, for each row count (50: the CLIP-B/16 student pruned to a quarter, 197: its
every token): one GEMM of each ViT-B/16 shape (768 x 3072, 3072 x 768, 768 x 768), and 12
ViT-B MLP layers (768 -> 3072 -> GELU -> 768, residual) in one jit, 226 MB of weights: each
call reads them from memory, as the student at batch 1 does. Kernels alternated, each timed
call after an untimed one of its own (`drivlm_jax.timing`), p50. Runs the kernels under
`cpu_gemm.use("mkl")` whatever the CPU (the `mkl` wheel and a C++ compiler), and the packed
kernel where the CPU has AVX-512F (else its column is left out).
"""
if __name__ == "__main__":  # before JAX loads: the restarted process loads it once
  from drivlm_jax import host
  host.restart_with_tunables()

import argparse
import json

import jax
import numpy as np

from drivlm_jax import timing
from drivlm_jax.model import cpu_gemm, layers
from experiments import machine

SHAPES = ((768, 3072), (3072, 768), (768, 768))
LAYERS = 12


def _mlp(x, weights):
  for w1, w2 in weights:
    x = x + layers.einsum("td,df->tf", jax.nn.gelu(layers.einsum("td,df->tf", x, w1)), w2)
  return x


def _kernels(fn, x, weights) -> dict:
  """{kernel: zero-arg call} of fn(x, weights), the weights constants or arguments."""
  calls = {}
  with cpu_gemm.use("mkl"):
    if cpu_gemm.has_avx512():
      packed = jax.jit(lambda x: fn(x, weights)).lower(x).compile()
      calls["packed"] = lambda: packed(x)
    with cpu_gemm.packing(False):
      mkl = jax.jit(lambda x: fn(x, weights)).lower(x).compile()
    calls["mkl_sgemm"] = lambda: mkl(x)
  on_device = jax.device_put(weights)
  with cpu_gemm.use("xla"):
    xla = jax.jit(fn).lower(x, on_device).compile()
  calls["xla_dots"] = lambda: xla(x, on_device)
  return {name: (lambda c=c: jax.block_until_ready(c())) for name, c in calls.items()}


def _row(case, rows, flops, p50):
  row = {"case": case, "rows": rows, "gflop": flops / 1e9,
         "p50_ms": p50, "gflops_per_s": {k: flops / ms / 1e6 for k, ms in p50.items()}}
  print(f"{case:28s} {rows:5d} " + "  ".join(
      f"{k} {ms:8.3f} ms {row['gflops_per_s'][k]:5.0f}" for k, ms in p50.items()), flush=True)
  return row


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rows", default="1,50,197")
  parser.add_argument("--iters", type=int, default=15)
  parser.add_argument("--out", default="bench_gemm.json")
  args = parser.parse_args()
  rng = np.random.default_rng(0)

  def weight(k, n):
    return (rng.standard_normal((k, n), dtype=np.float32) / np.sqrt(k)).astype(np.float32)

  mlp = [(weight(768, 3072), weight(3072, 768)) for _ in range(LAYERS)]
  singles = {shape: weight(*shape) for shape in SHAPES}
  out = {"machine": machine.describe(), "rows": []}
  print("case                          rows  kernel p50 and GFLOP/s (alternated)")
  for rows in (int(r) for r in args.rows.split(",")):
    for (k, n), w in singles.items():
      x = rng.standard_normal((rows, k), dtype=np.float32)
      calls = _kernels(lambda x, w: layers.einsum("td,df->tf", x, w), x, w)
      p50 = {name: t["p50_ms"] for name, t in timing.time_backends(calls, 1, args.iters).items()}
      out["rows"].append(_row(f"gemm {k} x {n}", rows, 2 * rows * k * n, p50))
    x = rng.standard_normal((rows, 768), dtype=np.float32)
    p50 = {name: t["p50_ms"] for name, t in
           timing.time_backends(_kernels(_mlp, x, mlp), 1, args.iters).items()}
    out["rows"].append(_row(f"{LAYERS} MLP layers 768-3072-768", rows,
                            LAYERS * 2 * 2 * rows * 768 * 3072, p50))
  with open(args.out, "w") as f:
    json.dump(out, f, indent=1)


if __name__ == "__main__":
  main()
