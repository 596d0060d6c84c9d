"""HF checkpoints (local directory, safetensors only) <-> our params, both directions.

Our param trees mirror HF module names, so the mapping is generic: a path such as
`encoder/layers/self_attn/q_proj/kernel` becomes `vision_model.encoder.layers.{i}.self_attn.
q_proj.weight` (stacked `layers` are split per layer), and each leaf is converted by one of
four transforms chosen by its name: linear kernels are transposed (torch stores [out, in])
and reshaped to our head-split shapes, the patch conv goes OIHW <-> HWIO, biases are
flattened, everything else is copied. Pickle checkpoints (`*.bin`, `*.pt`) are never read.
"""
import dataclasses
import json
import math
import os
import re
from typing import Callable

import jax
import numpy as np
from flax import traverse_util

from drivlm_jax.model import language, text, vision

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
    if os.path.exists(index):
      with open(index) as f:
        weight_map = json.load(f).get("weight_map")
      if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index}: no 'weight_map' object")
      files = sorted(set(weight_map.values()))
    elif os.path.exists(single):
      files = [SAFETENSORS]
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

  def keys(self):
    return self._where.keys()

  def shape(self, name):
    return tuple(self._handles[self._where[name]].get_slice(name).get_shape())

  def get(self, name, expected_shape):
    if name not in self._where:
      raise CheckpointError(f"{self.path}: missing tensor {name!r} (expected shape "
                            f"{tuple(expected_shape)})")
    if self.shape(name) != tuple(expected_shape):
      raise CheckpointError(f"{self.path}: tensor {name!r} has shape {self.shape(name)} in the "
                            f"checkpoint, the model expects {tuple(expected_shape)}")
    return self._handles[self._where[name]].get_tensor(name)


