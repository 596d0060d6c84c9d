"""HF checkpoints (local directory, safetensors only) <-> our params, both directions.

Our param trees mirror HF module names, so the mapping is generic: a path such as
`encoder/layers/self_attn/q_proj/kernel` becomes `vision_model.encoder.layers.{i}.self_attn.
q_proj.weight` (stacked `layers` are split per layer), and each leaf is converted by one of
four transforms chosen by its name: linear kernels are transposed (torch stores [out, in])
and reshaped to our head-split shapes, the patch conv goes OIHW <-> HWIO, biases are
flattened, everything else is copied. Pickle checkpoints (`*.bin`, `*.pt`) are never read.
"""
import dataclasses
import functools
import json
import logging
import math
import os
import re
from typing import Callable

import jax
import numpy as np
from etils import epath
from flax import traverse_util

from drivlm_jax.data import preprocess
from drivlm_jax.model import language, layers, text, vision, vlm

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


class CheckpointError(ValueError):
  """A checkpoint directory that does not match the model it is loaded into."""


#### Reading safetensors


class _Tensors:
  """Lazy name -> numpy array view over `model.safetensors` or a sharded index."""

  def __init__(self, path):
    from safetensors import safe_open
    self.path = path
    index = os.path.join(path, SAFETENSORS_INDEX)
    single = os.path.join(path, SAFETENSORS)
    if os.path.exists(single):   # first, as transformers looks
      files = [SAFETENSORS]
      if os.path.exists(index):
        logging.warning("%s: both %s and %s are here; reading %s, as transformers does (the "
                        "index and its shards are ignored)", path, SAFETENSORS,
                        SAFETENSORS_INDEX, SAFETENSORS)
    elif os.path.exists(index):
      weight_map = _weight_map(index)
      if weight_map is None:
        raise CheckpointError(f"{index}: no 'weight_map' object")
      files = sorted(set(weight_map.values()))
    else:
      pickles = sorted(f for f in os.listdir(path) if f.endswith(_PICKLE_SUFFIXES))
      if pickles:
        raise CheckpointError(
            f"{path} holds only pickle weights ({', '.join(pickles)}); drivlm-jax reads "
            f"safetensors only (pickle can run arbitrary code). Convert it once where you "
            f"trust it: transformers' AutoModel.from_pretrained(dir).save_pretrained(dir) "
            f"writes safetensors.")
      raise CheckpointError(f"{path}: neither {SAFETENSORS} nor {SAFETENSORS_INDEX} found")
    self._handles, self._where = {}, {}
    for name in files:
      file = os.path.join(path, name)
      if not os.path.exists(file):
        raise CheckpointError(f"{index} lists {name}, which is missing")
      handle = safe_open(file, framework="numpy")
      self._handles[file] = handle
      for key in handle.keys():
        self._where[key] = file

    self._stored = {}   # a name read from another's tensor (`alias`) -> that one's name

  def keys(self):
    return self._where.keys()

  def alias(self, name, stored):
    """Reads `name` from the tensor stored as `stored`."""
    self._where[name], self._stored[name] = self._where[stored], stored

  def _slice(self, name):
    if name not in self._where:
      raise CheckpointError(f"{self.path}: missing tensor {name!r}")
    return self._handles[self._where[name]], self._stored.get(name, name)

  def shape(self, name):
    handle, stored = self._slice(name)
    return tuple(handle.get_slice(stored).get_shape())

  def get(self, name, expected_shape):
    if name not in self._where:
      raise CheckpointError(f"{self.path}: missing tensor {name!r} (expected shape "
                            f"{tuple(expected_shape)})")
    if self.shape(name) != tuple(expected_shape):
      raise CheckpointError(f"{self.path}: tensor {name!r} has shape {self.shape(name)} in the "
                            f"checkpoint, the model expects {tuple(expected_shape)}")
    handle, stored = self._slice(name)
    return handle.get_tensor(stored)


def _weight_map(index) -> dict | None:
  """A sharded checkpoint's {tensor: file}, or None where the index has none (or is not JSON)."""
  try:
    with open(index) as f:
      weight_map = json.load(f).get("weight_map")
  except (json.JSONDecodeError, AttributeError):
    return None
  return weight_map if isinstance(weight_map, dict) else None


def model_type(path) -> str | None:
  """The `model_type` in `path`/config.json (None when there is none), read without
  transformers; `path` may be in a bucket."""
  file = epath.Path(str(path)) / "config.json"
  if not file.is_file():
    return None
  return json.loads(file.read_text()).get("model_type")


def _hf_config(path):
  import transformers
  if "://" in str(path):
    raise CheckpointError(
        f"{path}: Hugging Face checkpoints are read from a local folder. Copy it first "
        f"(gcloud storage cp -r {path} /models/) and pass the local folder")
  if not os.path.isdir(path):
    raise CheckpointError(f"{path} is not a directory")
  if not os.path.exists(os.path.join(path, "config.json")):
    raise CheckpointError(f"{path}: config.json not found")
  return transformers.AutoConfig.from_pretrained(path, local_files_only=True)


#### Leaf transforms


@dataclasses.dataclass(frozen=True)
class _Transform:
  hf_shape: Callable       # our (per-layer) shape -> HF shape
  to_ours: Callable        # (hf array, our shape) -> our array
  to_hf: Callable          # our array -> hf array


