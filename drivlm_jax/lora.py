"""LoRA (Hu et al., 2021): a dense kernel W becomes W + (alpha / rank) A B, with A [in, rank]
and B [rank, out] trained and W frozen. B starts at zero, so step 0 is the base model.

config.lora: rank (0 = off), alpha, targets (a regex on "/"-joined param paths such as
"language/layers/self_attn/q_proj/kernel"; only `kernel` leaves match). LoRA params live in
`params["lora"]`, a tree that mirrors the paths of the kernels it adapts, with "a" and "b"
leaves shaped like the kernel's own axes: A [*layers, *in_dims, rank], B [*layers, rank,
*out_dims] (stacked layers keep their leading axis; a kernel's input dims are its first one,
or two for `o_proj` / `out_proj`, as HF's torch Linear layout says, or all but the last for
the patch embedding's conv kernel), so they shard by the kernel's logical axes. `merge`
folds them into the kernels (training step, evaluation, export, `hf.save_vlm`); the
optimizer freezes the adapted kernels (`frozen_pattern`).
"""
import math
import re

import jax
import jax.numpy as jnp
from flax import traverse_util
from jax.sharding import PartitionSpec

KEY_INDEX = 7   # fold_in index of the LoRA init key (components use 1..3)


def enabled(lora_config) -> bool:
  return bool(lora_config) and int(lora_config.get("rank", 0)) > 0


def _split(path, shape) -> tuple:
  """(number of leading layer axes, number of input dims) of the kernel at `path`: the
  patch embedding's [p, p, C, D] maps p * p * C inputs to D (a conv as a matmul)."""
  lead = 1 if "layers" in path else 0
  if path[-2] == "patch_embedding":
    return lead, len(shape) - lead - 1
  return lead, 2 if path[-2] in ("o_proj", "out_proj") else 1


def targets(lora_config, params) -> list:
  """The kernel paths (tuples) that `lora_config.targets` selects; none is an error."""
  pattern = re.compile(lora_config.targets)
  found = [p for p in traverse_util.flatten_dict(params)
           if p[-1] == "kernel" and p[0] != "lora" and pattern.search("/".join(p))]
  if not found:
    raise ValueError(f"lora.targets {lora_config.targets!r} matches no dense kernel")
  return found


def adapted(params) -> list:
  """The kernel paths that `params["lora"]` adapts (what the optimizer must freeze; the
  other parts of a training state, e.g. a CLIP text tower, are not the model's)."""
  return sorted({p[:-1] + ("kernel",) for p in traverse_util.flatten_dict(params["lora"])})


def frozen_pattern(paths) -> str:
  """An `optimizer.parts` pattern that freezes exactly these kernels."""
  return "^(" + "|".join(re.escape("/".join(p)) for p in paths) + ")$"


def init(lora_config, params, key) -> dict:
  """LoRA params for the targets of `params` (arrays or ShapeDtypeStructs): A uniform in
  +-1/sqrt(fan_in) (as PEFT), B zero."""
  rank, flat = int(lora_config.rank), traverse_util.flatten_dict(params)
  out = {}
  for i, path in enumerate(targets(lora_config, params)):
    shape, dtype = flat[path].shape, flat[path].dtype
    lead, n_in = _split(path, shape)
    in_dims, out_dims = shape[lead:lead + n_in], shape[lead + n_in:]
    bound = 1.0 / math.sqrt(math.prod(in_dims))
    out[path[:-1] + ("a",)] = jax.random.uniform(
        jax.random.fold_in(key, i), (*shape[:lead], *in_dims, rank), dtype, -bound, bound)
    out[path[:-1] + ("b",)] = jnp.zeros((*shape[:lead], rank, *out_dims), dtype)
  return traverse_util.unflatten_dict(out)


def logical_axes(lora_config, params, axes) -> dict:
  """PartitionSpecs of `init`'s params from the kernels' own (`axes`, same tree as params)."""
  flat_axes = traverse_util.flatten_dict(axes)
  out = {}
  for path in targets(lora_config, params):
    spec = tuple(flat_axes[path])
    lead, n_in = _split(path, spec)
    out[path[:-1] + ("a",)] = PartitionSpec(*spec[:lead + n_in], None)
    out[path[:-1] + ("b",)] = PartitionSpec(*spec[:lead], None, *spec[lead + n_in:])
  return traverse_util.unflatten_dict(out)


def merge(params, lora_config) -> dict:
  """`params` without "lora", each adapted kernel W replaced by W + (alpha / rank) A B."""
  if "lora" not in params:
    return params
  scale = float(lora_config.alpha) / int(lora_config.rank)
  flat = traverse_util.flatten_dict({k: v for k, v in params.items() if k != "lora"})
  adapters = traverse_util.flatten_dict(params["lora"])
  for path in {p[:-1] for p in adapters}:
    kernel, a, b = flat[path + ("kernel",)], adapters[path + ("a",)], adapters[path + ("b",)]
    lead, n_in = _split(path + ("kernel",), kernel.shape)
    rank = a.shape[-1]
    a2 = a.reshape(*a.shape[:lead], -1, rank)
    b2 = b.reshape(*b.shape[:lead], rank, -1)
    delta = jnp.matmul(a2, b2).reshape(kernel.shape)
    flat[path + ("kernel",)] = kernel + (scale * delta).astype(kernel.dtype)
  return traverse_util.unflatten_dict(flat)
