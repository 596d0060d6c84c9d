"""Reading a finished run back: its config and the model params of a checkpoint.

A run directory (what `drivlm_jax.train` writes) holds `config.json` and `checkpoints/<step>`;
any such directory can serve as a distillation teacher, an evaluation target or an export
source.
"""
import json
import os

import jax
import ml_collections
import orbax.checkpoint as ocp

from drivlm_jax.model import vlm


class RunError(FileNotFoundError):
  pass


def run_config(workdir: str) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise RunError(f"{path} not found: {workdir} is not a run directory of drivlm_jax.train")
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def _flat(tree, prefix=""):
  if not isinstance(tree, dict):
    return {prefix[:-1]: tree}
  out = {}
  for key, value in tree.items():
    out.update(_flat(value, f"{prefix}{key}."))
  return out


def config_changes(workdir: str, config) -> list:
  """Dotted keys whose value in `config` differs from the run's config.json."""
  with open(os.path.join(workdir, "config.json")) as f:
    stored = _flat(json.load(f))
  current = _flat(json.loads(config.to_json_best_effort()))
  return sorted(k for k in set(stored) | set(current) if stored.get(k) != current.get(k))


def finished(workdir: str, config) -> bool:
  """Whether `workdir` holds an evaluation of `config`'s final step (a run to reuse, not
  retrain). Reusing a run trained with another config says which keys differ."""
  path = os.path.join(workdir, "eval.json")
  if not os.path.exists(path):
    return False
  with open(path) as f:
    if json.load(f).get("step") != config.total_steps:
      return False
  changes = config_changes(workdir, config)
  if changes:
    print(f"warning: reusing the finished run in {workdir}, trained with another config "
          f"(differs at {', '.join(changes[:8])}{' ...' if len(changes) > 8 else ''}); "
          f"delete it or use another workdir to retrain", flush=True)
  return True


def load_params(workdir: str, cfg: vlm.Config, step: int | None = None):
  """Model params of the latest (or `step`) checkpoint of `workdir` -> (params, step).

  Optimizer state and extra param groups (discriminators, distillation projection) are
  skipped. A run trained with `ema_decay` > 0 gives its moving-average params (what it was
  evaluated with). Arrays come back on the default device.
  """
  key = "ema" if run_config(workdir).get("ema_decay", 0.0) else "params"
  directory = os.path.join(os.path.abspath(workdir), "checkpoints")
  manager = ocp.CheckpointManager(directory)
  try:
    step = manager.latest_step() if step is None else step
    if step is None:
      raise RunError(f"{directory} holds no checkpoint")
    item = {key: jax.eval_shape(lambda k: vlm.init(cfg, k), jax.random.key(0))}
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item=item, restore_args=jax.tree.map(lambda _: ocp.ArrayRestoreArgs(), item),
        partial_restore=True)))
  finally:
    manager.close()
  return restored["state"][key], step
