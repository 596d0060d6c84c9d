"""The one masked mean every loss uses."""
import jax.numpy as jnp


def masked_mean(values, mask=None):
  """Mean of `values` over the entries where `mask` (0/1, broadcast to `values`) is 1; the
  plain mean when `mask` is None; 0 when the mask selects nothing."""
  if mask is None:
    return jnp.mean(values)
  mask = jnp.broadcast_to(mask, values.shape).astype(values.dtype)
  return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0)