def _linear(n_in):
  """torch Linear weight [out, in] <-> our kernel [*in_dims, *out_dims]."""
  return _Transform(
      hf_shape=lambda s: (math.prod(s[n_in:]), math.prod(s[:n_in])),
      to_ours=lambda x, s: x.T.reshape(s),
      to_hf=lambda y: y.reshape(math.prod(y.shape[:n_in]), -1).T)


_CONV = _Transform(  # OIHW <-> HWIO
    hf_shape=lambda s: (s[3], s[2], s[0], s[1]),
    to_ours=lambda x, s: x.transpose(2, 3, 1, 0),
    to_hf=lambda y: y.transpose(3, 2, 0, 1))
_FLAT = _Transform(hf_shape=lambda s: (math.prod(s),), to_ours=lambda x, s: x.reshape(s),
                   to_hf=lambda y: y.reshape(-1))
_COPY = _Transform(hf_shape=lambda s: tuple(s), to_ours=lambda x, s: x, to_hf=lambda y: y)


def _transform(path):
  leaf, module = path[-1], path[-2] if len(path) > 1 else ""
  if leaf == "kernel":
    if module == "patch_embedding":
      return _CONV
    return _linear(2 if module in ("out_proj", "o_proj") else 1)
  return _FLAT if leaf == "bias" else _COPY


_LEAF_NAMES = {"kernel": "weight", "scale": "weight", "embedding": "weight"}
# SigLIP's pooling head is a torch.nn.MultiheadAttention (packed in_proj).
_SIGLIP_HEAD = [(r"^head\.in_proj\.(weight|bias)$", r"head.attention.in_proj_\1"),
                (r"^head\.out_proj\.", r"head.attention.out_proj.")]


@dataclasses.dataclass(frozen=True)
class _Naming:
  """How our flat paths become HF tensor names for one model family.

  `prefix` goes before every name, except for top-level entries listed in `own` as
  (name, prefix) pairs (e.g. `lm_head` with "" next to `model.`). Checkpoints differ in
  prefix (transformers 5 saves a standalone CLIPVisionModel without `vision_model.`, and
  LLaVA checkpoints come in two layouts), so loaders pick one with `_detect`.
  """
  prefix: str = ""
  own: tuple = ()
  subs: tuple = ()

  def __call__(self, path):
    parts = ["layers.{i}" if p == "layers" else p for p in path[:-1]]
    name = ".".join(parts + [_LEAF_NAMES.get(path[-1], path[-1])])
    for pattern, repl in self.subs:
      name = re.sub(pattern, repl, name)
    return dict(self.own).get(path[0], self.prefix) + name


def _detect(tensors, anchors, *namings):
  """The first naming under whose prefix one of `anchors` (a name, or several: a tied LM may
  store no embedding) is in the checkpoint (else the first: the "missing tensor" error
  follows)."""
  anchors = (anchors,) if isinstance(anchors, str) else anchors
  for naming in namings:
    if any(naming.prefix + anchor in tensors.keys() for anchor in anchors):
      return naming
  return namings[0]


_VISION_NAMES = _Naming(prefix="vision_model.", subs=tuple(_SIGLIP_HEAD))
_TEXT_NAMES = _Naming()
_LM_NAMES = _Naming(prefix="model.", own=(("lm_head", ""),))
_VISION_ANCHOR, _LM_ANCHOR = "embeddings.patch_embedding.weight", ("embed_tokens.weight",
                                                                     "norm.weight")


def _is_stacked(path):
  return "layers" in path


#### Generic load / save


def _read(tensors, naming, shapes):
  """Every leaf of `shapes` (a tree of ShapeDtypeStructs) from `tensors` -> (params, the
  tensor names used)."""
  params, used = {}, set()
  for p, sds in traverse_util.flatten_dict(shapes).items():
    name, tr = naming(p), _transform(p)
    if _is_stacked(p):
      shape = sds.shape[1:]
      names = [name.format(i=i) for i in range(sds.shape[0])]
      value = np.stack([tr.to_ours(tensors.get(n, tr.hf_shape(shape)), shape) for n in names])
    else:
      names = [name]
      value = tr.to_ours(tensors.get(name, tr.hf_shape(sds.shape)), sds.shape)
    used.update(names)
    params[p] = jax.numpy.asarray(value, dtype=sds.dtype)
  return traverse_util.unflatten_dict(params), used


def _check_all_used(tensors, used, ignore):
  """Tensors that no leaf read and `ignore(name)` does not excuse are an error."""
  extra = sorted(k for k in tensors.keys() if k not in used and not ignore(k))
  if extra:
    shown = ", ".join(f"{k} {tensors.shape(k)}" for k in extra[:8])
    raise CheckpointError(f"{tensors.path}: {len(extra)} unexpected tensor(s) the model has no "
                          f"place for: {shown}{' ...' if len(extra) > 8 else ''}")


def _load_params(tensors, naming, shapes, ignore):
  params, used = _read(tensors, naming, shapes)
  _check_all_used(tensors, used, ignore)
  return params


