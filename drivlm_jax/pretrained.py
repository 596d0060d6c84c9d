"""Where a run's model starts: an HF LLaVA directory or a run directory (`init_from`), and
separate HF towers (`init_vision`: CLIP/SigLIP, `init_language`: LLaMA/Qwen2) with a fresh
projector; the CLIP stage's text tower from `clip.text_tower` (a CLIPModel directory). What
a source does not hold (heads, reweighting scorer, discriminators) starts fresh; the log
says what was loaded and what was not.

A pretrained part must be the model the config describes: `model_fields` reads the model
config from the checkpoints (the real-scale configs use it), and `start` checks every
architectural field and every tensor shape, failing with the field or tensor named, never a
silent fresh init.
"""
import dataclasses

import jax
from absl import logging

from drivlm_jax import hf
from drivlm_jax import run as run_lib
from drivlm_jax.data import preprocess
from drivlm_jax.data import tokenizer as tokenizer_lib
from drivlm_jax.model import language, vision, vlm

# Fields that do not change what the weights mean: the run may set them freely (standardize:
# the run's own input transform, which no HF checkpoint holds).
_FREE = {"dtype", "param_dtype", "scan_unroll", "remat", "scan", "standardize"}


def is_llava(path: str) -> bool:
  return hf.model_type(path) == "llava"


_LLAVA_FIELDS = ("image_token_id", "vision_feature_layer", "vision_feature_select_strategy",
                 "projector_act", "projector_bias")


def kept_fields(config) -> tuple:
  """`config.pretrained_keep`: the image-splice fields (comma-separated, of `_LLAVA_FIELDS`)
  the config sets itself instead of taking init_from's, e.g. another `vision_feature_layer`
  for the same projector (a field that changes a tensor's shape still fails on it)."""
  names = tuple(n.strip() for n in str(config.get("pretrained_keep", "") or "").split(",")
                if n.strip())
  unknown = sorted(set(names) - set(_LLAVA_FIELDS))
  if unknown:
    raise ValueError(f"config.pretrained_keep: {', '.join(unknown)} not among the fields a "
                     f"checkpoint sets that a config may keep ({', '.join(_LLAVA_FIELDS)})")
  return names


def model_fields(init_from="", init_vision="", init_language="") -> dict:
  """The model config (nested dicts, for `config.model.update`) that the pretrained sources
  fix: the towers, projector and image splice of a LLaVA or run `init_from`, or the vision /
  language part of separate towers (a SigLIP tower's patches all projected: "full")."""
  fields = {}
  kind = hf.model_type(init_from) if init_from else None
  if kind not in (None, "llava"):   # None: a run directory of drivlm_jax.train
    raise ValueError(f"init_from {init_from}: an HF {kind!r} checkpoint, neither a LLaVA VLM "
                     f"nor a run: give a vision tower as init_vision, a language model as "
                     f"init_language")
  if init_from:
    cfg = (hf.vlm_config(init_from) if kind == "llava"
           else run_lib.model_config(run_lib.read_config(init_from)))
    fields = {k: getattr(cfg, k) for k in _LLAVA_FIELDS}
    fields.update(vision=_arch(cfg.vision), language=_arch(cfg.language))
  if init_vision:
    fields["vision"] = _arch(hf.vision_config(init_vision))
    if not init_from and fields["vision"]["family"] == "siglip":
      # No class token to drop: a fresh projector takes every patch (as LLaVA-OneVision's);
      # HF's "default" would drop the first one.
      fields["vision_feature_select_strategy"] = "full"
  if init_language:
    fields["language"] = _arch(hf.language_config(init_language))
  return fields


