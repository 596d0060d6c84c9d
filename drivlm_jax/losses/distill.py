"""Scene-aware knowledge distillation from a frozen teacher VLM.

softmax_kd:  KL(softmax(t / T) || softmax(s / T)) * T^2 per LM token (Hinton et al., 2015).
sigmoid_kd:  the binary KL of the multi-label heads, KL(sigmoid(t_c / T) || sigmoid(s_c / T))
             * T^2 per class c, i.e. BCE against the teacher's soft labels minus their
             entropy, so it vanishes when student == teacher; summed over the classes
             ("sum") or averaged over them ("mean", as the task's BCE is: then a weight of 1
             puts the teacher's soft labels level with the true ones).
relation_kd: 1 - the Pearson correlation, per class over the rows of one domain, between the
             student's and the teacher's head probabilities at temperature T: the intra-class
             relation of DIST (Huang et al., NeurIPS 2022), per domain so the domains' offset
             does not count as agreement. It transfers the teacher's ranking of the images at
             any scale, where the KL is blind to a teacher whose probabilities differ only in
             their third decimal (README, "Why the student fell on some seeds").
feature_kd:  distance between the student's visual tokens (through a learned projection)
             and the teacher's, per token weighted by the reweighting scores (the scene parts
             the instruction cares about count most); cosine or MSE.
"""
import jax
import jax.numpy as jnp

from drivlm_jax.losses.masked import masked_mean


def softmax_kd(student_logits, teacher_logits, temperature=2.0, mask=None):
  """logits [..., V]; mask [...] selects positions. Mean over positions."""
  t = jax.nn.log_softmax(teacher_logits / temperature, axis=-1)
  s = jax.nn.log_softmax(student_logits / temperature, axis=-1)
  kl = jnp.sum(jnp.exp(t) * (t - s), axis=-1)
  return masked_mean(kl, mask) * temperature ** 2


def sigmoid_kd(student_logits, teacher_logits, temperature=1.0, mask=None, classes="sum"):
  """logits [B, C] of multi-label heads; mask [B] selects examples; `classes`: "sum" or
  "mean" over the C classes."""
  p = jax.nn.sigmoid(teacher_logits / temperature)
  log_p, log_1p = jax.nn.log_sigmoid(teacher_logits / temperature), jax.nn.log_sigmoid(
      -teacher_logits / temperature)
  log_q, log_1q = jax.nn.log_sigmoid(student_logits / temperature), jax.nn.log_sigmoid(
      -student_logits / temperature)
  kl = p * (log_p - log_q) + (1 - p) * (log_1p - log_1q)
  if classes == "mean":
    return masked_mean(kl, None if mask is None else mask[:, None]) * temperature ** 2
  return masked_mean(jnp.sum(kl, axis=-1), mask) * temperature ** 2


FLAT = 1e-10   # relation_kd: a class's sum of squared probability deviations, "flat" below


def relation_kd(student_logits, teacher_logits, domain, temperature=1.0, mask=None):
  """logits [B, C] of multi-label heads; domain [B] (0 source, 1 target); mask [B] selects
  rows. 1 - Pearson(sigmoid(s_c / T), sigmoid(t_c / T)) over the selected rows of each
  domain, averaged over the classes and the domains with two rows or more (0 if none).

  A teacher's class that is flat over a domain's rows (sum of squared deviations under
  `FLAT`) has no ranking to teach and is left out of that domain's mean. A flat student
  class is scored as if its deviations were `FLAT`: its gradient, which grows as 1 / its
  spread, stays bounded (Pearson's own is unbounded there). Spreads above it, a
  probability std of 1e-4 over a few rows among them, are untouched. With `mixed_precision`
  the heads' logits are bfloat16 before this float32 loss: a teacher's third-decimal
  differences keep only a few levels per class there."""
  p = jax.nn.sigmoid(teacher_logits.astype(jnp.float32) / temperature)
  q = jax.nn.sigmoid(student_logits.astype(jnp.float32) / temperature)
  mask = jnp.ones(p.shape[:1]) if mask is None else mask.astype(jnp.float32)
  total, count = 0.0, 0.0
  for d in (0, 1):
    m = (mask * (domain == d))[:, None]                            # [B, 1]
    n = jnp.sum(m)
    centre = lambda x: (x - jnp.sum(m * x, 0) / jnp.maximum(n, 1.0)) * m
    cp, cq = centre(p), centre(q)
    # (traced in 8192011's order: another rounds the gradients differently and moves the
    # demo's runs)
    cov, sp, sq = jnp.sum(cp * cq, 0), jnp.sum(cp * cp, 0), jnp.sum(cq * cq, 0)
    rho = cov / jnp.sqrt(sp * jnp.maximum(sq, FLAT) + 1e-20)
    taught = sp >= FLAT                                            # [C]
    classes = jnp.sum(taught)
    # (the mean over every class times C / the taught ones: where all are taught, the plain
    # mean's values and gradients to the bit)
    per_domain = jnp.mean(jnp.where(taught, 1.0 - rho, 0.0)) * (rho.shape[0] /
                                                                 jnp.maximum(classes, 1))
    on = ((n >= 2) & (classes > 0)).astype(jnp.float32)
    total, count = total + on * per_domain, count + on
  return total / jnp.maximum(count, 1.0)


def match_grid(tokens, grid_from: int, grid_to: int, views: int = 1):
  """Resamples [B, views * g*g, D] token grids (one per camera view, in turn) to
  [B, views * grid_to^2, D] (bilinear, view by view)."""
  if grid_from == grid_to:
    return tokens
  b, _, d = tokens.shape
  x = tokens.reshape(b * views, grid_from, grid_from, d)
  return jax.image.resize(x, (b * views, grid_to, grid_to, d), "bilinear").reshape(b, -1, d)


def feature_kd(student_tokens, teacher_tokens, projection, weights=None, kind="cosine"):
  """student_tokens [B, N, Ds] @ projection [Ds, Dt] vs teacher_tokens [B, N, Dt];
  weights [B, N] (e.g. sigmoid of the reweighting scores) or None for uniform. In float32
  whatever the tokens' dtype: a cosine distance near 0 has no digits left in bfloat16."""
  projected = student_tokens.astype(jnp.float32) @ projection.astype(jnp.float32)
  teacher = jax.lax.stop_gradient(teacher_tokens).astype(jnp.float32)
  if kind == "cosine":
    unit = lambda x: x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-6)
    per_token = 1.0 - jnp.sum(unit(projected) * unit(teacher), axis=-1)
  elif kind == "mse":
    per_token = jnp.mean((projected - teacher) ** 2, axis=-1)
  else:
    raise ValueError(f"feature KD kind must be 'cosine' or 'mse', got {kind!r}")
  if weights is None:
    return jnp.mean(per_token)
  weights = jax.lax.stop_gradient(weights)
  return jnp.sum(per_token * weights) / jnp.maximum(jnp.sum(weights), 1e-9)
