"""A run directory: what `drivlm_jax.train` writes, and reading it back.

DIR/config.json, DIR/checkpoints/<step> (Orbax: train state + data position + config),
DIR/metrics.jsonl, DIR/tb and DIR/eval.json. Any run directory serves as a distillation
teacher, a warm start (`init_from`, see `pretrained`), an evaluation target, an export
source or a plot source: they all read it here. This module also decides, once, which
params a run is judged by (`EVAL_KEY`: the moving average when the run keeps one).
"""
import contextlib
import dataclasses
import json
import logging as std_logging
import os
import re
import signal
import sys

import jax
from jax.experimental import multihost_utils
import ml_collections
import orbax.checkpoint as ocp
from absl import app, flags, logging
from etils import epath
from ml_collections import config_flags

from drivlm_jax import hf, lora
from drivlm_jax.data import pipeline, preprocess
from drivlm_jax.data import tokenizer as tokenizer_lib
from drivlm_jax.model import vlm


# The exit status of a trainer that a SIGTERM stopped after saving its checkpoint (128 + the
# signal, the shell's rule): stopped, not finished.
PREEMPTED_EXIT = 128 + signal.SIGTERM


class RunError(FileNotFoundError):
  pass


#### The model and pipeline a config describes

def model_config(config) -> vlm.Config:
  cfg = vlm.config_from_dict(config.model)
  return vlm.with_dtype(cfg, "bfloat16") if config.get("mixed_precision", False) else cfg


def features(config, cfg: vlm.Config, tokenizer: str) -> pipeline.Features:
  d = config.data
  tok = tokenizer_lib.load(tokenizer)
  if tok.image_id != cfg.image_token_id or tok.vocab_size > cfg.language.vocab_size:
    raise ValueError(
        f"tokenizer {tokenizer} (<image> id {tok.image_id}, {tok.vocab_size} tokens) does not "
        f"fit the model (model.image_token_id {cfg.image_token_id}, vocab_size "
        f"{cfg.language.vocab_size}); set config.data.tokenizer or config.model.image_token_id")
  if d.get("nuscenes_config") == "six_cam" and cfg.num_cameras == 1:
    logging.warning("data.nuscenes_config=six_cam, model.num_cameras=1: the model sees the "
                    "front camera only; set --config.model.num_cameras=6 for all six")
  clip = config.get("clip") or {}
  captions = clip.get("text_tower", "") if config.loss.get("clip", 0.0) > 0 else ""
  caption_len = pipeline.Features.max_caption_len
  if captions:   # no longer than the text tower's positions
    caption_len = min(caption_len, hf.text_config(captions).max_position_embeddings)
  return pipeline.Features(tokenizer=tokenizer, caption_tokenizer=captions,
                           max_caption_len=caption_len,
                           statistics=preprocess.statistics(cfg.vision),
                           image_size=cfg.vision.image_size,
                           num_image_tokens=cfg.num_visual_tokens, max_len=d.max_len,
                           resize=d.resize, augment=d.augment, num_cameras=cfg.num_cameras,
                           cache_examples=d.get("cache_examples", 0),
                           max_boxes=d.get("max_boxes", pipeline.Features.max_boxes),
                           drivelm_questions=d.get("drivelm_questions", "released"))


def eval_key(config) -> str:
  """The state entry a run is evaluated, distilled, warm-started and exported with: "ema"
  when it keeps a moving average of its params (`ema_decay` > 0), else "params"."""
  return "ema" if config.get("ema_decay", 0.0) else "params"


def define_flags():
  """The flags of the entry points that take a run: --config (with --config.key=value
  overrides; unknown keys are errors) and --workdir."""
  config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
  flags.DEFINE_string("workdir", None, "Run directory (local or gs://).")


