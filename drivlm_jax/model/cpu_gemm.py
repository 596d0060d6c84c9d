"""Float32 (and bfloat16) matmuls on oneMKL on an Intel CPU: `layers.einsum`'s GEMMs as an XLA
FFI call.

Why: on a 2-core Intel Xeon (family 6 model 167, jaxlib 0.10.2-0.12.0.1) XLA's CPU dots
(YNNPACK, or Eigen) run float32 GEMMs at 270-390 GFLOP/s where torch's MKL runs 380-445, and
no XLA flag closes that (docs/benchmarks.md). `cpu_gemm.cc` calls MKL's sequential
`cblas_sgemm` on slices of the work spread over XLA's own intra-op thread pool (a threaded
BLAS beside XLA's threads was slower: issue 18's session-32 probe with OpenBLAS). Measured
the same hour, 2 threads each, GFLOP/s XLA / this / torch: 2048^3 286 / 356 / 383;
1576x768x3072 285 / 338 / 394, its two backward forms 272-310 / 378-380 / 327-367; 50x768x3072
152 / 219 / 259 (the 50-row one is the pruned CLIP-B/16 student's), 2026-12-04. On AMD XLA's
own dots already beat torch's MKL (2048^3 on a 2-core Zen 5 EPYC: XLA 508, torch 225 GFLOP/s,
2026-12-05; the README's AMD rows), and MKL's sgemm there is slower still (the CLIP-B/16
student 186 ms on it against 93 ms on XLA's dots), so "auto" picks MKL on Intel only.

`einsum(spec, a, b)` gives the product, or None where XLA keeps it. MKL takes it when:
- the mode (`use`, else DRIVLM_CPU_GEMM: auto | mkl | xla; default auto) is "mkl", or is
  "auto" on a single-device CPU backend of an Intel CPU for a product of at least `MIN_MACS`
  multiply-adds. A sharded computation keeps XLA's dots (GSPMD cannot split a custom call;
  it would gather the operands);
- both operands are float32, or both bfloat16 on a CPU that multiplies bfloat16 in hardware
  (AMX or AVX-512 BF16: MKL's `cblas_gemm_bf16bf16f32`, accumulated and returned in float32),
  and `spec` is a (batched) GEMM that needs no transpose: batch indices first in all three
  terms, then each operand's free and contracted indices each contiguous, in the same
  contracted order in both, and the output's free indices in operand order (either operand
  first). Anything else, e.g. mixed dtypes, stays an XLA dot.

bfloat16 (mixed precision, `config.mixed_precision`): XLA's CPU dots (YNNPACK on AMX) take
the plain forms at MKL's rate but not the transposed ones, for which XLA writes a transposed
copy first, and run attention's batched bfloat16 products in float32. Same 2-core Xeon, bf16
in, float32 out, 2 threads, ms XLA / MKL (`cblas_gemm_bf16bf16f32` on AMX): 1576x768x3072
4.80 / 4.44; its weight gradient (a transposed) 24.8 / 5.1; 768x768's 6.99 / 1.47; attention's
scores 1.96 / 1.24 and values 1.87 / 0.78 (2026-12-05).

`constant_einsum(spec, a, b)` does the same for a numpy `b`, a weight that is a constant of
the computation (the deployed student's: `export.graphs.constants`), on an AVX-512 CPU: `b`
is laid out once, while tracing, in the order the FFI kernel streams it (`pack`), and each
call multiplies by it without copying it (MKL's sgemm packs its operand on every call);
onnxruntime packs its weights the same way, once, at session creation. It pays where the
weight is read from memory each call and the rows are few -- the pruned CLIP-B/16 student at
batch 1, 50 rows per GEMM on 340 MB of weights: 12 ViT-B MLP layers at 50 rows 231 GFLOP/s,
MKL's sgemm 166, XLA's dots 119; at 197 rows 278 / 287 / 252 (`python -m
experiments.bench_gemm`, 2-core Xeon, 2026-12-05; `export.kernels` times the student both
ways). The kernel is ours, not MKL's, so "auto" packs on every vendor's single-device AVX-512
CPU (`packs`): on a 2-core Zen 5 EPYC the CLIP-B/16 student at batch 1 ran 76.7 ms packed
(XLA's dots for the rest) against 88.0 on XLA's dots alone, 24.0 / 26.0 pruned to a quarter
(2026-12-05). Otherwise MKL's conditions (mode, float32, a plain GEMM) apply, and `b` must
have no batch index and not be transposed (a layer's kernel).

The kernels are compiled on first use with the C++ compiler (CXX, default `c++`) against
jaxlib's FFI headers and the `mkl` wheel (~2 s, cached in DRIVLM_CACHE or
~/.cache/drivlm_jax, keyed by source and versions); the packed kernel is in the same
library, so it needs the `mkl` wheel too, on AMD as well. In "auto" mode a missing compiler
or MKL leaves XLA's dots with one warning; in "mkl" mode it is an error.

The decision is made when a function is traced; `use(mode)` and `packing(enabled)` are part
of JAX's cache keys, so a function traced in another mode is traced again. ONNX export
traces under `use("xla")` (jax2onnx knows XLA's dots, not these calls), as does the FLOP
count of a benchmark (XLA's cost analysis does not see into them).
"""
import contextlib
import functools
import hashlib
import importlib.metadata
import logging
import math
import os
import pathlib
import shutil
import subprocess
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from drivlm_jax import host

