"""Supervised losses on labelled examples only (masks come from the input pipeline)."""
import jax.numpy as jnp
import optax

from drivlm_jax.losses.masked import masked_mean

TERMS = ("action", "reason", "lm")


def task_losses(out: dict, batch: dict, terms=TERMS) -> dict:
  """Action / explanation BCE over rows whose `action_mask` / `reason_mask` is 1, and the LM
  cross-entropy over tokens whose `loss_mask` is 1 (`terms`: which of them to compute; "lm"
  needs `out["lm_logits"]`). out: `vlm.apply`'s dict."""
  bce = optax.sigmoid_binary_cross_entropy
  out_losses = {}
  if "action" in terms:
    action = bce(out["action_logits"], batch["actions"])
    out_losses["action"] = masked_mean(action, batch["action_mask"][:, None]
                                       * jnp.ones_like(action))
  if "reason" in terms:
    reason = bce(out["reason_logits"], batch["reasons"])
    out_losses["reason"] = masked_mean(reason, batch["reason_mask"][:, None]
                                       * jnp.ones_like(reason))
  if "lm" in terms:
    lm = optax.softmax_cross_entropy_with_integer_labels(out["lm_logits"], batch["targets"])
    out_losses["lm"] = masked_mean(lm, batch["loss_mask"])
  return out_losses
