"""Device mesh, logical-axis rules and shardings, multi-host set-up.

The mesh has axes (data, fsdp, tensor) built with `AxisType.Auto`; `-1` takes the devices
left over. Logical names on params and activations (see `model/layers.py`) map to mesh axes
by rules: the batch over data x fsdp, `embed` over fsdp (FSDP), `mlp`/`heads`/`vocab` over
tensor (tensor parallelism).
"""
import math
import os

import flax.linen as nn
from absl import logging
from flax import traverse_util
import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec

AXES = ("data", "fsdp", "tensor")
DEFAULT_RULES = (
    ("batch", ("data", "fsdp")), ("embed", "fsdp"), ("embed_vision", "fsdp"),
    ("mlp", "tensor"), ("heads", "tensor"), ("vocab", "tensor"), ("kv_heads", None),
    ("kv", None), ("layers", None), ("length", None), ("proj", None))


def maybe_initialize_distributed(multihost: bool | str | None = None):
  """`jax.distributed.initialize()` when asked to (multihost True / "true"), or, with None /
  "auto", when a cluster environment says so.

  JAX detects Slurm and Cloud TPU itself; elsewhere (e.g. SkyPilot GPU nodes) set
  JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID."""
  cluster = any(k in os.environ for k in ("JAX_COORDINATOR_ADDRESS", "SLURM_JOB_ID",
                                          "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS"))
  choice = {"true": True, "false": False, "auto": None, "none": None}.get(str(multihost).lower())
  if choice is None and str(multihost).lower() not in ("auto", "none"):
    raise ValueError(f"config.multihost={multihost!r}: use true, false or auto")
  if choice or (choice is None and cluster):
    env = {k: int(os.environ[v]) for k, v in (("num_processes", "JAX_NUM_PROCESSES"),
                                              ("process_id", "JAX_PROCESS_ID"))
           if v in os.environ}
    jax.distributed.initialize(**env)


def mesh_shape(mesh_config, num_devices: int) -> tuple:
  sizes = [int(mesh_config[a]) for a in AXES]
  if sizes.count(-1) > 1:
    raise ValueError(f"mesh {dict(zip(AXES, sizes))}: at most one axis may be -1")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise ValueError(f"mesh {dict(zip(AXES, sizes))}: {num_devices} devices are not a "
                       f"multiple of {known}")
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) > num_devices:
    raise ValueError(f"mesh {dict(zip(AXES, sizes))} needs {math.prod(sizes)} devices, "
                     f"{num_devices} available")
  return tuple(sizes)


def make_mesh(mesh_config) -> jax.sharding.Mesh:
  """The mesh over all devices; a fully explicit smaller mesh uses the first devices (for
  debugging and equivalence checks) and says so."""
  shape = mesh_shape(mesh_config, jax.device_count())
  devices = jax.devices()[:math.prod(shape)]
  if len(devices) < jax.device_count():
    logging.warning("mesh %s uses %d of %d devices", shape, len(devices), jax.device_count())
  return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * len(AXES), devices=devices)


def rules_from_config(config_rules=None) -> tuple:
  return tuple((k, tuple(v) if isinstance(v, list) else v)
               for k, v in (config_rules or DEFAULT_RULES))


def param_shardings(logical_specs, mesh, rules):
  """Tree of NamedShardings from a tree of logical PartitionSpecs."""
  return nn.logical_to_mesh_sharding(logical_specs, mesh, rules)


def check_shardable(shapes, shardings, logical):
  """A ValueError naming the param, its dimension, logical axis and mesh axes when a sharded
  dimension does not divide by them (jit's own error names neither the param nor what to
  change). `shapes`, `shardings` and `logical` are nested dicts of the same keys."""
  flat = traverse_util.flatten_dict
  sharding_of, names_of = flat(shardings), flat(logical)
  for path, shape in flat(shapes).items():
    spec, names = sharding_of[path].spec, tuple(names_of[path])
    for dim, (size, axes) in enumerate(zip(shape.shape, spec)):
      axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
      ways = math.prod(sharding_of[path].mesh.shape[a] for a in axes)
      if size % ways:
        raise ValueError(
            f"{'/'.join(path)} {tuple(shape.shape)}: dimension {dim} (logical "
            f"{names[dim]!r}, {size}) does not split over mesh axes {axes} ({ways} ways): "
            f"change config.mesh or config.rules, or the model's size")


def like_params(tree, params, mesh):
  """Shardings for a tree whose leaves mirror the params (optimizer state: Adam's mu and nu):
  a leaf whose key path ends with a param's path, with its shape, gets that param's sharding;
  any other leaf (counts, scalars) is replicated. Without this, `jit(tx.init)` leaves the
  optimizer state replicated on every device even when the params are FSDP-sharded."""
  keystr = jax.tree_util.keystr
  by_path = {keystr(path): x for path, x in jax.tree_util.tree_flatten_with_path(params)[0]}

  def pick(path, leaf):
    key = keystr(path)
    matches = [p for p, x in by_path.items() if key.endswith(p) and x.shape == leaf.shape]
    return by_path[max(matches, key=len)].sharding if matches else replicated(mesh)
  return jax.tree_util.tree_map_with_path(pick, tree)


def batch_sharding(mesh, rules) -> NamedSharding:
  """Leading (batch) dim split as the `batch` rule says, other dims replicated."""
  return NamedSharding(mesh, nn.logical_to_mesh_axes(("batch",), rules))


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def put_batch(batch: dict, sharding: NamedSharding) -> dict:
  """Host-local numpy batch -> global jax arrays (each host holds its own rows)."""
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in batch.items()}