def parse_flags(argv):
  """absl's flag parsing (`app.run(main, flags_parser=parse_flags)`), where an override of a
  key the config lacks is one line naming it, not ml_collections' traceback."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    print(f"error: {e} (--helpfull lists the flags)", file=sys.stderr)
    sys.exit(2)
  except (AttributeError, KeyError) as e:
    message = str(e).replace("\\n", "\n")
    key = re.search(r"[A-Za-z_]\w*", message)
    key = key.group(0) if key else ""
    bad = [a.split("=")[0] for a in argv[1:]
           if a.startswith("--config.") and key in a.split("=")[0].split(".")]
    if not bad:   # the config file's own error, e.g. an unknown `:arg` (configs.common)
      print(f"error: --config: {message.strip(chr(34))}", file=sys.stderr)
      sys.exit(2)
    hint = next((" " + line.strip().rstrip("'") for line in message.splitlines()
                 if "Did you mean" in line), "")
    print(f"error: {' '.join(bad)}: the config has no key {key!r} (a flag sets the "
          f"config's keys, it adds none).{hint}", file=sys.stderr)
    sys.exit(2)


def flag_values():
  """(config, workdir) from the flags `define_flags` defines; both are required."""
  try:
    config = flags.FLAGS.config
    if config is not None:
      config.keys()   # loads it
  except OSError as e:   # a config file that does not load: its path, and why
    print(f"error: --config: {str(e).strip().splitlines()[-1].strip()}", file=sys.stderr)
    sys.exit(2)
  if config is None or flags.FLAGS.workdir is None:
    raise app.UsageError("--config and --workdir are required")
  return config, flags.FLAGS.workdir


@contextlib.contextmanager
def user_errors():
  """An entry point's body: an error in what the user gave (a file, flag, key or value, which
  our messages name) is one `error:` line and exit status 2, not a traceback; the traceback
  is logged at INFO (`--verbosity=0` shows it)."""
  try:
    yield
  except (ValueError, OSError) as e:
    logging.info("%s", e, exc_info=True)
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


def deploy_keep_ratio(config) -> float:
  """The share of visual tokens the deployed student keeps: the smallest `keep_ratio` of the
  run's heads evaluators (`config.evals`), else 1.0."""
  keeps = [e.get("keep_ratio", 1.0) for e in config.get("evals", {}).values()
           if e.get("type") == "heads"]
  return min(keeps, default=1.0)


#### Files of a run directory, local or in a bucket (etils.epath)

def path(workdir, *parts) -> epath.Path:
  """`workdir`/`parts` as an epath.Path: a local folder, or gs://bucket/... on cloud runs."""
  return epath.Path(str(workdir)).joinpath(*parts)


def is_remote(workdir) -> bool:
  return "://" in str(workdir)


def local_dir(workdir) -> str:
  """Where a run keeps what stays on local disk (logs written as they grow, the built data,
  XLA's compilation cache): `workdir` itself, or for a workdir in a bucket a local folder
  named after it, ~/.cache/drivlm_jax/<bucket>/<path>."""
  if not is_remote(workdir):
    return str(workdir)
  return os.path.join(os.path.expanduser("~"), ".cache", "drivlm_jax",
                      str(workdir).split("://", 1)[1].strip("/"))


def absolute(workdir) -> str:
  """`workdir` as an absolute local path, or unchanged when it is a URL."""
  return str(workdir) if is_remote(workdir) else os.path.abspath(workdir)


def orbax_dir(workdir) -> str:
  """The checkpoints folder as Orbax takes it: absolute when local, the URL when remote."""
  return str(path(absolute(workdir), "checkpoints"))


def write_text(file: epath.Path, text: str):
  """Replaces `file` whole: a reader (another host, a sweep) sees the old text or the new,
  never a partial one. A bucket object is replaced on upload; a local file by a rename."""
  file.parent.mkdir(parents=True, exist_ok=True)
  if is_remote(file):
    file.write_text(text)
    return
  tmp = file.parent / f".{file.name}.{os.getpid()}.tmp"
  tmp.write_text(text)
  os.replace(tmp, file)