MODES = ("auto", "mkl", "xla")
TARGET = "drivlm_cpu_gemm"
BF16_TARGET = "drivlm_cpu_gemm_bf16"
PACKED_TARGET = "drivlm_cpu_gemm_packed"
PANEL = 32   # columns per panel of a packed weight (cpu_gemm.cc's kPanel)
SOURCE = pathlib.Path(__file__).with_name("cpu_gemm.cc")
MKL_LIBS = ("libmkl_intel_lp64", "libmkl_sequential", "libmkl_core")   # .so.2 (2024-2025), .so.3
# Smaller products stay XLA dots, fused with the elementwise work around them: in jit with a
# tanh after it, on a 2-core Xeon, XLA / MKL us: 128 x 64 x 256 79 / 95, 256 x 64 x 256
# 181 / 173, 1024 x 64 x 256 330 / 300 (the demo student's own matmuls are below it).
MIN_MACS = 1 << 22
INT_MAX = 2 ** 31 - 1

# A JAX user context: part of the key of JAX's tracing, lowering and compilation caches, so a
# function traced in one mode is traced afresh in another (a context variable would hand
# `use("xla")` the jaxpr cached for MKL: custom_vjp and jit cache traces by function).
_mode = jax.make_user_context(None)
_packing = jax.make_user_context(True)


class Unavailable(RuntimeError):
  """The MKL kernel cannot be built or loaded here."""


@contextlib.contextmanager
def use(mode: str):
  """Traces inside this block use `mode` ("auto", "mkl" or "xla") instead of
  DRIVLM_CPU_GEMM."""
  with _mode(_check(mode, "cpu_gemm.use")):
    yield


@contextlib.contextmanager
def packing(enabled: bool):
  """Traces inside this block put constant weights on the packed kernel (`constant_einsum`)
  or not (then MKL's sgemm takes them as it takes any operand)."""
  with _packing(bool(enabled)):
    yield


def _check(mode, where):
  if mode not in MODES:
    raise ValueError(f"{where}: {mode!r} is not one of {MODES}")
  return mode


def mode() -> str:
  """`use`'s mode, else DRIVLM_CPU_GEMM's (read at trace time but not part of JAX's cache
  keys: set it before the process starts), else "auto"."""
  return _mode.value or _check(os.environ.get("DRIVLM_CPU_GEMM", "auto").strip().lower(),
                               "DRIVLM_CPU_GEMM")


