"""Contrastive image-text fine-tuning of the vision tower (DriVLM part 1).

A CLIP text tower over the LM's tokenizer (pooled at the last real token) embeds the
caption of each image (the driving instruction, on both domains); the loss pulls matching
image and caption embeddings together: CLIP's symmetric InfoNCE, or SigLIP's pairwise
sigmoid loss (with its learned bias) for SigLIP towers.

Config: loss weight `clip` in `config.loss`; `config.clip = dict(loss="clip"|"siglip",
text=dict(text tower sizes))`.
"""
import dataclasses

import jax
import jax.numpy as jnp

from drivlm_jax import adapt
from drivlm_jax.losses import contrastive
from drivlm_jax.model import text


@adapt.register("clip")
@dataclasses.dataclass(frozen=True)
class ContrastiveFinetuning(adapt.Component):
  tcfg: text.Config
  kind: str              # "clip" | "siglip"

  param_key = "text"
  key_index = 3
  terms = ("clip",)

  @classmethod
  def from_config(cls, config, cfg, feats):
    del feats
    if not adapt.weights(config, cls.terms)["clip"] > 0:
      return None
    clip = config.get("clip", {})
    tcfg = text.Config(**{**dict(clip.get("text", {})), "vocab_size": cfg.language.vocab_size,
                          "vision_hidden_size": cfg.vision.hidden_size, "pool": "last"})
    kind = clip.get("loss", "clip")
    if kind not in ("clip", "siglip"):
      raise ValueError(f"config.clip.loss must be 'clip' or 'siglip', got {kind!r}")
    return cls(tcfg, kind)

  def init(self, key):
    params = text.init(self.tcfg, key)
    if self.kind == "siglip":   # SigLIP's learned bias, initialised as in the paper
      params["logit_bias"] = jnp.asarray(-10.0, jnp.float32)
    return params

  def logical_axes(self):
    axes = text.logical_axes(self.tcfg)
    if self.kind == "siglip":
      axes["logit_bias"] = jax.sharding.PartitionSpec()
    return axes

  def loss(self, ctx: adapt.Context) -> dict:
    p = ctx.params[self.param_key]
    images = text.image_embeds(self.tcfg, p, ctx.out["image_pooled"])
    texts = text.apply(self.tcfg, p, ctx.batch["caption_ids"],
                       ctx.batch["caption_mask"])["text_embeds"]
    if self.kind == "siglip":
      return {"clip": contrastive.siglip_loss(images, texts, p["logit_scale"], p["logit_bias"])}
    return {"clip": contrastive.clip_loss(images, texts, p["logit_scale"])}
