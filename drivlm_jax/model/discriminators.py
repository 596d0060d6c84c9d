"""Domain discriminators at three granularities, each behind a gradient-reversal layer.

image    MLP on the pooled image feature [B, D] -> [B]
token    the same MLP shape applied to every visual token [B, N, D] -> [B, N]
instance box-aligned pooling of the token grid inside each object box, then an MLP ->
         [B, M]; boxes absent from an example are masked out
A consistency term (DA Faster R-CNN) pulls the token-level domain probabilities towards the
image-level one.
"""
import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from drivlm_jax.losses import adversarial
from drivlm_jax.model import layers


@dataclasses.dataclass(frozen=True)
class Config:
  hidden: int = 256
  dtype: str = "float32"
  param_dtype: str = "float32"


class Mlp(nn.Module):
  """features [..., D] -> LayerNorm -> MLP -> domain logits [...].

  The LayerNorm keeps the min-max game bounded: behind the reversal, the features could
  otherwise win by growing without limit (the discriminator loss diverges and its reversed
  gradients swamp the task's under global-norm clipping).
  """
  cfg: Any

  @nn.compact
  def __call__(self, x):
    cfg = self.cfg
    x = layers.layer_norm(cfg, "norm", 1e-5)(x)
    h = jax.nn.relu(layers.dense(cfg.hidden, ("embed",), ("mlp",), cfg=cfg, name="fc1")(x))
    h = jax.nn.relu(layers.dense(cfg.hidden, ("mlp",), (None,), cfg=cfg, name="fc2")(h))
    return layers.dense(1, (None,), (None,), cfg=cfg, name="out")(h)[..., 0].astype(jnp.float32)


def box_pool(tokens, grid: int, boxes, box_mask, box_camera=None, views: int = 1,
             valid=None):
  """Mean of the token grid inside each box, weighted by each cell's overlap with the box.

  tokens [B, views*grid*grid, D] (each view's row-major cells in turn); boxes [B, M, 4]
  normalised (x1, y1, x2, y2) in the image of view `box_camera` [B, M] (int; None for one
  view); box_mask [B, M]; valid [views*grid*grid] 0/1, the cells that hold a token (None:
  all). Returns [B, M, D]; a masked or empty box gives zeros.
  """
  edges = jnp.arange(grid + 1, dtype=jnp.float32) / grid
  lo, hi = edges[:-1], edges[1:]

  def overlap(a, b):  # [B, M] box extent vs [grid] cells -> [B, M, grid]
    return jnp.clip(jnp.minimum(b[..., None], hi) - jnp.maximum(a[..., None], lo), 0.0, None)

  wx = overlap(boxes[..., 0], boxes[..., 2])
  wy = overlap(boxes[..., 1], boxes[..., 3])
  weights = (wy[..., :, None] * wx[..., None, :]).reshape(*boxes.shape[:2], grid * grid)
  if views > 1:   # the box's cells in its own view's grid: [B, M, views * grid * grid]
    camera = jax.nn.one_hot(box_camera, views, dtype=weights.dtype)
    weights = (camera[..., None] * weights[..., None, :]).reshape(*boxes.shape[:2], -1)
  weights = weights * box_mask[..., None]
  if valid is not None:
    weights = weights * valid
  total = jnp.sum(weights, axis=-1, keepdims=True)
  weights = jnp.where(total > 0, weights / jnp.maximum(total, 1e-12), 0.0)
  return jnp.einsum("bmn,bnd->bmd", weights.astype(tokens.dtype), tokens)


class Discriminators(nn.Module):
  cfg: Any
  grid: int        # `cells` is a grid x grid raster per view
  views: int = 1

  @nn.compact
  def __call__(self, pooled, tokens, cells, boxes, box_mask, lam, box_camera=None, valid=None):
    reverse = lambda x: adversarial.grad_reverse(x, lam)
    instances = box_pool(reverse(cells), self.grid, boxes, box_mask, box_camera, self.views,
                         valid)
    return {
        "image": Mlp(self.cfg, name="image")(reverse(pooled)),
        "token": Mlp(self.cfg, name="token")(reverse(tokens)),
        "instance": Mlp(self.cfg, name="instance")(instances),
    }


def _dummy(width, grid, max_boxes):
  tokens = jnp.zeros((1, grid * grid, width))
  return (jnp.zeros((1, width)), tokens, tokens, jnp.zeros((1, max_boxes, 4)),
          jnp.zeros((1, max_boxes)), jnp.float32(1.0))


def init(cfg: Config, key, width: int, grid: int, max_boxes: int = 1) -> dict:
  return layers.unbox(Discriminators(cfg, grid).init(key, *_dummy(width, grid, max_boxes)))


def logical_axes(cfg: Config, width: int, grid: int, max_boxes: int = 1):
  return layers.logical_axes(Discriminators(cfg, grid).init, jax.random.key(0),
                             *_dummy(width, grid, max_boxes))


def apply(cfg: Config, params, pooled, tokens, cells, grid, boxes, box_mask, lam,
          box_camera=None, views: int = 1, valid=None) -> dict:
  """-> {"image": [B], "token": [B, N], "instance": [B, M]} domain logits; gradients reaching
  `pooled`, `tokens` and `cells` (the tokens on the patch grids, `vlm.on_grid`, with `valid`
  its cells that hold one) are reversed and scaled by `lam`. With `views` > 1 the grids are
  that many views' and `box_camera` [B, M] says in which view each box lies."""
  return Discriminators(cfg, grid, views).apply({"params": params}, pooled, tokens, cells,
                                                boxes, box_mask, jnp.asarray(lam, jnp.float32),
                                                box_camera, valid)


def losses(logits, domain, box_mask, focal_gamma=None, consistency=True) -> dict:
  """Domain losses per level (BCE, or focal with `focal_gamma` at the image level) and the
  image/token consistency term (squared difference of probabilities)."""
  image = (adversarial.domain_focal(logits["image"], domain, focal_gamma) if focal_gamma
           else adversarial.domain_bce(logits["image"], domain))
  out = {"image": image,
         "token": adversarial.domain_bce(logits["token"], domain),
         "instance": adversarial.domain_bce(logits["instance"], domain, box_mask)}
  if consistency:
    p_image = jax.nn.sigmoid(logits["image"])[:, None]
    out["consistency"] = jnp.mean((jax.nn.sigmoid(logits["token"]) - p_image) ** 2)
  return out


def confusion(logits, box_mask) -> dict:
  """The features' non-saturating domain-confusion loss per level
  (`adversarial.domain_confusion`; masked boxes drop out at the instance level)."""
  return {"image": adversarial.domain_confusion(logits["image"]),
          "token": adversarial.domain_confusion(logits["token"]),
          "instance": adversarial.domain_confusion(logits["instance"], box_mask)}