def _to_hf_tensors(params, naming):
  out = {}
  for p, value in traverse_util.flatten_dict(params).items():
    value, name, tr = np.asarray(value), naming(p), _transform(p)
    if _is_stacked(p):
      for i, layer in enumerate(value):
        out[name.format(i=i)] = np.array(tr.to_hf(layer), order="C")
    else:
      out[name] = np.array(tr.to_hf(value), order="C")
  return out


def _save(path, hf_config, tensors):
  """config.json + one model.safetensors. A sharded checkpoint already in `path` (its index
  and the shards it lists) is removed, with a warning, so that no reader finds the old
  weights beside the new ones."""
  from safetensors.numpy import save_file
  os.makedirs(path, exist_ok=True)
  file = os.path.join(path, SAFETENSORS)
  save_file(tensors, file + ".tmp", metadata={"format": "pt"})   # the old stays until then
  os.replace(file + ".tmp", file)
  hf_config.save_pretrained(path)
  index = os.path.join(path, SAFETENSORS_INDEX)
  if os.path.exists(index):
    names = set((_weight_map(index) or {}).values())
    # Only shard files of this directory (an index is not trusted with other paths).
    stale = sorted(n for n in names if isinstance(n, str) and n.endswith(".safetensors")
                   and os.path.basename(n) == n and n != SAFETENSORS
                   and os.path.exists(os.path.join(path, n)))
    logging.warning("%s: replaced the sharded checkpoint here (%s and %d shard(s): %s) with "
                    "one %s", path, SAFETENSORS_INDEX, len(stale), ", ".join(stale[:4]),
                    SAFETENSORS)
    for name in [SAFETENSORS_INDEX, *stale]:
      os.remove(os.path.join(path, name))


def _shapes(init_fn, cfg):
  return jax.eval_shape(lambda key: init_fn(cfg, key), jax.random.key(0))


#### Vision tower


def vision_config(path, **overrides) -> vision.Config:
  hf = _hf_config(path)
  if hf.model_type in ("clip", "siglip"):
    hf = hf.vision_config
  return _vision_config(hf, f"{path}/config.json", **{**processor_statistics(path), **overrides})


PROCESSOR = "processor_config.json"          # transformers 5: the image processor nested
IMAGE_PROCESSOR = "preprocessor_config.json"  # before


def processor_statistics(path) -> dict:
  """The `image_mean` / `image_std` of the image processor saved beside a checkpoint, as
  transformers finds it (`processor_config.json`'s nested "image_processor" first, then
  `preprocessor_config.json`); {} when there is none (the family's statistics then apply)."""
  found = None
  for name in (PROCESSOR, IMAGE_PROCESSOR):
    file = os.path.join(path, name)
    if not os.path.exists(file):
      continue
    try:
      with open(file) as f:
        saved = json.load(f)
    except (OSError, ValueError) as e:
      raise CheckpointError(f"{file}: not readable as JSON ({e})") from e
    found = saved.get("image_processor") if name == PROCESSOR else saved
    if found is not None:
      break
  if found is None:
    return {}
  rescale = found.get("rescale_factor", 1 / 255) if found.get("do_rescale", True) else 1
  if not isinstance(rescale, (int, float)) or not math.isclose(rescale, 1 / 255, rel_tol=1e-6):
    raise CheckpointError(f"{file}: the image processor rescales pixels by {rescale!r}, not "
                          f"1/255; only 0..255 -> 0..1 then (x - mean) / std is supported")
  if not found.get("do_normalize", True):
    return {"image_mean": (0.0, 0.0, 0.0), "image_std": (1.0, 1.0, 1.0)}
  stats = {}
  for k in ("image_mean", "image_std"):
    v = found.get(k)
    if v is None:
      continue
    v = list(v) if isinstance(v, (list, tuple)) else [v]
    if len(v) == 1:   # one number: every channel's
      v *= 3
    if len(v) != 3 or not all(isinstance(x, (int, float)) for x in v):
      raise CheckpointError(f"{file}: {k} {found[k]!r} is not one number or three (RGB)")
    if k == "image_std" and min(v) <= 0:
      raise CheckpointError(f"{file}: {k} {found[k]!r} must be positive")
    stats[k] = tuple(float(x) for x in v)
  return stats


def image_processor(cfg: vision.Config):
  """The HF image processor of a tower: its family's class at its image size, with the
  statistics it was trained with (saved beside an exported checkpoint)."""
  import transformers
  mean, std = preprocess.statistics(cfg)
  size = {"height": cfg.image_size, "width": cfg.image_size}
  if cfg.family == "siglip":
    return transformers.SiglipImageProcessor(size=size, image_mean=mean, image_std=std)
  return transformers.CLIPImageProcessor(size={"shortest_edge": cfg.image_size},
                                         crop_size=size, image_mean=mean, image_std=std)


def _activation(name, where, key="hidden_act"):
  """`name` when the model has that activation, else a CheckpointError naming the file."""
  if name not in layers.ACTIVATIONS:
    raise CheckpointError(f"{where}: {key} {name!r} is not supported "
                          f"({', '.join(sorted(layers.ACTIVATIONS))})")
  return name


