"""Domain-adversarial pieces: gradient reversal, the DANN schedule, domain losses.

`grad_reverse(x, lam)` is the identity forward and multiplies the gradient by -lam backward
(Ganin & Lempitsky, 2015), so minimising a discriminator's loss through it trains the features
to confuse the discriminator. `lam` follows lam(p) = 2 / (1 + exp(-10 p)) - 1 over training
progress p in [0, 1].

`domain_confusion` is the features' side of the non-saturating alternative (Tzeng, Hoffman,
Darrell and Saenko, "Simultaneous Deep Transfer Across Domains and Tasks", ICCV 2015): the
features minimise the cross-entropy between the (frozen) discriminator's output and the uniform
domain distribution, while the discriminator minimises its own BCE on detached features.
Behind the reversal the features' gradient is lam (sigmoid(z) - y) dz/df, which vanishes once
the discriminator is confident and right; the confusion gradient, (sigmoid(z) - 1/2) dz/df, is
largest exactly then.
"""
import jax
import jax.numpy as jnp
import optax

from drivlm_jax.losses.masked import masked_mean


@jax.custom_vjp
def grad_reverse(x, lam):
  return x


def _reverse_fwd(x, lam):
  return x, lam


def _reverse_bwd(lam, g):
  return jax.tree.map(lambda t: (-lam * t).astype(t.dtype), g), jnp.zeros_like(lam)


grad_reverse.defvjp(_reverse_fwd, _reverse_bwd)


def dann_lambda(progress):
  """2 / (1 + exp(-10 p)) - 1: 0 at the start, -> 1 at the end."""
  return 2.0 / (1.0 + jnp.exp(-10.0 * jnp.asarray(progress, jnp.float32))) - 1.0


def domain_bce(logits, domain, mask=None):
  """Binary cross-entropy of domain logits (any shape [B, ...]) against the example's domain
  (0 source, 1 target) broadcast over the trailing dims; `mask` drops entries."""
  labels = jnp.broadcast_to(domain.reshape(domain.shape + (1,) * (logits.ndim - 1)),
                            logits.shape).astype(logits.dtype)
  return masked_mean(optax.sigmoid_binary_cross_entropy(logits, labels), mask)


def domain_focal(logits, domain, gamma=5.0, mask=None):
  """Focal domain loss -(1 - p_t)^gamma log p_t (Strong-Weak DA: weak global alignment
  focuses on the hard-to-classify examples)."""
  labels = jnp.broadcast_to(domain.reshape(domain.shape + (1,) * (logits.ndim - 1)),
                            logits.shape).astype(logits.dtype)
  log_p = jax.nn.log_sigmoid(logits)
  log_not_p = jax.nn.log_sigmoid(-logits)
  log_pt = labels * log_p + (1 - labels) * log_not_p
  return masked_mean(-((1 - jnp.exp(log_pt)) ** gamma) * log_pt, mask)


def domain_confusion(logits, mask=None):
  """Cross-entropy of domain logits (any shape) against the uniform distribution over the two
  domains, minus its minimum log 2: -(log s(z) + log(1 - s(z))) / 2 - log 2 >= 0, zero when
  the discriminator cannot tell (s(z) = 1/2); `mask` drops entries."""
  half = jnp.full(logits.shape, 0.5, logits.dtype)
  return masked_mean(optax.sigmoid_binary_cross_entropy(logits, half) - jnp.log(2.0), mask)
