"""Domain-adversarial alignment at three granularities (DriVLM part 2).

Discriminators on the student's visual tokens tell source from target at the image level
(the mean of the token map: a global feature of the image, as DA Faster R-CNN's image
level), the token level (every visual token) and the instance level (tokens pooled inside
the object boxes), behind a gradient reversal whose strength follows the DANN schedule
lam(p) = 2 / (1 + exp(-10 p)) - 1. The progress p runs over the steps after `config.da.start`
(a fraction of training): the discriminators train from step 0, the reversal acts once the
task features exist. With `da_consistency` the image- and token-level predictions are also
pulled together.

`config.da.objective` says what the features minimise:
  reversal   the discriminators' own BCE behind the reversal (DANN; the paper's form)
  confusion  the non-saturating domain-confusion loss of Tzeng et al. (2015) on the frozen
             discriminators, scaled by the same lam(p), while the discriminators learn their BCE
             on detached features (losses/adversarial.py). Behind the reversal the features'
             gradient vanishes once the discriminators are confident; here it does not.
The logged `loss_da_<level>` is the discriminator's BCE (+ the confusion term, also logged
alone as `da_<level>_confusion`, under `confusion`).

Config: loss weights `da_image`, `da_token`, `da_instance`, `da_consistency` in `config.loss`;
`config.da = dict(hidden, focal_gamma, start, objective)`.
"""
import dataclasses

import jax
import jax.numpy as jnp

from drivlm_jax import adapt
from drivlm_jax.losses import adversarial
from drivlm_jax.model import discriminators, vlm

LEVELS = ("image", "token", "instance", "consistency")
OBJECTIVES = ("reversal", "confusion")


def image_level(visual_tokens):
  """[B, N, D] -> [B, D]: the image-level feature the image discriminator sees."""
  return jnp.mean(visual_tokens, axis=1)


@adapt.register("alignment")
@dataclasses.dataclass(frozen=True)
class Alignment(adapt.Component):
  dcfg: discriminators.Config
  weights: dict          # {da_<level>: weight}
  focal_gamma: float     # > 0: focal loss at the image level
  start: float           # fraction of training before the reversal ramps up
  total_steps: int
  width: int             # visual token width
  grid: int              # the visual tokens form a grid x grid raster per camera
  max_boxes: int
  views: int             # cameras; the boxes' `box_camera` says whose grid they lie in
  model: vlm.Config      # where the visual tokens lie on the grids (vlm.on_grid)
  objective: str = "reversal"   # OBJECTIVES

  param_key = "discriminators"
  key_index = 1
  terms = tuple(f"da_{level}" for level in LEVELS)

  @classmethod
  def from_config(cls, config, cfg, feats):
    weights = adapt.weights(config, cls.terms)
    if not any(w > 0 for w in weights.values()):
      return None
    da = config.get("da", {})
    objective = da.get("objective", "reversal")
    if objective not in OBJECTIVES:
      raise ValueError(f"config.da.objective {objective!r}: known {', '.join(OBJECTIVES)}")
    return cls(discriminators.Config(hidden=da.get("hidden", 256)), weights,
               float(da.get("focal_gamma", 0.0)), float(da.get("start", 0.0)),
               int(config.total_steps), cfg.language.hidden_size, cfg.vision.grid,
               feats.max_boxes, cfg.num_cameras, cfg, objective)

  def init(self, key):
    return discriminators.init(self.dcfg, key, self.width, self.grid, self.max_boxes)

  def logical_axes(self):
    return discriminators.logical_axes(self.dcfg, self.width, self.grid, self.max_boxes)

  def loss(self, ctx: adapt.Context) -> dict:
    progress = (ctx.step / self.total_steps - self.start) / (1.0 - self.start)
    lam = adversarial.dann_lambda(jnp.clip(progress, 0.0, 1.0))
    tokens = ctx.out["visual_tokens"]
    pooled = image_level(tokens)
    params = ctx.params[self.param_key]
    box_mask = ctx.batch["box_mask"]

    def logits(params, pooled, tokens, reverse):
      """`apply` multiplies the gradient reaching the features by -reverse."""
      cells, valid = vlm.on_grid(self.model, tokens)
      return discriminators.apply(self.dcfg, params, pooled, tokens, cells, self.grid,
                                  ctx.batch["boxes"], box_mask, reverse,
                                  ctx.batch["box_camera"], self.views, valid)
    consistency = self.weights["da_consistency"] > 0
    if self.objective == "reversal":
      out, confused = logits(params, pooled, tokens, lam), {}
    else:   # the discriminators on detached features; the features on frozen discriminators
      stop = jax.lax.stop_gradient
      out = logits(params, stop(pooled), stop(tokens), 0.0)
      confused = discriminators.confusion(logits(stop(params), pooled, tokens, -lam), box_mask)
    losses = discriminators.losses(out, ctx.batch["domain"], box_mask, self.focal_gamma or None,
                                   consistency)
    for level, value in confused.items():
      ctx.metrics[f"da_{level}_confusion"] = value
      losses[level] = losses[level] + value
    ctx.metrics["da_lambda"] = lam
    return {f"da_{k}": v for k, v in losses.items()}
