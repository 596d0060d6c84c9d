"""Driving-instruction-guided visual token reweighting and pruning.

The instruction ("is it safe to turn left?") is embedded (mean of its LM token embeddings
over the real tokens), projected to a query, and scores every visual token by scaled dot
product with a projected key (times a learned gain that starts at 0). Training uses soft
gates `2 sigmoid(score)` (1 at the start) that multiply the tokens; deployment keeps the
`keep_ratio` best-scoring tokens (top-k: static shapes).
"""
import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from drivlm_jax.model import layers


@dataclasses.dataclass(frozen=True)
class Config:
  dim: int = 128                 # query/key width
  dtype: str = "float32"
  param_dtype: str = "float32"


class Scorer(nn.Module):
  cfg: Any

  @nn.compact
  def __call__(self, tokens, instruction_embeds, instruction_mask):
    """tokens [B, N, Dv]; instruction_embeds [B, T, Dl]; instruction_mask [B, T] -> [B, N]."""
    cfg = self.cfg
    m = instruction_mask.astype(instruction_embeds.dtype)[..., None]
    text = jnp.sum(instruction_embeds * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0)
    q = layers.dense(cfg.dim, ("embed",), ("mlp",), cfg=cfg, name="query")(text)
    k = layers.dense(cfg.dim, ("embed_vision",), ("mlp",), cfg=cfg, name="key")(tokens)
    # A learned gain that starts at 0: every gate starts at exactly 1, so adding the gates
    # (or warm-starting a tower under them) leaves the network's function unchanged at first.
    gain = layers.param(self, "gain", (), (), init=nn.initializers.zeros, dtype=cfg.param_dtype)
    logits = jnp.einsum("bd,bnd->bn", q, k).astype(jnp.float32) / math.sqrt(cfg.dim)
    return gain.astype(jnp.float32) * logits


def init(cfg: Config, key, vision_width: int, text_width: int) -> dict:
  return layers.unbox(Scorer(cfg).init(key, jnp.zeros((1, 2, vision_width)),
                                       jnp.zeros((1, 3, text_width)), jnp.ones((1, 3))))


def scores(cfg: Config, params, tokens, instruction_embeds, instruction_mask):
  """Per-token relevance scores [B, N] (logits)."""
  return Scorer(cfg).apply({"params": params}, tokens, instruction_embeds, instruction_mask)


def gates(token_scores):
  """Soft gates in (0, 2), 1 at score 0: 2 * sigmoid(scores)."""
  return 2.0 * jax.nn.sigmoid(token_scores)


def reweight(tokens, token_scores):
  """tokens [B, N, D] * gates(scores)[..., None]."""
  return tokens * gates(token_scores)[..., None].astype(tokens.dtype)


def check_keep_ratio(keep_ratio: float):
  """A fraction of the visual tokens: in (0, 1] (NaN is not)."""
  if not 0 < keep_ratio <= 1:
    raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio}")


def num_kept(num_tokens: int, keep_ratio: float) -> int:
  """ceil(N * keep_ratio), at least 1 (the product rounded to 9 digits first: 100 * 0.07 is
  7.000000000000001 in floats, 7 tokens, not 8)."""
  check_keep_ratio(keep_ratio)
  return max(1, math.ceil(round(num_tokens * keep_ratio, 9)))


def top_k(token_scores, keep_ratio: float, candidates=None):
  """Indices [B, k] int32 (into the N tokens, in their order) of the k best-scoring tokens,
  k = `num_kept` of the candidates (an index array; default: all N). Ties go to the lower
  index, as ONNX's TopK keeps them; -0.0 ties with 0.0 (XLA's top_k ranks +0 above -0, and
  a reweighting gain of 0 scores every token +-0)."""
  if candidates is None:
    candidates = np.arange(token_scores.shape[1])
  k = num_kept(len(candidates), keep_ratio)
  scores = token_scores[:, candidates]
  _, top = jax.lax.top_k(jnp.where(scores == 0, jnp.zeros_like(scores), scores), k)
  return jnp.sort(jnp.asarray(candidates, jnp.int32)[top], axis=-1)
