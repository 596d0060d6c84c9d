"""Supervised losses on labelled examples only (masks come from the input pipeline)."""
import jax.numpy as jnp
import optax


def _masked_mean(values, mask):
  return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def task_losses(out: dict, batch: dict) -> dict:
  """Action / explanation BCE over rows whose `action_mask` / `reason_mask` is 1, and the LM
  cross-entropy over tokens whose `loss_mask` is 1. out: `vlm.apply`'s dict."""
  bce = optax.sigmoid_binary_cross_entropy
  action = bce(out["action_logits"], batch["actions"])
  reason = bce(out["reason_logits"], batch["reasons"])
  lm = optax.softmax_cross_entropy_with_integer_labels(out["lm_logits"], batch["targets"])
  return {
      "action": _masked_mean(action, batch["action_mask"][:, None] * jnp.ones_like(action)),
      "reason": _masked_mean(reason, batch["reason_mask"][:, None] * jnp.ones_like(reason)),
      "lm": _masked_mean(lm, batch["loss_mask"]),
  }
