"""The DriVLM parts that train beside the task: one module each, built from the config by name.

  alignment     domain-adversarial alignment: image-, token- and instance-level discriminators
                behind a gradient reversal (DANN schedule), and their consistency
  distillation  scene-aware distillation from a frozen teacher run (heads, LM tokens, visual
                tokens)
  clip          contrastive image-text fine-tuning of the vision tower (CLIP / SigLIP loss)
  entropy       entropy minimisation on the unlabelled target (a baseline, not DriVLM)
  fourier       Fourier domain adaptation: source rows redrawn in a target row's style before
                the step (an input transform, not a loss; `make_train_step(restyle=...)`)

A component is a class registered here by name. `from_config(config, cfg, feats)` returns it
when one of its loss terms has a weight > 0 in the flat mapping `config.loss`, else None. It
has named fields and offers:
  init(key)          its trained params, under `params[param_key]` (None: it has none)
  logical_axes()     their logical axis names
  frozen()           params it reads but never trains (the teacher), or None
  frozen_axes()      their logical axis names
  loss(ctx)          {term name: unweighted value}; `ctx` is a `Context`
The train step sums `config.loss[name] * value` over the task terms and every component's
terms. Adding a part is a module that calls `register` and a weight in `config.loss`; the
trainer does not change.
"""
import dataclasses

import jax

from drivlm_jax.losses import task

REGISTRY: dict = {}


def register(name: str):
  """Class decorator: `@register("alignment")` makes the class a component named `name`."""
  def add(cls):
    cls.name = name
    REGISTRY[name] = cls
    return cls
  return add


class Component:
  """Defaults for the optional parts of a component."""
  name: str = ""
  param_key: str | None = None   # where its trained params live in the train state
  key_index: int = 0             # init key: fold_in(run key, key_index)
  terms: tuple = ()              # the loss names it may return
  needs_lm = False               # whether its loss reads the LM's outputs

  def init(self, key):
    del key
    return None

  def logical_axes(self):
    return None

  def frozen(self):
    return None

  def frozen_axes(self):
    return None


@dataclasses.dataclass
class Context:
  """What a component's loss sees at one train step (inside the traced step)."""
  params: dict       # every trained param; a component's own are params[param_key]
  out: dict          # vlm.apply's outputs on the batch
  batch: dict
  step: jax.Array    # the step being taken, from 0
  frozen: dict       # {component name: its frozen params}
  metrics: dict      # extra values to log (e.g. the DANN lambda); components add to it


def build(config, cfg, feats) -> list:
  """The enabled components of `config`, in registration order. A weight in `config.loss`
  that neither the task nor a registered component claims is an error naming it."""
  claimed = set(task.TERMS)
  for cls in REGISTRY.values():
    claimed.update(cls.terms)
  unknown = sorted(set(config.loss) - claimed)
  if unknown:
    raise KeyError(f"config.loss has weight(s) for {unknown}, which no loss term of the task "
                   f"or of a registered component ({', '.join(REGISTRY)}) computes; known: "
                   f"{sorted(claimed)}")
  built = (cls.from_config(config, cfg, feats) for cls in REGISTRY.values())
  return [c for c in built if c is not None]


def weights(config, terms) -> dict:
  """{term: weight} of `terms` in `config.loss` (missing: 0)."""
  return {t: float(config.loss.get(t, 0.0)) for t in terms}


# The built-in components register themselves on import, in this order.
from drivlm_jax.adapt import contrastive, alignment, distillation, entropy  # noqa: E402,F401  pylint: disable=g-import-not-at-top,wrong-import-position