def active() -> bool:
  """Whether GEMMs traced now go to MKL (float32; bfloat16 where `has_bf16`)."""
  current = mode()
  if current == "xla":
    return False
  if current == "mkl":
    if jax.default_backend() != "cpu":
      raise Unavailable(f"DRIVLM_CPU_GEMM=mkl needs JAX's CPU backend, not "
                        f"{jax.default_backend()}")
    _register()
    return True
  return _auto()


def packs() -> bool:
  """Whether constant weights traced now go to the packed-weight kernel (`constant_einsum`):
  on an AVX-512 CPU, with `packing` on, where MKL is `active`, and in "auto" mode on any
  vendor's single-device CPU backend (the kernel is ours, not MKL's: AMD's keep XLA's dots
  for everything else)."""
  if not _packing.value or not has_avx512():
    return False
  if mode() == "auto":
    return _loads()
  return active()


@functools.cache
def _auto() -> bool:
  return host.cpuinfo().get("vendor_id") == "GenuineIntel" and _loads()


@functools.cache
def _loads() -> bool:
  """Whether "auto" mode can use the kernels: a single-device CPU backend where they build
  and load (else XLA's dots, with one warning)."""
  if jax.default_backend() != "cpu" or jax.device_count() != 1:
    return False
  try:
    _register()
  except Unavailable as e:
    logging.warning("cpu_gemm: XLA's dots instead of our kernels: %s", e)
    return False
  return True


def _mkl_libs() -> list[pathlib.Path]:
  """The `mkl` wheel's `MKL_LIBS` (sequential LP64 cblas), whatever their soname version."""
  try:
    files = importlib.metadata.files("mkl") or []
  except importlib.metadata.PackageNotFoundError:
    raise Unavailable("the `mkl` package is not installed (pip install mkl)") from None
  found = {}
  for f in files:
    base, _, version = f.name.partition(".so.")
    if base in MKL_LIBS and version.isdigit():
      found[base] = pathlib.Path(f.locate()).resolve()
  missing = [name for name in MKL_LIBS if name not in found]
  if missing:
    raise Unavailable(f"the `mkl` package has no {', '.join(missing)}")
  return [found[name] for name in MKL_LIBS]


def _build() -> pathlib.Path:
  """The compiled kernel, built into the cache on first use."""
  libs = _mkl_libs()
  compiler = shutil.which(os.environ.get("CXX", "c++"))
  if not compiler:
    raise Unavailable(f"no C++ compiler ({os.environ.get('CXX', 'c++')}) to build {SOURCE.name}")
  key = hashlib.sha256(b"\0".join(str(x).encode() for x in (
      SOURCE.read_bytes(), jax.__version__, host.jaxlib_version(), compiler,
      importlib.metadata.version("mkl"), *libs))).hexdigest()[:16]
  cache = pathlib.Path(os.environ.get("DRIVLM_CACHE", "~/.cache/drivlm_jax")).expanduser()
  lib = cache / f"cpu_gemm-{key}.so"
  if lib.exists():
    return lib
  try:
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:   # built aside, then renamed: atomic
      out = pathlib.Path(tmp) / lib.name
      command = [compiler, "-O2", "-std=c++17", "-shared", "-fPIC", "-w",
                 f"-I{jax.ffi.include_dir()}", str(SOURCE), "-o", str(out),
                 *map(str, libs), f"-Wl,-rpath,{libs[0].parent}"]
      done = subprocess.run(command, capture_output=True, text=True, check=False)
      if done.returncode:
        raise Unavailable(f"building {SOURCE} failed ({' '.join(command)}):\n{done.stderr}")
      os.replace(out, lib)
  except OSError as e:   # e.g. a read-only home: DRIVLM_CACHE names another directory
    raise Unavailable(f"building {SOURCE} into {cache} (DRIVLM_CACHE): {e}") from None
  return lib