def _hf_config(path):
  import transformers
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

  `prefix` goes before every name except those of the top-level entries in `unprefixed`
  (e.g. `lm_head` next to `model.`). Checkpoints differ in prefix (transformers 5 saves a
  standalone CLIPVisionModel without `vision_model.`), so loaders pick it with `detect`.
  """
  prefix: str = ""
  unprefixed: tuple = ()
  subs: tuple = ()

  def __call__(self, path):
    parts = ["layers.{i}" if p == "layers" else p for p in path[:-1]]
    name = ".".join(parts + [_LEAF_NAMES.get(path[-1], path[-1])])
    for pattern, repl in self.subs:
      name = re.sub(pattern, repl, name)
    return name if path[0] in self.unprefixed else self.prefix + name

  def detect(self, tensors, anchor):
    """This naming with the prefix under which `anchor` is found in the checkpoint."""
    for prefix in (self.prefix, ""):
      if prefix + anchor in tensors.keys():
        return dataclasses.replace(self, prefix=prefix)
    return self  # the anchor's "missing tensor" error follows


_VISION_NAMES = _Naming(prefix="vision_model.", subs=tuple(_SIGLIP_HEAD))
_TEXT_NAMES = _Naming()
_LM_NAMES = _Naming(prefix="model.", unprefixed=("lm_head",))


def _is_stacked(path):
  return "layers" in path


#### Generic load / save


def _load_params(tensors, naming, shapes, ignore):
  """Reads every leaf of `shapes` (a tree of ShapeDtypeStructs) from `tensors`; tensors that
  no leaf uses and `ignore(name)` does not excuse are an error."""
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
  extra = sorted(k for k in tensors.keys() if k not in used and not ignore(k))
  if extra:
    shown = ", ".join(f"{k} {tensors.shape(k)}" for k in extra[:8])
    raise CheckpointError(f"{tensors.path}: {len(extra)} unexpected tensor(s) the model has no place "
                          f"for: {shown}{' ...' if len(extra) > 8 else ''}")
  return traverse_util.unflatten_dict(params)


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
  from safetensors.numpy import save_file
  os.makedirs(path, exist_ok=True)
  hf_config.save_pretrained(path)
  save_file(tensors, os.path.join(path, SAFETENSORS), metadata={"format": "pt"})


def _shapes(init_fn, cfg):
  return jax.eval_shape(lambda key: init_fn(cfg, key), jax.random.key(0))


#### Vision tower


def vision_config(path, **overrides) -> vision.Config:
  hf = _hf_config(path)
  if hf.model_type in ("clip", "siglip"):
    hf = hf.vision_config
  if hf.model_type not in ("clip_vision_model", "siglip_vision_model"):
    raise CheckpointError(f"{path}/config.json: model_type {hf.model_type!r} is not a CLIP or "
                          f"SigLIP vision model")
  siglip = hf.model_type == "siglip_vision_model"
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
  naming = _VISION_NAMES.detect(tensors, "embeddings.patch_embedding.weight")
  # A full CLIPModel/SiglipModel also holds the text tower: only our prefix is ours.
  ignore = lambda k: not k.startswith(naming.prefix) or k.endswith(".position_ids")
  params = _load_params(tensors, naming, _shapes(vision.init, cfg), ignore)
  return cfg, params


def _vision_hf_config(cfg: vision.Config):
  import transformers
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
      layer_norm_eps=tc.layer_norm_eps, hidden_act=tc.hidden_act, eos_token_id=tc.eos_token_id,
      projection_dim=projection_dim, vision_hidden_size=vision_hidden,
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
  hf = _hf_config(path)
  where = os.path.join(path, "config.json")
  if hf.model_type not in ("llama", "qwen2"):
    raise CheckpointError(f"{where}: model_type {hf.model_type!r} is not supported "
                          f"(llama, qwen2)")
  rope = dict(hf.rope_parameters or {})
  if rope.get("rope_type", "default") != "default":
    raise CheckpointError(f"{where}: rope_parameters.rope_type {rope['rope_type']!r} is not "
                          f"supported; only 'default' RoPE is implemented")
  if hf.hidden_act != "silu":
    raise CheckpointError(f"{where}: hidden_act {hf.hidden_act!r} is not supported (silu)")
  if getattr(hf, "use_sliding_window", False):
    raise CheckpointError(f"{where}: sliding-window attention is not supported")
  qwen2 = hf.model_type == "qwen2"
  bias = bool(getattr(hf, "attention_bias", False))
  return language.Config(
      family=hf.model_type, vocab_size=hf.vocab_size, hidden_size=hf.hidden_size,
      intermediate_size=hf.intermediate_size, num_layers=hf.num_hidden_layers,
      num_heads=hf.num_attention_heads,
      num_kv_heads=hf.num_key_value_heads or hf.num_attention_heads,
      head_dim=getattr(hf, "head_dim", None), rms_norm_eps=hf.rms_norm_eps,
      rope_theta=float(rope["rope_theta"]), max_position_embeddings=hf.max_position_embeddings,
      qkv_bias=True if qwen2 else bias, o_bias=False if qwen2 else bias,
      mlp_bias=bool(getattr(hf, "mlp_bias", False)),
      tie_word_embeddings=bool(hf.tie_word_embeddings), **overrides)


def load_language_model(path, **overrides):
  """A LLaMA or Qwen2 causal LM from a local HF directory. Returns (language.Config, params)."""
  cfg = language_config(path, **overrides)
  ignore = lambda k: (k.endswith("rotary_emb.inv_freq")
                      or (cfg.tie_word_embeddings and k == "lm_head.weight"))
  tensors = _Tensors(path)
  naming = _LM_NAMES.detect(tensors, "embed_tokens.weight")
  params = _load_params(tensors, naming, _shapes(language.init, cfg), ignore)
  return cfg, params


def save_language_model(cfg: language.Config, params, path):
  """Writes an HF `LlamaForCausalLM` / `Qwen2ForCausalLM` directory."""
  import transformers
  common = dict(
      vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
      intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
      num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
      head_dim=cfg.dim_per_head, rms_norm_eps=cfg.rms_norm_eps,
      max_position_embeddings=cfg.max_position_embeddings,
      rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
      tie_word_embeddings=cfg.tie_word_embeddings)
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
  _save(path, hf, _to_hf_tensors(params, _LM_NAMES))