def append_text(file: epath.Path, text: str):
  """Appends `text` to `file`. Objects in a bucket cannot be appended to (gcsfs's "a" mode
  replaces them), so there the file is read and written whole."""
  if is_remote(file):
    write_text(file, (file.read_text() if file.exists() else "") + text)
  else:
    file.parent.mkdir(parents=True, exist_ok=True)
    with file.open("a") as f:
      f.write(text)


def write_json(file: epath.Path, value):
  write_text(file, json.dumps(value, indent=1))


def read_json(file: epath.Path):
  try:
    return json.loads(file.read_text())
  except json.JSONDecodeError as e:
    raise RunError(f"{file}: not valid JSON ({e}); a file cut by a stopped run can be restored "
                   f"from a copy, or the run started afresh in another workdir") from e


#### config.json

# Config keys that name a local folder or file (or a bucket path): a relative one is made
# absolute when a run starts (`absolute_paths`), so its config.json finds them from anywhere.
PATH_KEYS = ("init_from", "init_vision", "init_language", "distill.teacher", "clip.text_tower",
             "data.source_dir", "data.target_dir", "data.tokenizer", "data.cache_dir")


def absolute_paths(config) -> ml_collections.ConfigDict:
  """A copy of `config` with each local path of `PATH_KEYS` absolute (`~` expanded, a
  relative one resolved against the current directory)."""
  config = config.copy_and_resolve_references()
  with config.unlocked():
    for key in PATH_KEYS:
      *parents, name = key.split(".")
      node = config
      for part in parents:
        node = node.get(part) if node is not None else None
      value = node.get(name) if node is not None else None
      if isinstance(value, str) and value and "://" not in value:
        node[name] = os.path.abspath(os.path.expanduser(value))
  return config


