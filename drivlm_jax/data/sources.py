"""Where a config's data comes from, as tfds SourceSpecs per role ("source", "target") and
split ("train", "test"):

- `config.data.<role>_dir`: a user's folder in the BDD-OIA or nuScenes (+ DriveLM) layout,
  detected from its files and built with our builders into
  `cache_dir/tfds/<builder>-<fingerprint>`; the fingerprint hashes every file's path, size
  and modification time, so an edited folder is rebuilt and an unchanged one reused.
  Training reads the layout's "train" split; evaluation its "test" split, else "val".
- otherwise, with `config.data.sim`: the procedural world (`config.data.<role>.domain`, or
  a mixture of domains joined by "," with the counts split between them) written in the
  BDD-OIA layout (`config.data.sim_layout` "bdd_oia", counts in images) or the nuScenes +
  DriveLM layout ("nuscenes", counts in scenes of 16 keyframes x 6 cameras, at the role's
  `location`) into `cache_dir/sim/<role>` (once; a `.done` file holds the sim settings)
  and built the same way.

Processes that share a cache folder (hosts of one run on a shared filesystem, runs of a
sweep) take turns on it through a lock file, `cache_dir/.lock`: the first builds, the others
wait and reuse what it built.
"""
import contextlib
import fcntl
import hashlib
import json
import os

from absl import logging

from data_builders import __main__ as build_cli
from data_builders.bdd_oia import bdd_oia_dataset_builder as bdd_builder
from drivlm_jax import run as run_lib
from drivlm_jax.data.pipeline import SourceSpec
from drivlm_jax.sim import bdd_oia as sim_bdd
from drivlm_jax.sim import nuscenes as sim_nuscenes
from drivlm_jax.sim import tokenizer as sim_tokenizer


class SourceError(ValueError):
  pass


def detect_layout(directory: str) -> str:
  """"bdd_oia" or "nuscenes_drive" from the files in `directory`."""
  if not os.path.isdir(directory):
    raise SourceError(f"{directory}: no such data folder")
  if any(d.startswith("v1.0-") and os.path.exists(os.path.join(directory, d, "scene.json"))
         for d in os.listdir(directory)):
    return "nuscenes_drive"
  if any(bdd_builder.find(directory, f"{split}_25k_images_actions.json", bdd_builder._JSON_DIRS)
         for split in ("train", "val", "test")):
    return "bdd_oia"
  raise SourceError(f"{directory}: neither a nuScenes layout (v1.0-*/scene.json) nor a BDD-OIA "
                    f"layout (<split>_25k_images_actions.json in one of "
                    f"{', '.join(bdd_builder._JSON_DIRS)})")