def _vision_config(hf, where, **overrides) -> vision.Config:
  if hf.model_type not in ("clip_vision_model", "siglip_vision_model"):
    raise CheckpointError(f"{where}: model_type {hf.model_type!r} is not a CLIP or SigLIP "
                          f"vision model")
  _activation(hf.hidden_act, where)
  siglip = hf.model_type == "siglip_vision_model"
  if "image_mean" in overrides or "image_std" in overrides:
    overrides.update(preprocess.own_statistics("siglip" if siglip else "clip",
                                               overrides.get("image_mean"),
                                               overrides.get("image_std")))
  return vision.Config(
      family="siglip" if siglip else "clip", image_size=hf.image_size,
      patch_size=hf.patch_size, num_channels=hf.num_channels, hidden_size=hf.hidden_size,
      intermediate_size=hf.intermediate_size, num_layers=hf.num_hidden_layers,
      num_heads=hf.num_attention_heads, layer_norm_eps=hf.layer_norm_eps,
      hidden_act=hf.hidden_act, use_head=bool(getattr(hf, "vision_use_head", True)),
      **overrides)


def load_vision_tower(path, **overrides):
  """A CLIP/SigLIP vision tower from a local HF directory (standalone vision model or full
  CLIPModel/SiglipModel). `overrides` set non-architectural Config fields (dtype, remat,
  scan_unroll). Returns (vision.Config, params)."""
  cfg = vision_config(path, **overrides)
  tensors = _Tensors(path)
  naming = _detect(tensors, _VISION_ANCHOR, _VISION_NAMES,
                   dataclasses.replace(_VISION_NAMES, prefix=""))
  # A full CLIPModel/SiglipModel also holds the text tower: only our prefix is ours.
  unread_head = _unread_head(cfg, tensors, naming)
  ignore = lambda k: (not k.startswith(naming.prefix) or k.endswith(".position_ids")
                      or unread_head(k))
  params = _load_params(tensors, naming, _shapes(vision.init, cfg), ignore)
  return cfg, params


def _unread_head(cfg: vision.Config, tensors, naming):
  """A predicate for the SigLIP pooling head's stored tensors where the config has no head
  (vision_use_head false): transformers leaves them unused, with a warning; so do we."""
  if cfg.family != "siglip" or cfg.use_head:
    return lambda k: False
  prefix = naming(("head", "probe"))[:-len("probe")]
  stored = [k for k in tensors.keys() if k.startswith(prefix)]
  if stored:
    logging.warning("%s: vision_use_head is false; the %d stored tensor(s) of the SigLIP "
                    "pooling head (%s...) are not read, as transformers leaves them",
                    tensors.path, len(stored), prefix)
  return lambda k: k.startswith(prefix)


def _vision_hf_config(cfg: vision.Config):
  import transformers
  if cfg.standardize:
    raise CheckpointError("vision.standardize: HF's CLIP/SigLIP towers have no per-image "
                          "standardisation of their input; a tower trained with it does not "
                          "export to an HF directory")
  common = dict(hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                num_channels=cfg.num_channels, image_size=cfg.image_size,
                patch_size=cfg.patch_size, layer_norm_eps=cfg.layer_norm_eps,
                hidden_act=cfg.hidden_act)
  if cfg.family == "siglip":
    return transformers.SiglipVisionConfig(vision_use_head=cfg.use_head, **common)
  return transformers.CLIPVisionConfig(**common)


def save_vision_tower(cfg: vision.Config, params, path):
  """Writes an HF `CLIPVisionModel` / `SiglipVisionModel` directory."""
  hf = _vision_hf_config(cfg)
  hf.architectures = ["SiglipVisionModel" if cfg.family == "siglip" else "CLIPVisionModel"]
  _save(path, hf, _to_hf_tensors(params, _VISION_NAMES))
  _save_image_processor(cfg, path)


#### CLIP text tower (+ projections and logit scale)


def text_config(path, **overrides) -> text.Config:
  hf = _hf_config(path)
  if hf.model_type == "clip":
    tc, vision_hidden = hf.text_config, hf.vision_config.hidden_size
    projection_dim, scale = hf.projection_dim, hf.logit_scale_init_value
  elif hf.model_type == "clip_text_model" and hasattr(hf, "vision_hidden_size"):
    # Written by `save_text_tower` without a vision tower: the extra fields ride along.
    tc, vision_hidden = hf, hf.vision_hidden_size
    projection_dim, scale = hf.projection_dim, hf.logit_scale_init_value
  else:
    raise CheckpointError(f"{path}/config.json: model_type {hf.model_type!r} is not a CLIPModel "
                          f"(the text tower needs CLIPModel's two projections and logit scale)")
  return text.Config(
      vocab_size=tc.vocab_size, max_position_embeddings=tc.max_position_embeddings,
      hidden_size=tc.hidden_size, intermediate_size=tc.intermediate_size,
      num_layers=tc.num_hidden_layers, num_heads=tc.num_attention_heads,
      layer_norm_eps=tc.layer_norm_eps,
      hidden_act=_activation(tc.hidden_act, f"{path}/config.json (text_config)"),
      eos_token_id=tc.eos_token_id, projection_dim=projection_dim, vision_hidden_size=vision_hidden,
      logit_scale_init=scale, **overrides)


def load_text_tower(path, **overrides):
  """The CLIP text tower plus `text_projection`, `visual_projection` and `logit_scale` of a
  full CLIPModel directory. Returns (text.Config, params)."""
  cfg = text_config(path, **overrides)
  keep = ("text_model.", "text_projection.", "visual_projection.", "logit_scale")
  ignore = lambda k: not k.startswith(keep) or k.endswith(".position_ids")
  params = _load_params(_Tensors(path), _TEXT_NAMES, _shapes(text.init, cfg), ignore)
  return cfg, params