def write_config(workdir: str, config):
  """Host 0 writes the run's config.json, once every host has read the old one
  (`check_resume`)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("drivlm_jax.run.write_config")
  if jax.process_index() == 0:
    write_text(path(workdir, "config.json"), config.to_json_best_effort(indent=1))


def read_config(workdir: str) -> ml_collections.ConfigDict:
  file = path(workdir, "config.json")
  if not file.exists():
    raise RunError(f"{file} not found: {workdir} is not a run directory of drivlm_jax.train")
  return ml_collections.ConfigDict(read_json(file))


def _flat(tree, prefix=""):
  if not isinstance(tree, dict):
    return {prefix[:-1]: tree}
  out = {}
  for key, value in tree.items():
    out.update(_flat(value, f"{prefix}{key}."))
  return out


# How batches are prepared, not what they hold (the pipeline gives the same batches for any
# value): not a change of the run's config.
INPUT_ONLY_KEYS = ("data.workers", "data.read_threads")


def config_changes(workdir: str, config) -> list:
  """Dotted keys whose value in `config` differs from the run's config.json (relative paths
  of either compared as `absolute_paths` makes them), `INPUT_ONLY_KEYS` aside. A loss weight
  the stored config lacks is 0 (the term did not exist or was off: `adapt.weights`)."""
  stored = absolute_paths(ml_collections.ConfigDict(read_json(path(workdir, "config.json"))))
  stored = _flat(json.loads(stored.to_json_best_effort()))
  current = _flat(json.loads(absolute_paths(config).to_json_best_effort()))
  old = lambda k: stored.get(k, 0.0 if k.startswith("loss.") else None)
  return sorted(k for k in set(stored) | set(current)
                if old(k) != current.get(k) and k not in INPUT_ONLY_KEYS)


def differs_at(workdir: str, config) -> str:
  """The warning text "differs at KEY, ..." (the first 8 `config_changes`); "" when none."""
  changes = config_changes(workdir, config)
  return (f"differs at {', '.join(changes[:8])}{' ...' if len(changes) > 8 else ''}"
          if changes else "")


def check_resume(workdir: str, config, step: int):
  """Before a run resumes from `step` in `workdir` (and writes its config there): a
  checkpoint past `total_steps`, another `total_steps` than the run's own (its schedules
  are laid out over it: continuing would splice two) or other image statistics (the frames
  would change mid-run) is an error; other changed keys are named in a warning."""
  if step > config.total_steps:
    raise RunError(f"{workdir} holds a checkpoint at step {step}, past total_steps "
                   f"{config.total_steps}: use another workdir")
  file = path(workdir, "config.json")
  if not file.exists():
    return
  saved = read_json(file)
  stored = saved.get("total_steps")
  if stored != config.total_steps:
    raise RunError(f"{workdir} is a run of total_steps {stored}; resuming it with "
                   f"{config.total_steps} would splice two learning-rate (and DANN) schedules: "
                   f"use another workdir")
  try:
    theirs = preprocess.statistics(model_config(ml_collections.ConfigDict(saved)).vision)
  except (KeyError, TypeError, ValueError):   # a config.json of another form: no comparison
    theirs = None
  ours = preprocess.statistics(model_config(config).vision)
  if theirs is not None and theirs != ours:
    raise RunError(f"{workdir} trained on frames normalised with mean, std {theirs}; resuming "
                   f"it with {ours} (model.vision.image_mean/image_std, or the pretrained "
                   f"checkpoint's processor) would change its input mid-run: use another "
                   f"workdir")
  changes = differs_at(workdir, config)
  if changes:
    print(f"warning: resuming {workdir} with another config ({changes})", flush=True)


def trim_metrics(workdir: str, step: int):
  """metrics.jsonl without rows past `step` (a run killed after logging steps it had not
  checkpointed logs them again when it resumes at `step`)."""
  file = path(workdir, "metrics.jsonl")
  if jax.process_index() != 0 or not file.exists():
    return
  lines = original = file.read_text().splitlines(keepends=True)
  if lines and not lines[-1].endswith("\n"):   # a row cut by the kill: logged again below
    logging.warning("%s: dropped its last row, cut off when the run stopped", file)
    lines = lines[:-1]
  kept = []
  for number, line in enumerate(lines, 1):
    try:
      if line.strip() and json.loads(line)["step"] <= step:
        kept.append(line)
    except (ValueError, KeyError, TypeError) as e:
      raise RunError(f"{file}, line {number}: not a metrics row ({e})") from e
  if len(kept) < len(lines):
    logging.warning("%s: dropped %d logged rows past step %d (not checkpointed)", file,
                    len(lines) - len(kept), step)
  if kept != original:
    write_text(file, "".join(kept))


def finished(workdir: str, config, configure=None) -> bool:
  """Whether `workdir` holds an evaluation of `config`'s final step (a run to reuse, not
  retrain). Reusing a run trained with another config says which keys differ, comparing
  `configure(config)` where given (`pretrained.configure`: the config as train stored it;
  the config as given when its pretrained sources are gone)."""
  file = path(workdir, "eval.json")
  if not file.exists() or read_json(file).get("step") != config.total_steps:
    return False
  if configure:
    try:
      config = configure(config)
    except (OSError, ValueError):
      pass
  changes = differs_at(workdir, config)
  if changes:
    print(f"warning: reusing the finished run in {workdir}, trained with another config "
          f"({changes}); delete it or use another workdir to retrain", flush=True)
  return True


#### Checkpoints of a training run

# Orbax writes a replicated array "replica-parallel": one slice per replica, each cut by an
# eager jitted slice, compiled once per shape. That spreads a large array's write over hosts;
# for a small one it costs more than it saves (a first save of 200 small replicated arrays on
# 8 CPU devices: 68 s, against 0.5 s whole). Slices under 1 MiB are written whole. (Orbax
# logs every override as a warning, in every process that imports this module: not here.)
_absl_level = logging.get_absl_logger().level
logging.get_absl_logger().setLevel(std_logging.ERROR)
try:
  ocp.type_handlers.register_type_handler(
      jax.Array, ocp.type_handlers.ArrayHandler(min_slice_bytes_for_replica_parallel=1 << 20),
      override=True)
finally:
  logging.get_absl_logger().setLevel(_absl_level)


class Checkpoints:
  """The Orbax manager of a training run: the train state plus a JSON meta item (step, data
  position, config), asynchronous saves, resume from the latest step."""

  def __init__(self, workdir: str, config):
    self.config = config
    self.directory = orbax_dir(workdir)
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=config.max_checkpoints, create=True,
                                             enable_async_checkpointing=True))

  def latest_step(self):
    return self.manager.latest_step()

  def restore(self, state):
    """The latest checkpoint, onto the shapes, dtypes and shardings of `state`."""
    step = self.manager.latest_step()
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                            state)
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
    except (ValueError, KeyError, FileNotFoundError) as e:
      raise restore_error(self.manager, self.directory, step, e) from e
    logging.info("resumed from step %d (data position %d)", step,
                 restored["meta"]["data_position"])
    return restored["state"]

  def save(self, step: int, state):
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        meta=ocp.args.JsonSave({"step": step, "data_position": step,
                                "config": json.loads(self.config.to_json_best_effort())})),
                      force=True)

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


#### Reading a run back

@dataclasses.dataclass
class Run:
  workdir: str
  config: ml_collections.ConfigDict
  cfg: vlm.Config
  params: dict
  step: int


def restore_error(manager, directory: str, step: int, error: Exception) -> RunError:
  """A checkpoint that cannot be restored, named with the steps there are: a missing or
  damaged step folder, or a model whose shapes differ from the config's."""
  return RunError(f"{directory}/{step}: cannot restore it ({type(error).__name__}: "
                  f"{str(error)[:300]}); steps there: {list(manager.all_steps())}. A model "
                  f"config other than the run's cannot load it")