@functools.cache
def _register():
  import ctypes  # pylint: disable=import-outside-toplevel
  lib = _build()
  try:
    loaded = ctypes.cdll.LoadLibrary(str(lib))
    handlers = {TARGET: loaded.DrivlmCpuGemm, BF16_TARGET: loaded.DrivlmCpuGemmBf16,
                PACKED_TARGET: loaded.DrivlmCpuGemmPacked}
  except (OSError, AttributeError) as e:
    raise Unavailable(f"loading {lib}: {e}") from None
  for target, handler in handlers.items():
    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(handler), platform="cpu")


@functools.cache
def plan(spec: str):
  """(batch, contracted, a's free, b's free, ta, tb, swap) for a GEMM without transposes, or
  None. ta / tb: the operand holds its contracted indices first / last; swap: the output is
  b's free indices then a's, computed as (B^T A^T)."""
  if "->" not in spec:
    return None
  inputs, out = spec.replace(" ", "").split("->")
  sa, sb = inputs.split(",")
  if "." in sa + sb + out or any(len(set(s)) != len(s) for s in (sa, sb, out)):
    return None
  batch = "".join(i for i in out if i in sa and i in sb)
  if not (sa.startswith(batch) and sb.startswith(batch) and out.startswith(batch)):
    return None
  sa, sb, out = sa[len(batch):], sb[len(batch):], out[len(batch):]
  contracted = "".join(i for i in sa if i in sb)
  a_free, b_free = "".join(i for i in sa if i not in sb), "".join(i for i in sb if i not in sa)
  if not (contracted and a_free and b_free) or set(out) != set(a_free + b_free):
    return None
  if sa not in (a_free + contracted, contracted + a_free):
    return None
  if sb not in (contracted + b_free, b_free + contracted):
    return None
  if out not in (a_free + b_free, b_free + a_free):
    return None
  return (batch, contracted, a_free, b_free, sa != a_free + contracted,
          sb != contracted + b_free, out != a_free + b_free)


def _sizes(spec: str, a, b, groups):
  """The number of elements an index group of `spec` spans (a function of the indices), or
  None where `a` and `b` do not make `spec`'s GEMM (`groups`: its `plan`) one worth a kernel:
  other ranks, a broadcast, an empty or over-int dimension, or under MIN_MACS in "auto"."""
  batch, contracted, a_free, b_free = groups[:4]
  sa, sb = spec.replace(" ", "").split("->")[0].split(",")
  if len(sa) != a.ndim or len(sb) != b.ndim:
    return None
  sizes_a, sizes_b = dict(zip(sa, a.shape)), dict(zip(sb, b.shape))
  if any(sizes_a[i] != sizes_b[i] for i in batch + contracted):
    return None   # broadcast or mismatched: jnp.einsum's rules and errors
  sizes = {**sizes_a, **sizes_b}
  size = lambda idx: math.prod(sizes[i] for i in idx)   # noqa: E731
  nbatch, k, m, n = size(batch), size(contracted), size(a_free), size(b_free)
  if (0 in (nbatch, k, m, n) or max(k, m, n) > INT_MAX   # cblas takes int dimensions
      or (mode() == "auto" and nbatch * m * n * k < MIN_MACS)):
    return None
  return size


