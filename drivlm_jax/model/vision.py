"""ViT vision tower in the CLIP and SigLIP variants.

CLIP:   patches + class token -> pre_layrnorm -> encoder; pooled = post_layernorm(class token).
SigLIP: patches (with bias)   -> encoder -> post_layernorm; pooled = attention-pooling head.
Images are NHWC float32, already normalised by the checkpoint's processor statistics.
"""
import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from drivlm_jax.model import layers


@dataclasses.dataclass(frozen=True)
class Config:
  family: str = "clip"            # "clip" | "siglip"
  image_size: int = 224
  patch_size: int = 16
  num_channels: int = 3
  hidden_size: int = 768
  intermediate_size: int = 3072
  num_layers: int = 12
  num_heads: int = 12
  layer_norm_eps: float = 1e-5
  hidden_act: str = "quick_gelu"
  use_head: bool = True           # SigLIP attention-pooling head
  dtype: str = "float32"          # compute dtype
  param_dtype: str = "float32"
  scan_unroll: int = 1
  remat: bool = False
  scan: bool = True               # False: a Python loop over the same params (`layers.LayerLoop`)
  # Per-image standardisation of the normalised input (`standardize`): not in HF's towers.
  standardize: bool = False
  # The checkpoint's processor statistics (preprocessor_config.json), per channel; None: the
  # family's (`data.preprocess.statistics`).
  image_mean: tuple[float, ...] | None = None
  image_std: tuple[float, ...] | None = None

  def __post_init__(self):
    if self.family not in ("clip", "siglip"):
      raise ValueError(f"vision family must be 'clip' or 'siglip', got {self.family!r}")
    for name in ("image_mean", "image_std"):
      value = getattr(self, name)
      if value is None:
        continue
      value = tuple(float(v) for v in value)   # a list, from config.json
      object.__setattr__(self, name, value)
      if len(value) != self.num_channels:
        raise ValueError(f"{name} {value}: one value per channel ({self.num_channels})")
    if self.image_std is not None and min(self.image_std) <= 0:
      raise ValueError(f"image_std {self.image_std}: must be positive")
    if self.patch_size > self.image_size:
      raise ValueError(f"patch_size {self.patch_size} is larger than image_size "
                       f"{self.image_size}")
    if self.hidden_size % self.num_heads:
      raise ValueError(f"hidden_size {self.hidden_size} not divisible by {self.num_heads} heads")

  @property
  def grid(self) -> int:
    return self.image_size // self.patch_size

  @property
  def num_patches(self) -> int:
    return self.grid ** 2


STANDARDIZE_EPS = 0.1   # in normalised units: about 7/255 of pixel std for CLIP's statistics


def standardize(images):
  """Each image over its pixels and channels: (x - mean) / (std + eps), mean 0 and std
  std / (std + eps) < 1. Removes an image's brightness and most of its contrast (night, fog,
  exposure) but keeps its colours relative to each other; eps keeps a flat image's noise from
  being blown up (a day image of CLIP-normalised std ~0.8 ends near 0.9, a night+fog one of
  ~0.1 near 0.5)."""
  axes = tuple(range(1, images.ndim))
  mean = jnp.mean(images, axis=axes, keepdims=True)
  std = jnp.sqrt(jnp.mean(jnp.square(images - mean), axis=axes, keepdims=True))
  return (images - mean) / (std + STANDARDIZE_EPS)


