"""Evaluators by name, as big_vision's `config.evals`:

  config.evals.<name> = dict(type="heads"|"generation", every=N, role=..., split=..., ...)

`type` picks a registered class; `every` (default: `config.eval_every_steps`) is its own
schedule, and every evaluator also runs at the last step. Each evaluator scores one role
("source" | "target") and split of the run's data and returns {metric: value}; the results
of one evaluation merge into `{split: {domain: metrics}}` (eval.json), where `domain`
defaults to the role. Adding one is a module that calls `register` and a config entry.
"""
import dataclasses

REGISTRY: dict = {}


def register(name: str):
  """Class decorator: `@register("heads")` makes the class the evaluator type `name`."""
  def add(cls):
    REGISTRY[name] = cls
    return cls
  return add


@dataclasses.dataclass(frozen=True)
class Evaluator:
  """Fields every evaluator has; subclasses add theirs (with defaults) and `run`."""
  name: str
  every: int
  role: str                 # "source" | "target"
  split: str = "test"
  domain: str = ""          # the key in eval.json (default: the role)
  batch_size: int = 32

  @property
  def key(self):
    return self.split, self.domain or self.role

  def run(self, cfg, params, data, feats) -> dict:
    """-> {metric: value} in points; `data` is `sources.prepare`'s dict."""
    raise NotImplementedError


def from_config(config) -> list:
  """The evaluators of `config.evals`, in config order."""
  out = []
  for name, spec in config.get("evals", {}).items():
    spec = dict(spec)
    kind = spec.pop("type", None)
    if kind not in REGISTRY:
      raise ValueError(f"config.evals.{name}.type is {kind!r}; known: {sorted(REGISTRY)}")
    every = int(spec.pop("every", config.eval_every_steps))
    fields = {f.name for f in dataclasses.fields(REGISTRY[kind])} - {"name", "every"}
    unknown = sorted(set(spec) - fields)
    if unknown:
      raise ValueError(f"config.evals.{name}: unknown key(s) {unknown} for type {kind!r}; "
                       f"known: {sorted(fields)}")
    out.append(REGISTRY[kind](name=name, every=every, **spec))
  return out


# The built-in evaluators register themselves on import.
from drivlm_jax.evals import generation, heads  # noqa: E402,F401  pylint: disable=wrong-import-position
