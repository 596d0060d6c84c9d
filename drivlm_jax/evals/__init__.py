"""Evaluators by name, as big_vision's `config.evals`:

  config.evals.<name> = dict(type="heads"|"generation", every=N, role=..., split=..., ...)

`type` picks a registered class; `every` (default: `config.eval_every_steps`) is its own
schedule, and every evaluator also runs at the last step. Each evaluator scores one role
("source" | "target") and split of the run's data and returns {metric: value}; the results
of one evaluation merge into `{split: {domain: metrics}}` (eval.json), where `domain`
defaults to the role. Adding one is a module that calls `register` and a config entry.
"""
import dataclasses

import grain
import jax
import numpy as np
from jax.experimental import multihost_utils

from drivlm_jax.data import pipeline

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

  def run(self, cfg, params, data, feats, place=None, workdir=None) -> dict:
    """-> {metric: value} in points; `data` is `sources.prepare`'s dict; `place` (host batch
    -> global arrays on the mesh, as in training) shards the batches over every host;
    `workdir` is where an evaluator may write a file of its own (a benchmark's submission)."""
    raise NotImplementedError


def host_batches(spec, feats, batch_size: int):
  """This host's share of one pass over `spec`, as (batch, valid) with `batch_size /
  process_count` rows each: every host yields as many batches (the hosts' shards may differ
  by one example), rows past a host's data repeat its last example with `valid` 0."""
  count, index = jax.process_count(), jax.process_index()
  rows = max(1, batch_size // count)
  shards = [pipeline.batch_dataset(spec, feats, rows, train=False, shard_index=i,
                                   shard_count=count) for i in range(count)]
  mine = shards[index]
  if count == 1:   # one host: batches as they come (the last may be short), read ahead
    for batch in mine.to_iter_dataset(grain.ReadOptions(num_threads=pipeline.READ_THREADS,
                                                          prefetch_buffer_size=4)):
      yield batch, np.ones(len(batch["image"]), bool)
    return
  pad = lambda x: np.concatenate([x, np.repeat(x[-1:], rows - len(x), axis=0)])
  # A host past the data (a split smaller than the hosts' rows) pads with another shard's
  # first batch, all rows invalid: every host must join each gather.
  last = mine[0] if len(mine) else next(ds[0] for ds in shards if len(ds))
  for i in range(max(len(ds) for ds in shards)):
    batch = mine[i] if i < len(mine) else last
    last = batch
    n = len(batch["image"]) if i < len(mine) else 0
    yield {k: pad(v) for k, v in batch.items()}, np.arange(rows) < n


def gather(x) -> np.ndarray:
  """Every host's rows of `x` (a global array, or this host's numpy rows), in one array."""
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def from_config(config) -> list:
  """The evaluators of `config.evals`, in config order."""
  out = []
  for name, spec in config.get("evals", {}).items():
    spec = dict(spec)
    kind = spec.pop("type", None)
    if kind not in REGISTRY:
      raise ValueError(f"config.evals.{name}.type is {kind!r}; known: {sorted(REGISTRY)}")
    every = int(spec.pop("every", config.eval_every_steps))
    if every < 1:
      raise ValueError(f"config.evals.{name}.every (default config.eval_every_steps) is "
                       f"{every}: at least 1")
    fields = {f.name for f in dataclasses.fields(REGISTRY[kind])} - {"name", "every"}
    unknown = sorted(set(spec) - fields)
    if unknown:
      raise ValueError(f"config.evals.{name}: unknown key(s) {unknown} for type {kind!r}; "
                       f"known: {sorted(fields)}")
    out.append(REGISTRY[kind](name=name, every=every, **spec))
  return out


# The built-in evaluators register themselves on import.
from drivlm_jax.evals import drivelm, generation, heads  # noqa: E402,F401  pylint: disable=wrong-import-position