def patchify(images, patch_size):
  """[B, H, W, C] -> [B, H//p * W//p, p * p * C], row-major patches, as a stride-p "valid"
  conv: a remainder of the image that fills no whole patch is dropped (SigLIP-so400m-
  patch14-384: 27 x 27 patches)."""
  b, h, w, c = images.shape
  p = patch_size
  images = images[:, :h // p * p, :w // p * p]
  x = images.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, (h // p) * (w // p), p * p * c)


class Embeddings(nn.Module):
  cfg: Any

  @nn.compact
  def __call__(self, images):
    cfg = self.cfg
    c, d = cfg.num_channels, cfg.hidden_size
    if images.shape[1:] != (cfg.image_size, cfg.image_size, c):
      raise ValueError(f"images must be [B, {cfg.image_size}, {cfg.image_size}, {c}] (NHWC), "
                       f"got {list(images.shape)}")
    if cfg.standardize:
      images = standardize(images.astype(jnp.float32))
    x = PatchEmbedding(cfg, name="patch_embedding")(images.astype(cfg.dtype))
    if cfg.family == "clip":
      cls = layers.param(self, "class_embedding", (d,), ("embed",), dtype=cfg.param_dtype)
      cls = jnp.broadcast_to(cls.astype(cfg.dtype), (x.shape[0], 1, d))
      x = jnp.concatenate([cls, x], axis=1)
    pos = layers.embed(x.shape[1], d, cfg=cfg, name="position_embedding", axes=(None, "embed"),
                       init_std=d ** -0.5)
    return x + pos(jnp.arange(x.shape[1]))[None]


class PatchEmbedding(nn.Module):
  """Stride-p conv as a matmul: kernel [p, p, C, D] (HWIO), bias only for SigLIP."""
  cfg: Any

  @nn.compact
  def __call__(self, images):
    cfg = self.cfg
    p, c, d = cfg.patch_size, cfg.num_channels, cfg.hidden_size
    kernel = layers.param(self, "kernel", (p, p, c, d), (None, None, None, "embed"),
                          init=nn.initializers.lecun_normal(), dtype=cfg.param_dtype)
    x = layers.contract_last(patchify(images, p), kernel.reshape(p * p * c, d), 1)
    if cfg.family == "siglip":
      x = layers.add_bias(x, layers.param(self, "bias", (d,), ("embed",),
                                          init=nn.initializers.zeros, dtype=cfg.param_dtype))
    return layers.constrain(x, "batch", "length", "embed")


class PoolingHead(nn.Module):
  """SigLIP multi-head attention pooling: a learned probe attends over all tokens."""
  cfg: Any

  @nn.compact
  def __call__(self, x):
    cfg = self.cfg
    b, d, heads = x.shape[0], cfg.hidden_size, cfg.num_heads
    probe = layers.param(self, "probe", (1, 1, d), (None, None, "embed"), dtype=cfg.param_dtype)
    probe = jnp.broadcast_to(probe.astype(cfg.dtype), (b, 1, d))
    # torch.nn.MultiheadAttention packs q, k, v: in_proj kernel [D, 3, H, Dh].
    in_proj = layers.dense((3, heads, d // heads), ("embed",), (None, "heads", "kv"),
                           cfg=cfg, name="in_proj")
    q = in_proj(probe)[:, :, 0]
    kv = in_proj(x)
    h = layers.attention(q, kv[:, :, 1], kv[:, :, 2])
    h = layers.dense(d, ("heads", "kv"), ("embed",), cfg=cfg, name="out_proj", axis=(-2, -1))(h)
    h = h + layers.Mlp(cfg, name="mlp")(layers.layer_norm(cfg, "layernorm", cfg.layer_norm_eps)(h))
    return h[:, 0]


class VisionTower(nn.Module):
  """part="all": images -> outputs. The tower can also run in two parts around a point
  between layers (for pruning inside the tower): "stem" (images -> hidden states after
  cfg.num_layers layers) and "tail" (hidden states -> outputs, cfg.num_layers more layers);
  each part takes its own slice of the stacked layer params (see `split`). A tail may run
  on the tokens of several camera views together (`views`, CLIP: their class tokens first);
  CLIP's pooled feature is then the mean of the views' pooled class tokens."""
  cfg: Any
  part: str = "all"
  views: int = 1

  @nn.compact
  def __call__(self, inputs):
    cfg = self.cfg
    x = inputs
    if self.part in ("all", "stem"):
      x = Embeddings(cfg, name="embeddings")(x)
      if cfg.family == "clip":
        x = layers.layer_norm(cfg, "pre_layrnorm", cfg.layer_norm_eps)(x)
    if cfg.num_layers:
      x = layers.Encoder(cfg, name="encoder")(x)
    if self.part == "stem":
      return x
    post_ln = layers.layer_norm(cfg, "post_layernorm", cfg.layer_norm_eps)
    if cfg.family == "clip":
      pooled = (post_ln(x[:, 0]) if self.views == 1 else
                jnp.mean(post_ln(x[:, :self.views]), axis=1))
      return {"last_hidden_state": x, "pooled": pooled, "patch_features": x[:, self.views:],
              "hidden": x}
    out = post_ln(x)
    # SigLIP has no class token: with several views its attention-pooling head pools every
    # view's (kept) tokens together, where CLIP averages the views' class tokens; pruning
    # keeps a different number of tokens per view, so there is no per-view pool to average.
    pooled = PoolingHead(cfg, name="head")(out) if cfg.use_head else jnp.mean(out, axis=1)
    return {"last_hidden_state": out, "pooled": pooled, "patch_features": x, "hidden": x}


def init(cfg: Config, key) -> dict:
  """Random params (plain nested dict) for a vision tower."""
  images = jnp.zeros((1, cfg.image_size, cfg.image_size, cfg.num_channels), jnp.float32)
  return layers.unbox(VisionTower(layers.scanned(cfg)).init(key, images))


def apply(cfg: Config, params: dict, pixel_values) -> dict:
  """pixel_values: [B, H, W, 3] float32, normalised.

  Returns {"last_hidden_state": [B, N(+1), D], "pooled": [B, D]}, equal to HF's
  `last_hidden_state` and `pooler_output` (CLIP keeps the class token at position 0), and
  "patch_features": [B, N, D], the encoder output at the patches before any post-LayerNorm
  (HF `hidden_states[-1]` without the class token), and "hidden": [B, N(+1), D], the same
  with every token (HF `hidden_states[-1]`, from which LLaVA selects what it projects).
  """
  return VisionTower(cfg).apply({"params": params}, pixel_values)


def split(cfg: Config, params: dict, layer: int):
  """(stem, tail) of the tower at `layer` (0 <= layer <= num_layers), each a (Config, params)
  pair for `apply_part`: stem = embeddings + the first `layer` layers, tail = the rest."""
  if not 0 <= layer <= cfg.num_layers:
    raise ValueError(f"split layer {layer} is outside a {cfg.num_layers}-layer tower")
  stacked = params["encoder"]["layers"]
  part = lambda lo, hi: ({"encoder": {"layers": jax.tree.map(lambda x: x[lo:hi], stacked)}}
                         if hi > lo else {})
  stem = {k: v for k, v in params.items() if k in ("embeddings", "pre_layrnorm")}
  tail = {k: v for k, v in params.items() if k in ("post_layernorm", "head")}
  return ((dataclasses.replace(cfg, num_layers=layer), {**stem, **part(0, layer)}),
          (dataclasses.replace(cfg, num_layers=cfg.num_layers - layer),
           {**tail, **part(layer, cfg.num_layers)}))


def apply_part(cfg: Config, params: dict, inputs, part: str, views: int = 1):
  """part "stem": images -> hidden states [B, T, D] (CLIP: class token first);
  part "tail": hidden states -> `apply`'s outputs; with `views` > 1 the hidden states hold
  that many views' tokens (CLIP: the `views` class tokens first)."""
  return VisionTower(cfg, part, views).apply({"params": params}, inputs)


def apply_layers(cfg: Config, params: dict, hidden, lo: int, hi: int):
  """Encoder layers lo..hi-1 of the tower on hidden states [B, T, D] (nothing else)."""
  if hi == lo:
    return hidden
  stacked = jax.tree.map(lambda x: x[lo:hi], params["encoder"]["layers"])
  return layers.Encoder(dataclasses.replace(cfg, num_layers=hi - lo)).apply(
      {"params": {"layers": stacked}}, hidden)


def logical_axes(cfg: Config):
  """Logical PartitionSpec per parameter (same tree as `init`)."""
  images = jax.ShapeDtypeStruct((1, cfg.image_size, cfg.image_size, cfg.num_channels), jnp.float32)
  return layers.logical_axes(VisionTower(layers.scanned(cfg)).init, jax.random.key(0), images)


def layer_position(cfg: Config, feature_layer: int) -> int:
  """How many layers HF `hidden_states[feature_layer]` has run (-1 = all, -2 = all but the
  last, k >= 0 = the first k)."""
  n = feature_layer if feature_layer >= 0 else cfg.num_layers + 1 + feature_layer
  if not 0 <= n <= cfg.num_layers:
    raise ValueError(f"feature_layer {feature_layer} is outside a {cfg.num_layers}-layer tower")
  return n


def truncate(cfg: Config, params: dict, feature_layer: int):
  """The tower up to HF `hidden_states[feature_layer]` (`layer_position`): a (Config, params)
  pair whose stacked layers are sliced."""
  n = layer_position(cfg, feature_layer)
  if n == cfg.num_layers:
    return cfg, params
  encoder = {"layers": jax.tree.map(lambda x: x[:n], params["encoder"]["layers"])}
  return dataclasses.replace(cfg, num_layers=n), {**params, "encoder": encoder}