def einsum(spec: str, a, b):
  """`spec` of float32 `a` and `b` (or bfloat16 ones, where the CPU multiplies bfloat16:
  `has_bf16`) on MKL, accumulated and returned in float32; None where XLA keeps it."""
  if a.dtype != b.dtype or not (a.dtype == jnp.float32 or
                                (a.dtype == jnp.bfloat16 and has_bf16())):
    return None
  groups = plan(spec)
  if groups is None or not active():
    return None
  batch, contracted, a_free, b_free, ta, tb, swap = groups
  size = _sizes(spec, a, b, groups)
  if size is None:
    return None
  nbatch, k, m, n = size(batch), size(contracted), size(a_free), size(b_free)
  if swap:   # C^T = B^T A^T
    a, b, ta, tb, m, n = b, a, not tb, not ta, n, m
  first, second = (b_free, a_free) if swap else (a_free, b_free)
  # The operands and the result keep the einsum's shapes (the kernel takes the GEMM's sizes
  # as attributes). A reshape between an operand's fused producer and this call counts as a
  # fusible consumer, so XLA's fusion computed the producer twice, once into the reshape and
  # once into its other consumers: each layer's residual gradient in the CLIP ViT-B/16
  # backward. Consumed here directly, the producer is computed once.
  out = jax.ShapeDtypeStruct(tuple(size(i) for i in batch + first + second), jnp.float32)
  target = TARGET if a.dtype == jnp.float32 else BF16_TARGET
  return jax.ffi.ffi_call(target, out, vmap_method="sequential")(
      a, b, batch=np.int64(nbatch), m=np.int64(m), n=np.int64(n), k=np.int64(k), ta=ta, tb=tb)


@functools.cache
def has_bf16() -> bool:
  """Whether MKL's bfloat16 GEMM takes bfloat16 products here: an Intel CPU that multiplies
  bfloat16 in hardware (AMX or AVX-512 BF16; where it does not, MKL converts). AMD's Zen 4 has
  AVX-512 BF16 but MKL's bfloat16 speed there was not measured, so it keeps XLA's dots for
  them even with DRIVLM_CPU_GEMM=mkl. `MIN_MACS` was measured in float32 and applies to both."""
  info = host.cpuinfo()
  return (info.get("vendor_id") == "GenuineIntel"
          and bool({"amx_bf16", "avx512_bf16"} & set(info.get("flags", "").split())))


@functools.cache
def has_avx512() -> bool:
  """Whether this CPU runs the packed-weight kernel (AVX-512F)."""
  return "avx512f" in host.cpuinfo().get("flags", "").split()


def pack(b: np.ndarray) -> np.ndarray:
  """A [k, n] weight as the packed GEMM reads it: [ceil(n / PANEL), k, PANEL], each panel
  PANEL columns of every row, the last one zero-padded."""
  k, n = b.shape
  panels = -(-n // PANEL)
  padded = np.zeros((k, panels * PANEL), np.float32)
  padded[:, :n] = b
  return np.ascontiguousarray(padded.reshape(k, panels, PANEL).transpose(1, 0, 2))


def constant_einsum(spec: str, a, b: np.ndarray):
  """`spec` of float32 `a` and the constant float32 weight `b` on the packed-weight kernel;
  None where it does not apply. Differentiable in `a` (its gradient is an XLA dot)."""
  if (not isinstance(b, np.ndarray) or a.dtype != jnp.float32 or b.dtype != np.float32
      or not packs()):
    return None
  groups = plan(spec)
  if groups is None or groups[0] or any(groups[4:]):
    return None   # batch indices, a transposed operand or a swapped output: not a layer
  _, contracted, a_free, b_free, *_ = groups
  size = _sizes(spec, a, b, groups)
  if size is None:
    return None
  k, m, n = size(contracted), size(a_free), size(b_free)
  matrix = b.reshape(k, n)
  packed = pack(matrix)
  call = jax.ffi.ffi_call(PACKED_TARGET, jax.ShapeDtypeStruct((m, n), jnp.float32),
                          vmap_method="sequential")

  @jax.custom_vjp
  def product(a2):
    return call(a2, packed)

  def product_bwd(_, g):
    return (jnp.dot(g, matrix.T, preferred_element_type=jnp.float32),)

  product.defvjp(lambda a2: (product(a2), None), product_bwd)
  out = product(a.reshape(m, k))
  return out.reshape(tuple(size(i) for i in a_free + b_free))
