"""Fourier domain adaptation (FDA; Yang & Soatto, CVPR 2020): source images in target style.

Appearance shifts (night, fog, rain, a cheaper sensor) live mostly in the low frequencies of
an image's amplitude spectrum (global brightness, contrast, colour, haze), its content mostly
in the phase. So each labelled source row of a training batch is redrawn with the
low-frequency amplitude of an unlabelled target row of the same batch and its own phase:

  F = fft2(x_src) per channel,  A_src = |F|,  P_src = angle(F),  A_trg = |fft2(x_trg)|
  A = A_src with the centred (2b + 1) x (2b + 1) window of fftshift(A_trg),
      b = floor(beta * min(H, W))
  x = real(ifft2(A * exp(i P_src)))

(eq. 1 of the paper and the authors' `low_freq_mutate_np`), on pixel values in [0, 1], so the
zero frequency keeps its sign: the inputs arrive normalised by the tower's mean and
std, and are unnormalised, restyled, clipped to [0, 1] and normalised again. Source labels
stay valid (the phase keeps the scene), and the task losses then see source content in the
target's appearance. Target rows are unchanged. beta = 0 turns it off; b = 0 (beta < 1 /
min(H, W)) swaps the mean colour only. With `fraction` < 1 only that share of the source
rows is restyled, so the model also keeps seeing the source as it is.

The k-th source row of a batch takes its (k mod n)-th target row (n target rows, both in
batch order): batches are shuffled, so the pairs change from step to step, and the whole
transform is a deterministic function of the batch.
"""
import jax
import jax.numpy as jnp

from drivlm_jax.data import preprocess


def window(beta: float, height: int, width: int) -> int:
  """b, the half-width of the swapped low-frequency window (the authors' floor rule)."""
  return int(beta * min(height, width))


def swap_low_frequencies(source, target, beta: float):
  """Pixels [..., H, W, C] of the same shape -> `source` with `target`'s low-frequency
  amplitude (unclipped)."""
  h, w = source.shape[-3:-1]
  b = window(beta, h, w)
  fft = lambda x: jnp.fft.fftshift(jnp.fft.fft2(x, axes=(-3, -2)), axes=(-3, -2))
  spectrum, target_amplitude = fft(source), jnp.abs(fft(target))
  ch, cw = h // 2, w // 2
  inside = jnp.zeros((h, w), bool).at[ch - b:ch + b + 1, cw - b:cw + b + 1].set(True)
  amplitude = jnp.where(inside[:, :, None], target_amplitude, jnp.abs(spectrum))
  restyled = amplitude * jnp.exp(1j * jnp.angle(spectrum))
  return jnp.real(jnp.fft.ifft2(jnp.fft.ifftshift(restyled, axes=(-3, -2)), axes=(-3, -2)))


def restyle(images, domain, beta: float, stats: tuple, fraction: float = 1.0):
  """Normalised images [B, (V,) H, W, C] and domain [B] (1 = target) -> the batch with its
  first `fraction` of source rows (by source rank; batches are shuffled) in the style of a
  target row (target rows, the other source rows and a batch without target rows are
  returned as they are). `stats`: the (mean, std) they are normalised with."""
  mean, std = (jnp.asarray(v, jnp.float32) for v in stats)
  is_target = domain == 1
  n = jnp.sum(is_target)
  target_rows = jnp.argsort(~is_target, stable=True)     # the target rows first, in order
  source_rank = jnp.cumsum(~is_target) - 1
  partner = target_rows[source_rank % jnp.maximum(n, 1)]
  pixels = images * std + mean
  restyled = jnp.clip(swap_low_frequencies(pixels, pixels[partner], beta), 0.0, 1.0)
  chosen = source_rank < jnp.round(fraction * (images.shape[0] - n))
  keep = (is_target | ~chosen | (n == 0)).reshape(-1, *[1] * (images.ndim - 1))
  out = jnp.where(keep, images, ((restyled - mean) / std).astype(images.dtype))
  return jax.lax.stop_gradient(out)


def from_config(config, cfg):
  """`config.fda` (beta, fraction) -> the train step's `restyle(images, domain)`, or None
  when off (beta 0, or no `fda` in the config)."""
  fda = config.get("fda", {})
  beta, fraction = float(fda.get("beta", 0.0)), float(fda.get("fraction", 1.0))
  if not beta:
    return None
  if not 0.0 < fraction <= 1.0:
    raise ValueError(f"config.fda.fraction={fraction}: the share of source rows restyled, "
                     f"in (0, 1]")
  stats = preprocess.statistics(cfg.vision)
  return lambda images, domain: restyle(images, domain, beta, stats, fraction)
