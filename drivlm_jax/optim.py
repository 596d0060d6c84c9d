"""Optimizer from config: warmup + cosine, AdamW, clipping, per-part learning rates and frozen
parts by path pattern, gradient accumulation.

config.optimizer:
  learning_rate, warmup_steps, weight_decay (decoupled; kernels only: `decayed`),
  grad_clip_norm, end_lr_ratio (default 0.0), grad_accum_steps (default 1), b1, b2 (optional),
  parts: [{"pattern": regex on "vision/encoder/...", "lr_mult": float, "freeze": bool}, ...]
  (first matching pattern wins; unmatched params train at the base rate).

Steps count batches. With grad_accum_steps k, an update every k of them applies the mean of
their gradients (optax.MultiSteps; each batch's loss is a mean over its own rows and tokens,
so a micro-batch with few answer tokens weighs its tokens more than one k-times batch would)
at the learning rate of its first batch: warmup and decay keep their length in batches.
"""
import re

import jax
import optax
from flax import traverse_util


def part_labels(params, parts) -> dict:
  """Tree of part names ("part0", ..., "default", "frozen") matching `params`."""
  def label(path):
    name = "/".join(path)
    for i, part in enumerate(parts):
      if re.search(part["pattern"], name):
        return "frozen" if part.get("freeze", False) else f"part{i}"
    return "default"
  flat = traverse_util.flatten_dict(params)
  return traverse_util.unflatten_dict({p: label(p) for p in flat})


def decayed(params):
  """Which params weight decay shrinks: dense and conv kernels (and distillation's
  `projection` matrix) and LoRA's factors of them, not norm scales, biases, embeddings, the
  pooling probe or the logit scale and bias (big_vision decays `.*/kernel$` alone: shrinking
  a norm's scale or CLIP's temperature is no regularisation)."""
  def matrix(path, _):
    names = [getattr(k, "key", str(k)) for k in path]
    return names[-1] in ("kernel", "projection") or names[0] == "lora"
  return jax.tree_util.tree_map_with_path(matrix, params)


def decay_matrices(rate: float) -> optax.GradientTransformation:
  """`optax.add_decayed_weights(rate)` on the `decayed` params only. Its state is the
  unmasked one's (empty), not `optax.masked`'s wrapper, so the optimizer state keeps the
  structure of `optax.adamw`'s and checkpoints written before the mask still restore."""
  def update(updates, state, params):
    keep = decayed(updates)
    return jax.tree.map(lambda u, p, k: u + rate * p if k else u, updates, params, keep), state
  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def adamw(opt_config, learning_rate) -> optax.GradientTransformation:
  """optax.adamw's chain (same state), weight decay on `decayed` params only."""
  return optax.chain(
      optax.scale_by_adam(b1=opt_config.get("b1", 0.9), b2=opt_config.get("b2", 0.999)),
      decay_matrices(opt_config.weight_decay),
      optax.scale_by_learning_rate(learning_rate))


def schedule(opt_config, total_steps: int, mult: float = 1.0):
  """Linear warmup from 0, then cosine decay to `end_lr_ratio` of the peak."""
  peak = opt_config.learning_rate * mult
  return optax.warmup_cosine_decay_schedule(
      0.0, peak, opt_config.warmup_steps, max(total_steps, opt_config.warmup_steps + 1),
      end_value=peak * opt_config.get("end_lr_ratio", 0.0))


def update_rate(opt_config, total_steps: int, mult: float = 1.0):
  """update count -> its learning rate: `schedule` at the update's first batch."""
  accum = opt_config.get("grad_accum_steps", 1)
  steps = schedule(opt_config, total_steps, mult)
  return steps if accum == 1 else lambda count: steps(count * accum)


def rate_at(opt_config, total_steps: int, done: int) -> float:
  """The learning rate of the last update applied by the time `done` batches have run."""
  accum = opt_config.get("grad_accum_steps", 1)
  return float(schedule(opt_config, total_steps)(max(done // accum - 1, 0) * accum))


def make(opt_config, params, total_steps: int) -> optax.GradientTransformation:
  rate = lambda mult: update_rate(opt_config, total_steps, mult)
  parts = [dict(p) for p in opt_config.get("parts", [])]
  transforms = {"default": adamw(opt_config, rate(1.0)), "frozen": optax.set_to_zero()}
  transforms.update({f"part{i}": adamw(opt_config, rate(p.get("lr_mult", 1.0)))
                     for i, p in enumerate(parts)})
  labels = part_labels(params, parts)
  used = set(traverse_util.flatten_dict(labels).values())
  tx = optax.chain(
      optax.clip_by_global_norm(opt_config.grad_clip_norm),
      optax.multi_transform({k: v for k, v in transforms.items() if k in used}, labels))
  accum = opt_config.get("grad_accum_steps", 1)
  return optax.MultiSteps(tx, every_k_schedule=accum) if accum > 1 else tx
