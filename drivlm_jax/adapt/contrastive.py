"""Contrastive image-text fine-tuning of the vision tower (DriVLM part 1).

A CLIP text tower embeds the caption of each image (the driving instruction, on both
domains); the loss pulls matching image and caption embeddings together: CLIP's symmetric
InfoNCE, or SigLIP's pairwise sigmoid loss (with its learned bias) for SigLIP towers, where
rows with equal captions match each other (`losses.contrastive`).

The captions must vary with the image and not with the domain. Logged per step:
`clip_captions`, the distinct captions in the batch (1, as on BDD-OIA, whose frames carry no
instruction: the loss can only equalise the images' similarity to that caption, or with
SigLIP pull every image towards it), and `clip_cross_domain`, the share of rows whose caption
also captions a row of the other domain (0: the captions name the domain, and the loss
teaches the tower to tell the domains apart, against the alignment). Training warns on
either. The
text tower is a real CLIP one when `config.clip.text_tower` names a CLIPModel directory
(its weights, projections and logit scale, and its own tokenizer for the captions), else a
fresh small one over the LM's tokenizer, pooled at the last real token.

Config: loss weight `clip` in `config.loss`; `config.clip = dict(loss="auto"|"clip"|"siglip",
text=dict(fresh text tower sizes), text_tower="" | CLIPModel directory)`. "auto" is SigLIP's
loss for a SigLIP tower (without a CLIPModel text tower), CLIP's else; a text size of 0
follows the vision tower's width (hidden and projection: the width; MLP 4x and heads /64 of
the text tower's hidden size), so both follow the tower a pretrained start takes from its
checkpoint.
"""
import dataclasses

import jax
import jax.numpy as jnp

from drivlm_jax import adapt, hf
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
    kind = clip.get("loss", "auto")
    if kind == "auto":
      kind = "siglip" if cfg.vision.family == "siglip" and not clip.get("text_tower") else "clip"
    if kind not in ("clip", "siglip"):
      raise ValueError(f"config.clip.loss must be 'auto', 'clip' or 'siglip', got {kind!r}")
    if clip.get("text_tower"):
      tcfg = hf.text_config(clip.text_tower)   # its weights: pretrained.start
      if tcfg.vision_hidden_size != cfg.vision.hidden_size:
        raise ValueError(f"config.clip.text_tower {clip.text_tower}: its visual_projection "
                         f"takes width {tcfg.vision_hidden_size}, the vision tower gives "
                         f"{cfg.vision.hidden_size}")
      if kind != "clip":
        raise ValueError(f"config.clip.text_tower {clip.text_tower} is a CLIPModel: set "
                         f"config.clip.loss='clip'")
      return cls(tcfg, kind)
    width = cfg.vision.hidden_size
    given = dict(clip.get("text", {}))
    hidden = given.get("hidden_size") or width
    follow = {"hidden_size": hidden, "intermediate_size": 4 * hidden,   # where given as 0
              "num_heads": max(1, hidden // 64), "projection_dim": width}
    tcfg = text.Config(**{**given, **{k: v for k, v in follow.items() if not given.get(k)},
                          "vocab_size": cfg.language.vocab_size, "vision_hidden_size": width,
                          "pool": "last"})
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
    same = contrastive.same_caption(ctx.batch["caption_ids"])
    n = same.shape[0]
    earlier = jnp.tril(jnp.ones((n, n), bool), -1)
    ctx.metrics["clip_captions"] = jnp.sum(~jnp.any(same & earlier, axis=1))
    domain = ctx.batch["domain"]
    other = domain[:, None] != domain[None, :]
    ctx.metrics["clip_cross_domain"] = jnp.where(
        jnp.any(other), jnp.mean(jnp.any(same & other, axis=1)), 1.0)
    if self.kind == "siglip":
      return {"clip": contrastive.siglip_loss(images, texts, p["logit_scale"], p["logit_bias"],
                                              same)}
    return {"clip": contrastive.clip_loss(images, texts, p["logit_scale"])}