def load_params(workdir: str, cfg: vlm.Config, step: int | None = None, config=None):
  """Model params of the latest (or `step`) checkpoint of `workdir` -> (params, step).

  Optimizer state and extra param groups (discriminators, distillation projection) are
  skipped; LoRA params are merged into their kernels. The params are the `eval_key` entry: a
  run trained with `ema_decay` > 0 gives its moving-average params (what it was evaluated
  with). Arrays come back on the default device. `config`: the run's config when the caller
  has read it already.
  """
  config = read_config(workdir) if config is None else config
  key, lora_config = eval_key(config), config.get("lora")
  directory = orbax_dir(workdir)
  manager = ocp.CheckpointManager(directory)
  try:
    step = manager.latest_step() if step is None else step
    if step is None:
      raise RunError(f"{directory} holds no checkpoint")
    shapes = jax.eval_shape(lambda k: vlm.init(cfg, k), jax.random.key(0))
    if lora.enabled(lora_config):
      shapes["lora"] = jax.eval_shape(lambda k: lora.init(lora_config, shapes, k),
                                      jax.random.key(0))
    item = {key: shapes}
    # On this process's first device, whatever devices (or hosts) saved it: a run trained on a
    # mesh is evaluated, exported or distilled from on one machine.
    here = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    try:
      restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
          item=item, restore_args=jax.tree.map(lambda _: ocp.ArrayRestoreArgs(sharding=here),
                                               item),
          partial_restore=True)))
    except (ValueError, KeyError, FileNotFoundError) as e:
      raise restore_error(manager, directory, step, e) from e
  finally:
    manager.close()
  return lora.merge(restored["state"][key], lora_config), step


def load(workdir: str, step: int | None = None) -> Run:
  """A run's config, model config and evaluation params (latest checkpoint or `step`)."""
  config = read_config(workdir)
  cfg = model_config(config)
  params, step = load_params(workdir, cfg, step, config)
  return Run(workdir, config, cfg, params, step)
