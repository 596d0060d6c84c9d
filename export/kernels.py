"""The deployed JAX student compiled with the fastest of XLA's CPU kernel policies here.

XLA's CPU backend (jaxlib 0.10.2) hands each matmul to YNNPACK on its own by default (the
profiler shows `ynn_fusion` thunks) and can instead fuse matmuls with the elementwise ops
around them into larger YNNPACK subgraphs (`xla_cpu_experimental_ynn_fusion_type=
LIBRARY_FUSION_TYPE_DOT`). Which is faster depends on the CPU and the shapes: on a 2-core
AMD EPYC (Zen 4), the CLIP-B/16 student at batch 1 ran 63.2 ms by default and 55.1 ms with
the dot fusions when pruned to a quarter of its tokens (50 rows per matmul), but 202 ms vs
244 ms unpruned (197 rows). So, as TensorRT's builder does, the choice is measured: every
candidate is compiled from one lowering and timed on the given inputs (settled,
alternated), and the fastest is kept. Outputs differ between the two by float rounding only
(3e-6 on the CLIP-B/16 student's probabilities).

Where `cpu_gemm` puts float32 matmuls on MKL (an Intel CPU) or the student's constant weights
on its packed-weight kernel (any vendor's AVX-512 CPU), each policy is also tried on a
lowering with XLA's own dots throughout ("xla_dots/" + name), and, where both are on, the
default policy on a lowering that leaves the constant weights to MKL's sgemm
("mkl_sgemm/default"). On a 2-core Xeon, CLIP-B/16 student at
batch 1, p50 ms packed / MKL's sgemm / XLA's dots: unpruned 132.1 / 138.0 / 149.3, pruned to
a quarter 41.5 / 53.9 / 53.5 (`python -m experiments.bench_export --vit-b16`, 2026-12-04). On
a 2-core Zen 5 EPYC, packed (XLA's dots for the rest) / XLA's dots: 76.7 / 88.0 and 24.0 /
26.0 (2026-12-05).
"""
import jax

from drivlm_jax import timing
from drivlm_jax.model import cpu_gemm

YNN_DOT_FUSIONS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"}
CPU_CANDIDATES = {"default": {}, "ynn_dot_fusions": YNN_DOT_FUSIONS}


def fastest(fn, args, candidates: dict = CPU_CANDIDATES, iters: int = 10):
  """(compiled `fn` at `args`, its candidate's name, {name: p50 ms}): on a CPU backend the
  fastest of `candidates` ({name: XLA compile options}, and "xla_dots/" + name where
  `cpu_gemm` is active or packs a weight of `fn`, and "mkl_sgemm/default" where both; each timed
  `iters` rounds, untimed when only one compiles);
  elsewhere XLA's default."""
  lowered = jax.jit(fn).lower(*args)
  if jax.default_backend() != "cpu":
    return lowered.compile(), "xla", {}
  lowerings = {"": (lowered, candidates)}
  packed = cpu_gemm.packs() and cpu_gemm.PACKED_TARGET in _asm(lowered)   # a weight is packed
  if cpu_gemm.active() or packed:
    with cpu_gemm.use("xla"):
      lowerings["xla_dots/"] = (jax.jit(fn).lower(*args), candidates)
  if cpu_gemm.active() and packed:
    with cpu_gemm.packing(False):
      lowerings["mkl_sgemm/"] = (jax.jit(fn).lower(*args), {"default": {}})
  compiled = {}
  for prefix, (one_lowering, options_by_name) in lowerings.items():
    for name, options in options_by_name.items():
      try:
        compiled[prefix + name] = one_lowering.compile(compiler_options=options)
      except jax.errors.JaxRuntimeError as e:   # an XLA without this option
        print(f"export.kernels: {prefix + name} unavailable in this jaxlib: "
              f"{str(e).splitlines()[0]}")
  if not compiled:
    raise ValueError(f"none of the XLA kernel options {candidates} compiles here")
  if len(compiled) == 1:
    (name, one), = compiled.items()
    return one, name, {}
  calls = {name: (lambda c=c: jax.block_until_ready(c(*args))) for name, c in compiled.items()}
  p50 = {name: t["p50_ms"] for name, t in timing.time_backends(calls, 1, iters).items()}
  best = min(p50, key=p50.get)
  return compiled[best], best, p50


def _asm(lowered) -> str:
  """The lowering's StableHLO text with large constants elided (the student's weights would
  print as hundreds of MB of hex)."""
  return lowered.compiler_ir("stablehlo").operation.get_asm(large_elements_limit=16)


def gflops(fn, args, batch: int) -> float:
  """XLA's flop count of one call of `fn` at `args` / 1e9 / batch, counted on XLA's own dots
  (its cost analysis does not see into `cpu_gemm`'s MKL calls)."""
  with cpu_gemm.use("xla"):
    cost = jax.jit(fn).lower(*args).cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get("flops", float("nan"))) / 1e9 / batch
