"""CLIP text tower with the CLIPModel projections, for CLIP fine-tuning.

Causal transformer over token + position embeddings, final LayerNorm, pooled at the EOS
token; `text_projection` / `visual_projection` map the pooled text / image features into the
joint space, and `logit_scale` (log of the inverse temperature) scales their cosine similarity.
"""
import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from drivlm_jax.model import layers


@dataclasses.dataclass(frozen=True)
class Config:
  vocab_size: int = 49408
  max_position_embeddings: int = 77
  hidden_size: int = 512
  intermediate_size: int = 2048
  num_layers: int = 12
  num_heads: int = 8
  layer_norm_eps: float = 1e-5
  hidden_act: str = "quick_gelu"
  eos_token_id: int = 49407        # 2 = legacy rule: pool at argmax(input_ids)
  pool: str = "eos"                # "eos": HF's rule above; "last": last attended token
  projection_dim: int = 512
  vision_hidden_size: int = 768    # input width of `visual_projection`
  logit_scale_init: float = 2.6592
  dtype: str = "float32"
  param_dtype: str = "float32"
  scan_unroll: int = 1
  remat: bool = False
  scan: bool = True               # False: a Python loop over the same params (`layers.LayerLoop`)


def eos_positions(cfg: Config, input_ids):
  """Index of the pooled token per row, by HF CLIP's rule. input_ids [B, T] -> [B]."""
  if cfg.eos_token_id == 2:  # checkpoints from before transformers PR #24773
    return jnp.argmax(input_ids, axis=-1)
  return jnp.argmax(input_ids == cfg.eos_token_id, axis=-1)


class TextEmbeddings(nn.Module):
  cfg: Any

  @nn.compact
  def __call__(self, input_ids):
    cfg = self.cfg
    if input_ids.shape[1] > cfg.max_position_embeddings:
      raise ValueError(f"{input_ids.shape[1]} tokens: the CLIP text tower takes at most "
                       f"max_position_embeddings = {cfg.max_position_embeddings}")
    tok = layers.embed(cfg.vocab_size, cfg.hidden_size, cfg=cfg, name="token_embedding")
    pos = layers.embed(cfg.max_position_embeddings, cfg.hidden_size, cfg=cfg,
                       name="position_embedding", axes=(None, "embed"))
    return tok(input_ids) + pos(jnp.arange(input_ids.shape[1]))[None]


class TextTransformer(nn.Module):
  """input_ids, attention_mask [B, T] -> (last_hidden_state [B, T, D], pooled [B, D])."""
  cfg: Any

  @nn.compact
  def __call__(self, input_ids, attention_mask):
    cfg = self.cfg
    b, t = input_ids.shape
    x = TextEmbeddings(cfg, name="embeddings")(input_ids)
    mask = jnp.tril(jnp.ones((t, t), bool))[None] & (attention_mask[:, None, :] > 0)
    x = layers.Encoder(cfg, name="encoder")(x, mask)
    x = layers.layer_norm(cfg, "final_layer_norm", cfg.layer_norm_eps)(x)
    if cfg.pool == "last":
      positions = jnp.sum(attention_mask > 0, axis=-1) - 1
    else:
      positions = eos_positions(cfg, input_ids)
    return x, x[jnp.arange(b), positions]


class ClipText(nn.Module):
  """Everything of a CLIPModel but its vision tower (HF names)."""
  cfg: Any

  def setup(self):
    cfg = self.cfg
    self.text_model = TextTransformer(cfg)
    self.text_projection = layers.dense(cfg.projection_dim, ("embed",), ("proj",), cfg=cfg,
                                        name=None, use_bias=False)
    self.visual_projection = layers.dense(cfg.projection_dim, ("embed",), ("proj",), cfg=cfg,
                                          name=None, use_bias=False)
    self.logit_scale = layers.param(self, "logit_scale", (), (),
                                    init=nn.initializers.constant(cfg.logit_scale_init),
                                    dtype=cfg.param_dtype)

  def encode_text(self, input_ids, attention_mask):
    x, pooled = self.text_model(input_ids, attention_mask)
    return {"last_hidden_state": x, "pooled": pooled, "text_embeds": self.text_projection(pooled)}

  def encode_image(self, vision_pooled):
    return self.visual_projection(vision_pooled)

  def __call__(self, input_ids, attention_mask, vision_pooled):
    return self.encode_text(input_ids, attention_mask), self.encode_image(vision_pooled)


def _dummy_inputs(cfg):
  return (jnp.zeros((1, 2), jnp.int32), jnp.ones((1, 2), jnp.int32),
          jnp.zeros((1, cfg.vision_hidden_size), jnp.float32))


def init(cfg: Config, key) -> dict:
  return layers.unbox(ClipText(layers.scanned(cfg)).init(key, *_dummy_inputs(cfg)))


def logical_axes(cfg: Config):
  return layers.logical_axes(ClipText(layers.scanned(cfg)).init, jax.random.key(0),
                             *_dummy_inputs(cfg))


def apply(cfg: Config, params, input_ids, attention_mask=None) -> dict:
  """input_ids [B, T] int32 (attention_mask [B, T], default all ones) ->
  {"last_hidden_state": [B, T, D], "pooled": [B, D] (EOS token), "text_embeds": [B, P]}."""
  if attention_mask is None:
    attention_mask = jnp.ones(input_ids.shape, jnp.int32)
  return ClipText(cfg).apply({"params": params}, input_ids, attention_mask,
                             method=ClipText.encode_text)


def image_embeds(cfg: Config, params, vision_pooled):
  """Vision tower `pooled` [B, Dv] -> image embeddings [B, P] (`visual_projection`)."""
  return ClipText(cfg).apply({"params": params}, vision_pooled, method=ClipText.encode_image)


def similarity(params, image_embeds, text_embeds):
  """CLIP logits_per_image [Bi, Bt]: exp(logit_scale) * cosine similarity."""
  normalize = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
  return jnp.exp(params["logit_scale"]) * normalize(image_embeds) @ normalize(text_embeds).T
