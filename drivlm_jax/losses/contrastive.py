"""Image-text contrastive losses for CLIP fine-tuning on driving captions and instructions.

clip:   symmetric InfoNCE over exp(t) * cosine logits (Radford et al., 2021).
siglip: pairwise sigmoid loss -1/|B| sum_ij log sigmoid(z_ij (exp(t) x_i . y_j + b)),
        z_ij = 1 on matching pairs, -1 otherwise (Zhai et al., 2023).

`positives` [B, B] (default: the diagonal) marks every matching pair for SigLIP: rows whose
captions are equal match each other (z_ij = 1). Counting an equal caption as a negative
(driving instructions come in a handful of templates) would pull an image towards its
caption's embedding and push it away from the same embedding at once. InfoNCE needs no such
mask: equal captions have equal text embeddings, so -log softmax of a row's own caption equals
that of each of its positives, and the multi-positive form (UniCL, Yang et al., 2022) is the
same loss with the same gradient.
"""
import jax
import jax.numpy as jnp
import optax


def _normalize(x):
  return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def clip_loss(image_embeds, text_embeds, logit_scale):
  """image_embeds, text_embeds [B, P] (row i matches row i); logit_scale: log temperature."""
  logits = jnp.exp(logit_scale) * _normalize(image_embeds) @ _normalize(text_embeds).T
  labels = jnp.arange(logits.shape[0])
  ce = optax.softmax_cross_entropy_with_integer_labels
  return (ce(logits, labels).mean() + ce(logits.T, labels).mean()) / 2


def siglip_loss(image_embeds, text_embeds, logit_scale, logit_bias, positives=None):
  logits = jnp.exp(logit_scale) * _normalize(image_embeds) @ _normalize(text_embeds).T
  logits = logits + logit_bias
  positives = jnp.eye(logits.shape[0], dtype=bool) if positives is None else positives
  z = 2 * positives.astype(logits.dtype) - 1
  return -jnp.sum(jax.nn.log_sigmoid(z * logits)) / logits.shape[0]


def same_caption(caption_ids):
  """[B, B]: whether rows i and j have the same caption (token ids, padding included)."""
  return jnp.all(caption_ids[:, None, :] == caption_ids[None, :, :], axis=-1)