def _text_hf_config(cfg: text.Config):
  import transformers
  return transformers.CLIPTextConfig(
      vocab_size=cfg.vocab_size, max_position_embeddings=cfg.max_position_embeddings,
      hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
      num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
      layer_norm_eps=cfg.layer_norm_eps, hidden_act=cfg.hidden_act,
      eos_token_id=cfg.eos_token_id, projection_dim=cfg.projection_dim)


def save_text_tower(cfg: text.Config, params, path, vision_tower=None):
  """Writes the text tower as an HF directory.

  With `vision_tower=(vision_cfg, vision_params)` the result is a full `CLIPModel`.
  Without it, a `CLIPTextModelWithProjection` whose directory also keeps
  `visual_projection.weight` and `logit_scale` (transformers reports them as unused keys;
  `load_text_tower` reads them back), so nothing is lost.
  """
  import transformers
  tensors = _to_hf_tensors(params, _TEXT_NAMES)
  if vision_tower is not None:
    vcfg, vparams = vision_tower
    if vcfg.family != "clip" or vcfg.hidden_size != cfg.vision_hidden_size:
      raise ValueError(f"vision tower ({vcfg.family}, width {vcfg.hidden_size}) does not fit "
                       f"this text tower's visual_projection (CLIP, width "
                       f"{cfg.vision_hidden_size})")
    hf = transformers.CLIPConfig(text_config=_text_hf_config(cfg).to_dict(),
                                 vision_config=_vision_hf_config(vcfg).to_dict(),
                                 projection_dim=cfg.projection_dim,
                                 logit_scale_init_value=cfg.logit_scale_init)
    hf.architectures = ["CLIPModel"]
    tensors.update(_to_hf_tensors(vparams, _VISION_NAMES))
  else:
    hf = _text_hf_config(cfg)
    hf.vision_hidden_size = cfg.vision_hidden_size
    hf.logit_scale_init_value = cfg.logit_scale_init
    hf.architectures = ["CLIPTextModelWithProjection"]
  _save(path, hf, tensors)


#### Language model


def language_config(path, **overrides) -> language.Config:
  """The `language.Config` of a LLaMA / Qwen2 directory: its config.json, untied where its
  weights hold a head of their own although the config ties it (`_tie_as_stored`), so the
  config and `load_language_model` agree."""
  cfg = _language_config(_hf_config(path), os.path.join(path, "config.json"), **overrides)
  return _tie_as_stored(cfg, *_lm_tensors(path)) if _has_weights(path) else cfg


def _lm_tensors(path):
  tensors = _Tensors(path)
  return tensors, _detect(tensors, _LM_ANCHOR, _LM_NAMES, dataclasses.replace(_LM_NAMES,
                                                                                prefix=""))


def _has_weights(path) -> bool:
  return any(os.path.exists(os.path.join(path, f)) for f in (SAFETENSORS, SAFETENSORS_INDEX))


def _language_config(hf, where, **overrides) -> language.Config:
  if hf.model_type not in ("llama", "qwen2"):
    raise CheckpointError(f"{where}: model_type {hf.model_type!r} is not supported "
                          f"(llama, qwen2)")
  rope = dict(hf.rope_parameters or {})
  rope.pop("type", None)   # the old spelling of rope_type, which transformers has copied
  theta = float(rope.pop("rope_theta"))
  if float(rope.pop("partial_rotary_factor", 1.0)) != 1.0:
    raise CheckpointError(f"{where}: rope_parameters.partial_rotary_factor != 1 is not "
                          f"supported (RoPE over the whole head)")
  if rope.get("rope_type", "default") == "default":
    rope = {}
  try:
    language.check_rope_scaling(rope)
  except ValueError as e:
    raise CheckpointError(f"{where}: rope_parameters: {e}") from None
  if layers.ACTIVATIONS.get(hf.hidden_act) is not jax.nn.silu:   # SwiGLU: silu (or "swish")
    raise CheckpointError(f"{where}: hidden_act {hf.hidden_act!r} is not supported (silu)")
  # Qwen2's use_sliding_window slides only the layers from max_window_layers on, as its
  # layer_types say (none when max_window_layers >= the layer count).
  layer_types = getattr(hf, "layer_types", None)
  sliding = [i for i, kind in enumerate(layer_types or []) if kind == "sliding_attention"]
  if getattr(hf, "use_sliding_window", False) and (sliding or not layer_types):
    raise CheckpointError(f"{where}: sliding-window attention (layers {sliding}) is not "
                          f"supported")
  qwen2 = hf.model_type == "qwen2"
  bias = bool(getattr(hf, "attention_bias", False))
  return language.Config(
      family=hf.model_type, vocab_size=hf.vocab_size, hidden_size=hf.hidden_size,
      intermediate_size=hf.intermediate_size, num_layers=hf.num_hidden_layers,
      num_heads=hf.num_attention_heads,
      num_kv_heads=hf.num_key_value_heads or hf.num_attention_heads,
      head_dim=getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads,
      rms_norm_eps=hf.rms_norm_eps,
      rope_theta=theta, rope_scaling=rope, max_position_embeddings=hf.max_position_embeddings,
      qkv_bias=True if qwen2 else bias, o_bias=False if qwen2 else bias,
      mlp_bias=False if qwen2 else bool(getattr(hf, "mlp_bias", False)),   # Qwen2's has none
      tie_word_embeddings=bool(hf.tie_word_embeddings),
      **{k: getattr(hf, k, None) for k in ("bos_token_id", "eos_token_id", "pad_token_id")},
      **overrides)


