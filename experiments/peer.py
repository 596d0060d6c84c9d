"""The peer (HF transformers + PyTorch) on the hardware JAX computes on, at its best there.

On CPU: torch's threads = cores (the benchmarks set OMP_WAIT_POLICY=PASSIVE before torch
starts). Where JAX's default backend is an NVIDIA GPU: the peer's modules and tensors on
that GPU, float32 matmuls in TF32 as JAX's default precision computes them on Ampere and
later GPUs (the same arithmetic on both sides; with `JAX_DEFAULT_MATMUL_PRECISION=highest`
both compute full float32), and every timed peer call ends in
`torch.cuda.synchronize()`, as ours end in `block_until_ready`: the work is timed, not its
launch.
"""
import os

import jax
import torch

from experiments import machine

# JAX_DEFAULT_MATMUL_PRECISION values whose float32 matmuls are full float32 on a GPU, and
# those that are TF32 there (XLA's default precision); the peer is set to match.
FULL_FP32 = ("highest", "float32", "F32_F32_F32")
TF32 = (None, "default", "fastest", "bfloat16")


def device() -> str:
  """`cuda` where JAX computes on a GPU, `cpu` where it computes on the CPU. Another backend,
  or a GPU for JAX with a torch built without CUDA, is an error: the comparison would pit
  that device against a CPU."""
  backend = jax.default_backend()
  if backend == "cpu":
    return "cpu"
  if backend != "gpu":
    raise RuntimeError(f"JAX computes on {backend}: the peer (PyTorch) can be timed beside it "
                       "on the CPU or an NVIDIA GPU only")
  if not torch.cuda.is_available():
    raise RuntimeError(f"JAX computes on {jax.devices()[0].device_kind} but torch "
                       f"{torch.__version__} sees no CUDA GPU: install a CUDA build of torch "
                       "to benchmark against the peer on the same GPU")
  return "cuda"


def setup() -> str:
  """Puts torch at its best on `device()`, in JAX's float32 matmul precision there, and
  returns that device."""
  where = device()
  if where == "cpu":
    torch.set_num_threads(os.cpu_count())
  else:
    precision = jax.config.jax_default_matmul_precision
    if precision not in FULL_FP32 + TF32:
      raise ValueError(f"JAX_DEFAULT_MATMUL_PRECISION={precision!r}: the peer matches only "
                       f"full float32 {FULL_FP32} or TF32 (unset, {TF32[1:]})")
    full = precision in FULL_FP32
    torch.set_float32_matmul_precision("highest" if full else "high")
    torch.backends.cudnn.allow_tf32 = not full
  return where


def synced(fn, where: str):
  """`fn` as a timed call: on a GPU it returns once the GPU's work is done."""
  if where == "cpu":
    return fn

  def call():
    out = fn()
    torch.cuda.synchronize()
    return out
  return call


def describe(where: str) -> dict:
  """`machine.describe()` plus the GPU both sides ran on (`accelerator`, None on CPU), for a
  benchmark's JSON and its first line (`machine.line`)."""
  gpu = None
  if where != "cpu":
    props = torch.cuda.get_device_properties(0)
    gpu = {"jax_device": jax.devices()[0].device_kind, "torch_device": props.name,
           "memory_gib": props.total_memory / 2 ** 30,
           "jax_default_matmul_precision": jax.config.jax_default_matmul_precision,
           "torch_float32_matmul_precision": torch.get_float32_matmul_precision()}
  return {**machine.describe(), "accelerator": gpu}


def float32_matmuls(where: str) -> str:
  """What a float32 matmul computes in on `where` in this process: "fp32" or "TF32"."""
  full = where == "cpu" or torch.get_float32_matmul_precision() == "highest"
  return "fp32" if full else "TF32"
