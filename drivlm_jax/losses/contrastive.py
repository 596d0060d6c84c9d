"""Image-text contrastive losses for CLIP fine-tuning on driving captions and instructions.

clip:   symmetric InfoNCE over exp(t) * cosine logits (Radford et al., 2021).
siglip: pairwise sigmoid loss -1/|B| sum_ij log sigmoid(z_ij (exp(t) x_i . y_j + b)),
        z_ij = 1 on matching pairs, -1 otherwise (Zhai et al., 2023).
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


def siglip_loss(image_embeds, text_embeds, logit_scale, logit_bias):
  logits = jnp.exp(logit_scale) * _normalize(image_embeds) @ _normalize(text_embeds).T
  logits = logits + logit_bias
  z = 2 * jnp.eye(logits.shape[0]) - 1
  return -jnp.sum(jax.nn.log_sigmoid(z * logits)) / logits.shape[0]