def _tie_as_stored(cfg: language.Config, tensors, naming) -> language.Config:
  """`cfg` with the tie of the LM head as transformers loads the file (decided by the config
  readers, once): a tied config whose file stores an lm_head that differs from the embedding
  is loaded untied ("both are present in the checkpoints with different values, so we will
  NOT tie them"), saying so. A tied file storing only the head stays tied
  (`_read_shared_head`)."""
  head, embed = naming(("lm_head", "kernel")), naming(("embed_tokens", "embedding"))
  keys = tensors.keys()
  if not cfg.tie_word_embeddings or head not in keys or embed not in keys:
    return cfg
  shape = tensors.shape(embed)
  if tensors.shape(head) == shape and np.array_equal(tensors.get(head, shape),
                                                     tensors.get(embed, shape)):
    return cfg
  _warn_once("%s: tie_word_embeddings is set, but %s differs from %s: loaded untied, as "
             "transformers loads it", tensors.path, head, embed)
  return dataclasses.replace(cfg, tie_word_embeddings=False)


def _read_shared_head(cfg: language.Config, tensors, naming):
  """A tied file that stores the shared matrix only as lm_head (transformers ties either
  way): the embedding is read from the head (`tensors.alias`)."""
  head, embed = naming(("lm_head", "kernel")), naming(("embed_tokens", "embedding"))
  if cfg.tie_word_embeddings and head in tensors.keys() and embed not in tensors.keys():
    tensors.alias(embed, head)


@functools.cache
def _warn_once(message, *args):
  """A warning logged once per process (a run reads a checkpoint's config, then loads it)."""
  logging.warning(message, *args)


def load_language_model(path, **overrides):
  """A LLaMA or Qwen2 causal LM from a local HF directory. Returns (language.Config, params)."""
  cfg = language_config(path, **overrides)
  tensors, naming = _lm_tensors(path)
  _read_shared_head(cfg, tensors, naming)
  ignore = lambda k: (k.endswith("rotary_emb.inv_freq")
                      or (cfg.tie_word_embeddings and k == "lm_head.weight"))
  params = _load_params(tensors, naming, _shapes(language.init, cfg), ignore)
  return cfg, params


def _language_hf_config(cfg: language.Config):
  import transformers
  common = dict(
      vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
      intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
      num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
      head_dim=cfg.dim_per_head, rms_norm_eps=cfg.rms_norm_eps,
      max_position_embeddings=cfg.max_position_embeddings,
      rope_parameters={"rope_type": "default", **dict(cfg.rope_scaling),
                       "rope_theta": cfg.rope_theta},
      tie_word_embeddings=cfg.tie_word_embeddings, bos_token_id=cfg.bos_token_id,
      eos_token_id=(list(cfg.eos_token_id) if isinstance(cfg.eos_token_id, tuple)
                    else cfg.eos_token_id), pad_token_id=cfg.pad_token_id)
  if cfg.family == "qwen2":
    if not cfg.qkv_bias or cfg.o_bias or cfg.mlp_bias:
      raise ValueError("Qwen2 has q/k/v biases only; set family='llama' for other bias layouts")
    hf = transformers.Qwen2Config(**common)
    hf.architectures = ["Qwen2ForCausalLM"]
  else:
    if cfg.qkv_bias != cfg.o_bias:
      raise ValueError("LLaMA's attention_bias covers q, k, v and o together; qkv_bias and "
                       "o_bias must match")
    hf = transformers.LlamaConfig(attention_bias=cfg.qkv_bias, mlp_bias=cfg.mlp_bias, **common)
    hf.architectures = ["LlamaForCausalLM"]
  return hf


def save_language_model(cfg: language.Config, params, path):
  """Writes an HF `LlamaForCausalLM` / `Qwen2ForCausalLM` directory."""
  _save(path, _language_hf_config(cfg), _to_hf_tensors(params, _LM_NAMES))


#### LLaVA VLM (vision tower + projector + LM), plus the DriVLM parts beside it

DRIVLM_PARTS = "drivlm.safetensors"   # heads, reweighting scorer and camera embeddings,
_DRIVLM_KEYS = ("heads", "reweighting", "cameras")   # our names, beside LLaVA
_DRIVLM_FIELDS = ("head_hidden", "num_actions", "num_reasons", "reweight", "reweight_dim",
                  "reweight_layer", "num_cameras")
# Two layouts: what transformers' save_pretrained writes (first, and what save_vlm writes),
# and its module names (`model.` ...), which other tools write.
_LLAVA_VISION = tuple(dataclasses.replace(_VISION_NAMES, prefix=p) for p in (
    "vision_tower.", "vision_tower.vision_model.", "model.vision_tower.",
    "model.vision_tower.vision_model."))
