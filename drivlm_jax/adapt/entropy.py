"""Entropy minimisation on the unlabelled target (a non-adversarial UDA baseline).

Grandvalet & Bengio (2005), "Semi-supervised learning by entropy minimization", used for
domain adaptation by e.g. Long et al. (2016, RTN) and Saito et al. (2019, MME): the model is
pushed to confident predictions on target examples, so its decision boundaries move away
from where the target data lie. The heads are multi-label (sigmoid per class), so the
entropy is the binary entropy of each class's probability, summed over the classes:
  H(x) = -sum_c [p_c log p_c + (1 - p_c) log(1 - p_c)],  p = sigmoid(logits),
averaged over the target rows of the batch (`domain` = 1); source rows do not count.

Config: loss weight `entmin` in `config.loss` (the action head; `entmin_reason` for the
explanation head).
"""
import dataclasses

import jax
import jax.numpy as jnp

from drivlm_jax import adapt
from drivlm_jax.losses.masked import masked_mean


def binary_entropy(logits):
  """[B, C] logits -> [B]: the summed binary entropy of sigmoid(logits), stable in logits."""
  p = jax.nn.sigmoid(logits)
  return -jnp.sum(p * jax.nn.log_sigmoid(logits) + (1 - p) * jax.nn.log_sigmoid(-logits),
                  axis=-1)


@adapt.register("entropy")
@dataclasses.dataclass(frozen=True)
class EntropyMinimisation(adapt.Component):
  terms = ("entmin", "entmin_reason")

  @classmethod
  def from_config(cls, config, cfg, feats):
    del cfg, feats
    return cls() if any(w > 0 for w in adapt.weights(config, cls.terms).values()) else None

  def loss(self, ctx: adapt.Context) -> dict:
    target = (ctx.batch["domain"] == 1).astype(jnp.float32)
    return {"entmin": masked_mean(binary_entropy(ctx.out["action_logits"]), target),
            "entmin_reason": masked_mean(binary_entropy(ctx.out["reason_logits"]), target)}