def configure(config):
  """`config` with `config.model` set from its pretrained sources (`model_fields`), so the
  model is the checkpoint's whatever preset the config names, and `data.tokenizer` (when
  unset) the checkpoint's own tokenizer; logs what changed."""
  init_from, init_language = config.get("init_from", ""), config.get("init_language", "")
  fields = model_fields(init_from, config.get("init_vision", ""), init_language)
  kept = kept_fields(config)
  for name in kept:
    if name in fields and fields.pop(name) != config.model.get(name):
      logging.warning("model.%s: %r, the config's (config.pretrained_keep), not init_from's",
                      name, config.model.get(name))
  if not fields:
    return config
  config = config.copy_and_resolve_references()
  # The checkpoint's own tokenizer (a run's: the one it trained with), unless the config
  # names one.
  if (init_from and not is_llava(init_from) and not init_language
      and not config.data.get("tokenizer")):
    theirs = run_lib.read_config(init_from).data.get("tokenizer", "")
    if theirs:
      config.data.tokenizer = theirs
      logging.warning("data.tokenizer: %s (that of init_from %s)", theirs, init_from)
  for source in (init_from if is_llava(init_from) else "", init_language):
    if source and not config.data.get("tokenizer"):
      if not tokenizer_lib.has_tokenizer(source):
        raise FileNotFoundError(
            f"{source}: no tokenizer files (tokenizer.json, tokenizer_config.json, ...) beside "
            f"the checkpoint, and config.data.tokenizer is unset; set "
            f"--config.data.tokenizer=DIR to the checkpoint's tokenizer")
      config.data.tokenizer = source
      logging.warning("data.tokenizer: %s (the checkpoint's own)", source)
  # Only the parts (a tower, a splice field) whose value the config's model does not already
  # have, a tower whole (its derived fields, e.g. head_dim, follow the others): a config that
  # describes the checkpoint's model stays as it is (and so does its config.json).
  try:
    current = vlm.config_from_dict(config.model)
    resolved = {k: getattr(current, k) for k in _LLAVA_FIELDS}
    resolved.update(vision=_arch(current.vision), language=_arch(current.language))
  except (TypeError, ValueError):   # a model valid only with the checkpoint's fields
    resolved = {}
  changed = []
  with config.unlocked():
    for k, v in fields.items():
      if k in resolved and resolved[k] == v:
        continue
      # A ConfigDict keeps a field's type (a list of layers is not an int, several eos ids
      # not one): a field of another type is replaced.
      where, items = (config.model[k], v.items()) if isinstance(v, dict) else (config.model,
                                                                               [(k, v)])
      for f, value in items:
        have = resolved.get(k, {}).get(f) if isinstance(v, dict) else resolved.get(k)
        if have != value:
          changed.append(f"{k}.{f}" if isinstance(v, dict) else k)
        if where.get(f) is not None and type(where[f]) is not type(value):
          del where[f]
        where[f] = value
  if changed:
    logging.warning("model config from the pretrained checkpoints: %s", ", ".join(changed))
  return config


def _arch(cfg) -> dict:
  """The fields that fix what the weights mean (head_dim made explicit, a tower's input
  statistics None where they are its family's; RoPE scaling as a dict, which a ConfigDict
  shows and overrides key by key)."""
  fields = dataclasses.asdict(cfg)
  if isinstance(cfg, language.Config):
    fields.update(head_dim=cfg.dim_per_head, rope_scaling=dict(cfg.rope_scaling))
  if isinstance(cfg, vision.Config):
    fields.update(preprocess.own_statistics(cfg.family, cfg.image_mean, cfg.image_std))
  return {k: v for k, v in fields.items() if k not in _FREE}


def _differences(cfg, source_cfg, prefix="", kept=()) -> list:
  if isinstance(cfg, vlm.Config):
    splice = [k for k in _LLAVA_FIELDS if k not in kept]
    return (_differences(cfg.vision, source_cfg.vision, "vision.")
            + _differences(cfg.language, source_cfg.language, "language.")
            + _differences({k: getattr(cfg, k) for k in splice},
                           {k: getattr(source_cfg, k) for k in splice}))
  ours, theirs = (_arch(c) if dataclasses.is_dataclass(c) else c for c in (cfg, source_cfg))
  return [f"{prefix}{k}: {v!r} in the checkpoint, {ours[k]!r} in the config"
          for k, v in theirs.items() if ours[k] != v]