_LLAVA_PROJECTOR = (_Naming(prefix="multi_modal_projector."),
                    _Naming(prefix="model.multi_modal_projector."))
_LLAVA_LM = (_Naming(prefix="language_model.model.", own=(("lm_head", "language_model."),)),
             _Naming(prefix="model.language_model.", own=(("lm_head", ""),)))


def vlm_config(path, *, vision_overrides=None, language_overrides=None,
               **overrides) -> vlm.Config:
  """The `vlm.Config` of an HF `LlavaForConditionalGeneration` directory. The overrides set
  non-architectural fields (dtype, remat, scan_unroll; VLM-level: heads, reweighting)."""
  hf = _hf_config(path)
  where = os.path.join(path, "config.json")
  if hf.model_type != "llava":
    raise CheckpointError(f"{where}: model_type {hf.model_type!r} is not 'llava' (an HF "
                          f"LlavaForConditionalGeneration directory)")
  layer = hf.vision_feature_layer       # an int or (transformers checks) a list of ints
  layer = layer if isinstance(layer, int) else tuple(layer)
  act = _activation(hf.projector_hidden_act, where, "projector_hidden_act")
  vcfg = _vision_config(hf.vision_config, f"{where} (vision_config)",
                        **{**processor_statistics(path), **(vision_overrides or {})})
  if vcfg.family == "siglip" and vcfg.use_head and _head_not_stored(path):
    # LLaVA projects hidden states, never the pooled output: transformers loads such a
    # directory with a random head; ours has none.
    logging.warning("%s: the SigLIP tower's config has vision_use_head but the checkpoint "
                    "has no head tensors; the tower is taken without its pooling head, which "
                    "LLaVA does not use", path)
    vcfg = dataclasses.replace(vcfg, use_head=False)
  lcfg = _language_config(hf.text_config, f"{where} (text_config)", **(language_overrides or {}))
  # LLaVA ties lm_head by its own (top-level) flag, and the weights may untie it (as in
  # `language_config`).
  lcfg = dataclasses.replace(lcfg, tie_word_embeddings=bool(hf.tie_word_embeddings))
  if _has_weights(path):
    tensors = _Tensors(path)
    lcfg = _tie_as_stored(lcfg, tensors, _detect(tensors, _LM_ANCHOR, *_LLAVA_LM))
  parts = _drivlm_fields(path)
  try:
    return vlm.Config(vision=vcfg, language=lcfg, image_token_id=hf.image_token_index,
                      vision_feature_layer=layer,
                      vision_feature_select_strategy=hf.vision_feature_select_strategy,
                      projector_act=act,
                      projector_bias=bool(getattr(hf, "multimodal_projector_bias", True)),
                      **{**parts, **overrides})
  except ValueError as e:
    raise CheckpointError(f"{where}: {e}") from e


def _head_not_stored(path) -> bool:
  """Whether a LLaVA directory's weights lack the SigLIP pooling head (either layout)."""
  if not _has_weights(path):
    return False   # no weights to read: the config decides
  tensors = _Tensors(path)
  naming = _detect(tensors, _VISION_ANCHOR, *_LLAVA_VISION)
  return naming(("head", "probe")) not in tensors.keys()


def _drivlm_fields(path) -> dict:
  file = os.path.join(path, DRIVLM_PARTS)
  if not os.path.exists(file):
    return {}
  from safetensors import safe_open
  with safe_open(file, framework="numpy") as f:
    meta = f.metadata() or {}
  if "drivlm_config" not in meta:
    raise CheckpointError(f"{file}: no 'drivlm_config' metadata (not written by save_vlm)")
  return json.loads(meta["drivlm_config"])


def load_vlm(path, **overrides):
  """An HF LLaVA directory -> (vlm.Config, params). The params hold what the directory has:
  "vision", "projector", "language", and "heads" / "reweighting" / "cameras" when
  `drivlm.safetensors`
  (written by `save_vlm`) is beside it; complete them with fresh ones from `vlm.init`.
  `overrides` as `vlm_config`. Every tensor must fit the model and be used: a mismatch is an
  error naming the tensor."""
  cfg = vlm_config(path, **overrides)
  tensors = _Tensors(path)
  params, used = {}, set()
  vision_naming = _detect(tensors, _VISION_ANCHOR, *_LLAVA_VISION)
  lm_naming = _detect(tensors, _LM_ANCHOR, *_LLAVA_LM)
  _read_shared_head(cfg.language, tensors, lm_naming)
  shapes = _shapes(vlm.init, cfg)
  for part, naming in (("vision", vision_naming), ("language", lm_naming),
                       ("projector", _detect(tensors, "linear_1.weight", *_LLAVA_PROJECTOR))):
    params[part], names = _read(tensors, naming, shapes[part])
    used |= names
  tied_head = lm_naming(("lm_head", "kernel"))
  unread_head = _unread_head(cfg.vision, tensors, vision_naming)
  _check_all_used(tensors, used, lambda k: (
      k.endswith((".position_ids", "rotary_emb.inv_freq"))
      or (cfg.language.tie_word_embeddings and k == tied_head) or unread_head(k)))
  file = os.path.join(path, DRIVLM_PARTS)
  if os.path.exists(file):
    params.update(_read_drivlm_parts(file, shapes))
  return cfg, params