def fingerprint(directory: str) -> str:
  """Hash of every file's relative path, size and mtime under `directory` (16 hex digits)."""
  h = hashlib.sha256()
  for root, dirs, files in os.walk(directory):
    dirs.sort()
    for name in sorted(files):
      path = os.path.join(root, name)
      st = os.stat(path)
      h.update(f"{os.path.relpath(path, directory)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
  return h.hexdigest()[:16]


def build_folder(directory: str, cache_root: str, nuscenes_config="front") -> dict:
  """Builds (or reuses) a user's folder -> {"train": SourceSpec, "test": SourceSpec}."""
  layout = detect_layout(directory)
  tfds_dir = os.path.join(cache_root, "tfds", f"{layout}-{fingerprint(directory)}")
  splits, skipped = build_cli.build(layout, directory, tfds_dir, nuscenes_config)
  if skipped:
    print(f"{directory}: skipped {sum(skipped.values())} example(s): {skipped}", flush=True)
  name = f"nuscenes_drive/{nuscenes_config}" if layout == "nuscenes_drive" else layout
  if "train" not in splits:
    raise SourceError(f"{directory} ({layout}) has no train split (splits: {sorted(splits)})")
  test = "test" if "test" in splits else "val" if "val" in splits else None
  if test is None:
    raise SourceError(f"{directory} ({layout}) has no test or val split to evaluate on "
                      f"(splits: {sorted(splits)})")
  return {"train": SourceSpec(name, tfds_dir, "train"), "test": SourceSpec(name, tfds_dir, test)}


def _sim_role(data_config, role, root) -> dict:
  spec = data_config[role]
  layout = data_config.get("sim_layout", "bdd_oia")
  if layout not in ("bdd_oia", "nuscenes"):
    raise SourceError(f"config.data.sim_layout={layout!r}: 'bdd_oia' or 'nuscenes'")
  manual = os.path.join(root, "sim", role)
  done = os.path.join(manual, ".done")
  wanted = {k: spec[k] for k in ("domain", "seed", "train", "test")}
  wanted.update(width=data_config.width, height=data_config.height)
  if layout == "nuscenes":
    wanted.update(layout=layout, location=spec.get("location", "boston-seaport"))
  if not os.path.exists(done) or json.load(open(done)) != wanted:
    if os.path.exists(done):
      raise FileExistsError(f"{manual} holds other sim data than {wanted}; remove it or "
                            f"set config.data.cache_dir elsewhere")
    if os.path.exists(manual):
      raise FileExistsError(f"{manual} is an unfinished sim (no .done file: a run stopped "
                            f"while writing it?); remove it to write it again")
    # A mixture ("rain,snow") splits each split's count between its domains.
    mixture = spec.domain.split(",")
    for split in ("train", "test"):
      for i, domain in enumerate(mixture):
        num = spec[split] // len(mixture) + (i < spec[split] % len(mixture))
        kwargs = dict(seed=spec.seed + (split == "test") * 100 + 1000 * i, split=split,
                      width=data_config.width, height=data_config.height)
        if layout == "nuscenes":
          sim_nuscenes.write(manual, domain, num, location=wanted["location"], **kwargs)
        else:
          sim_bdd.write(manual, domain, num, **kwargs)
    with open(done, "w") as f:
      json.dump(wanted, f)
  tfds_dir = os.path.join(root, "tfds", role)
  if layout == "nuscenes":
    config = data_config.get("nuscenes_config", "front")
    build_cli.build("nuscenes_drive", manual, tfds_dir, config)
    name = f"nuscenes_drive/{config}"
  else:
    build_cli.build("bdd_oia", manual, tfds_dir)
    name = "bdd_oia"
  return {split: SourceSpec(name, tfds_dir, split) for split in ("train", "test")}


def cache_root(data_config, workdir: str) -> str:
  """Where the built datasets go: `cache_dir`, else <workdir>/data, or for a run directory
  in a bucket <run.local_dir(workdir)>/data: the builders, the sim and grain read and write
  local files."""
  root = data_config.get("cache_dir")
  if root and "://" in root:
    raise SourceError(f"config.data.cache_dir={root}: the dataset cache must be a local "
                      f"folder (the builders and grain read local files)")
  return root or os.path.join(run_lib.local_dir(workdir), "data")


_HELD = set()   # cache roots this process holds the lock of (a nested prepare re-enters)


@contextlib.contextmanager
def _locked(root: str):
  """Holds an exclusive lock on `root`/.lock (fcntl, which NFS and local disks honour). A
  folder where no lock can be taken (read-only: a prepared cache of someone else's; a file
  system without flock) is used without one, with a warning."""
  root = os.path.abspath(root)
  if root in _HELD:
    yield
    return
  try:
    os.makedirs(root, exist_ok=True)
    f = open(os.path.join(root, ".lock"), "a")
  except OSError as e:
    logging.warning("%s: no lock file (%s); using the cache without one", root, e)
    yield
    return
  with f:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      print(f"{root}: waiting for another process building this data cache", flush=True)
      fcntl.flock(f, fcntl.LOCK_EX)
    except OSError as e:
      logging.warning("%s: cannot lock the data cache (%s); processes sharing it must not "
                      "build it at the same time", root, e)
      yield
      return
    _HELD.add(root)
    try:
      yield
    finally:
      _HELD.discard(root)
      fcntl.flock(f, fcntl.LOCK_UN)


def prepare(data_config, workdir: str) -> dict:
  """-> {"tokenizer": path, ("source"|"target", "train"|"test"): SourceSpec}."""
  root = cache_root(data_config, workdir)
  with _locked(root):
    return _prepare(data_config, root)


def _prepare(data_config, root: str) -> dict:
  out = {}
  for role in ("source", "target"):
    directory = data_config.get(f"{role}_dir")
    if directory and "://" in directory:
      raise SourceError(
          f"config.data.{role}_dir={directory}: dataset folders are read from local disk. "
          f"Copy it first (gcloud storage cp -r {directory} /data/{role}) and pass the "
          f"local folder; the run directory (--workdir) may stay in the bucket")
    if directory:
      specs = build_folder(directory, root, data_config.get("nuscenes_config", "front"))
    elif data_config.get("sim"):
      specs = _sim_role(data_config, role, root)
    else:
      raise SourceError(f"config.data.{role}_dir is empty and config.data.sim is off: pass "
                        f"--config.data.{role}_dir=DIR (a BDD-OIA or nuScenes folder)")
    out.update({(role, split): spec for split, spec in specs.items()})
  out["tokenizer"] = data_config.get("tokenizer") or sim_tokenizer.write(root)
  return out