def _load(params, cfg, source: str, what: str, load, part: str | None, taken: list, kept=()):
  """Loads `source` with `load` (-> (its config, params)), checks that it is the configured
  model (`part` of it, or all; but the `kept` splice fields), and puts its params in place."""
  source_cfg, loaded = load(source)
  diff = _differences(getattr(cfg, part) if part else cfg, source_cfg, kept=kept)
  if diff:
    raise hf.CheckpointError(
        f"{what} {source} does not fit the configured model: {'; '.join(diff)}. Build "
        f"config.model from the checkpoint (pretrained.model_fields, as configs/common.py "
        f"does) or set these fields.")
  params = _place(params, {part: loaded} if part else loaded, source, taken)
  logging.warning("%s %s: loaded %s", what, source, ", ".join([part] if part else sorted(loaded)))
  return params


def _place(params, loaded: dict, where: str, taken: list) -> dict:
  """`params` with the leaves of `loaded` (a subtree of the same paths) put in place, on the
  shardings of `params`; a shape mismatch is an error."""
  flat = dict(jax.tree_util.tree_flatten_with_path(loaded)[0])

  def put(path, x):
    y = flat.pop(path, None)
    if y is None:
      return x
    if y.shape != x.shape:
      raise hf.CheckpointError(f"{where}: {jax.tree_util.keystr(path)} has shape {y.shape}, "
                               f"the model expects {x.shape}")
    taken.append(path)
    return jax.device_put(y.astype(x.dtype), x.sharding)
  out = jax.tree_util.tree_map_with_path(put, params)
  if flat:
    raise hf.CheckpointError(f"{where}: {len(flat)} param(s) the model has no place for: "
                             f"{', '.join(jax.tree_util.keystr(p) for p in list(flat)[:6])}")
  return out


def start(params, cfg: vlm.Config, config):
  """`params` (fresh, sharded) with the pretrained sources of `config` put in; logs a line
  per source and which top-level parts stay fresh."""
  init_from, taken = config.get("init_from", ""), []
  if init_from and is_llava(init_from):
    params = _load(params, cfg, init_from, "init_from", hf.load_vlm, None, taken,
                   kept_fields(config))
  elif init_from:
    params = _from_run(params, init_from, taken)
  for key, load, part in (("init_vision", hf.load_vision_tower, "vision"),
                          ("init_language", hf.load_language_model, "language")):
    if config.get(key, ""):
      params = _load(params, cfg, config.get(key), key, load, part, taken)
  clip = config.get("clip") or {}
  if clip.get("text_tower") and (config.get("loss") or {}).get("clip", 0.0) > 0:
    params = _place(params, {"text": hf.load_text_tower(clip["text_tower"])[1]},
                    clip["text_tower"], taken)
    logging.warning("clip.text_tower %s: the CLIP text tower loaded", clip["text_tower"])
  if taken:
    parts = lambda paths: {jax.tree_util.keystr(p[:1]) for p in paths}
    every = [p for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    logging.warning("pretrained: %d params loaded; fresh: %s", len(taken),
                    ", ".join(sorted(parts(every) - parts(taken))) or "none")
  return params


def _from_run(params, run_dir: str, taken: list):
  """Every model param that the run `run_dir` also has (same path and shape), from its latest
  checkpoint; the rest (e.g. discriminators, reweighting) stay fresh."""
  source = run_lib.load(run_dir)
  flat = dict(jax.tree_util.tree_flatten_with_path(source.params)[0])
  fresh = []

  def pick(path, x):
    y = flat.get(path)
    if y is not None and y.shape == x.shape:
      taken.append(path)
      return jax.device_put(y.astype(x.dtype), x.sharding)
    fresh.append(jax.tree_util.keystr(path))
    return x
  params = jax.tree_util.tree_map_with_path(pick, params)
  if not taken:
    raise ValueError(f"init_from {run_dir}: no param matches this model (other preset?)")
  logging.warning("init_from %s (step %d): %d params loaded, %d fresh%s", run_dir, source.step,
                  len(taken), len(fresh), f": {', '.join(sorted(fresh)[:6])}..." if fresh
                  else "")
  return params