def _read_drivlm_parts(file, shapes) -> dict:
  """`drivlm.safetensors`: our param paths joined by '.', stored as they are. Reads the parts
  it holds (`_DRIVLM_KEYS`); each must be whole and fit `shapes`."""
  from safetensors.numpy import load_file
  arrays = load_file(file)
  tops = {k.split(".")[0] for k in arrays}
  unknown = tops - set(_DRIVLM_KEYS) or (tops - set(shapes))
  if unknown:
    raise CheckpointError(f"{file}: part(s) {sorted(unknown)} the model has no place for "
                          f"(reweighting needs reweight=True, cameras num_cameras > 1)")
  flat = traverse_util.flatten_dict({k: shapes[k] for k in tops})
  params = {}
  for p, sds in flat.items():
    name = ".".join(p)
    if name not in arrays:
      raise CheckpointError(f"{file}: missing tensor {name!r} (expected shape {sds.shape})")
    if arrays[name].shape != sds.shape:
      raise CheckpointError(f"{file}: tensor {name!r} has shape {arrays[name].shape}, the "
                            f"model expects {sds.shape}")
    params[p] = jax.numpy.asarray(arrays.pop(name), sds.dtype)
  if arrays:
    raise CheckpointError(f"{file}: unexpected tensor(s) {sorted(arrays)[:8]}")
  return traverse_util.unflatten_dict(params)


def _llava_hf_config(cfg: vlm.Config):
  import transformers
  text = _language_hf_config(cfg.language)
  hf = transformers.LlavaConfig(
      vision_config=_vision_hf_config(cfg.vision).to_dict(), text_config=text.to_dict(),
      image_token_index=cfg.image_token_id,
      image_seq_length=cfg.num_visual_tokens // cfg.num_cameras,   # per image
      vision_feature_layer=(cfg.vision_feature_layer if isinstance(cfg.vision_feature_layer, int)
                            else list(cfg.vision_feature_layer)),
      vision_feature_select_strategy=cfg.vision_feature_select_strategy,
      projector_hidden_act=cfg.projector_act, multimodal_projector_bias=cfg.projector_bias,
      tie_word_embeddings=cfg.language.tie_word_embeddings)
  hf.architectures = ["LlavaForConditionalGeneration"]
  return hf


def save_vlm(cfg: vlm.Config, params, path, tokenizer=None):
  """Writes an HF `LlavaForConditionalGeneration` directory (transformers' own layout) and,
  beside it, the DriVLM heads, reweighting scorer and camera embeddings as
  `drivlm.safetensors` with the VLM-level config in its metadata. LoRA params must be
  merged first (`lora.merge`). `tokenizer`: a checkpoint directory whose tokenizer, processor
  and chat template files are copied along, so `AutoProcessor.from_pretrained(path)` works
  too."""
  import shutil
  from safetensors.numpy import save_file
  if "lora" in params:
    raise ValueError("params hold unmerged LoRA adapters; lora.merge them first")
  vision_naming, lm_naming, projector_naming = (
      _LLAVA_VISION[0], _LLAVA_LM[0], _LLAVA_PROJECTOR[0])
  tensors = {**_to_hf_tensors(params["vision"], vision_naming),
             **_to_hf_tensors(params["projector"], projector_naming),
             **_to_hf_tensors(params["language"], lm_naming)}
  _save(path, _llava_hf_config(cfg), tensors)
  ours = {k: v for k, v in params.items() if k in _DRIVLM_KEYS}
  flat = {".".join(p): np.ascontiguousarray(np.asarray(v))
          for p, v in traverse_util.flatten_dict(ours).items()}
  fields = {f: getattr(cfg, f) for f in _DRIVLM_FIELDS}
  save_file(flat, os.path.join(path, DRIVLM_PARTS),
            metadata={"drivlm_config": json.dumps(fields)})
  if tokenizer:
    for name in sorted(os.listdir(tokenizer)):
      if name in _TOKENIZER_FILES or name.startswith(("tokenizer", "chat_template")):
        shutil.copy(os.path.join(tokenizer, name), os.path.join(path, name))
  _save_image_processor(cfg.vision, path)


_TOKENIZER_FILES = ("special_tokens_map.json", "vocab.json", "merges.txt",
                    "added_tokens.json", "processor_config.json")


def _save_image_processor(cfg: vision.Config, path):
  """The tower's image processor (`image_processor`) as preprocessor_config.json and, where a
  processor_config.json nests one (transformers 5's LLaVA processor), there too: transformers
  reads the nested one first."""
  ours = image_processor(cfg)
  ours.save_pretrained(path)
  file = os.path.join(path, PROCESSOR)
  if not os.path.exists(file):
    return
  with open(file) as f:
    processor = json.load(f)
  theirs = processor.get("image_processor")
  if theirs is None:
    return
  if [theirs.get(k) for k in ("image_mean", "image_std")] != [
      [float(v) for v in getattr(ours, k)] for k in ("image_mean", "image_std")]:
    logging.warning("%s: the copied processor's image statistics %s / %s replaced by the "
                    "tower's %s / %s", file, theirs.get("image_mean"), theirs.get("image_std"),
                    ours.image_mean, ours.image_std)
  processor["image_processor"] = ours.to_dict()
  with open(file, "w") as f:
    json.dump(processor, f, indent=2, sort_keys=True)
