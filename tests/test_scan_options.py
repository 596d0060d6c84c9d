"""`remat` and `scan_unroll` change how layers run, never what they compute."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from configs import common
from drivlm_jax.model import vlm


def test_remat_and_unroll_keep_outputs_and_gradients():
  base = vlm.config_from_dict(common.model_config("tiny"))
  params = vlm.init(base, jax.random.key(0))
  images = np.random.default_rng(0).normal(size=(2, 64, 64, 3)).astype(np.float32)
  ids = np.concatenate([np.full((2, base.num_visual_tokens), base.image_token_id),
                        np.arange(10, 14)[None].repeat(2, 0)], axis=1).astype(np.int32)

  def loss_and_grads(cfg):
    def loss(p):
      out = vlm.apply(cfg, p, images, ids)
      return jnp.mean(out["lm_logits"] ** 2) + jnp.mean(out["action_logits"] ** 2)
    return jax.jit(jax.value_and_grad(loss))(params)

  expected_loss, expected_grads = loss_and_grads(base)
  for options in (dict(remat=True), dict(scan_unroll=2)):
    cfg = dataclasses.replace(base, vision=dataclasses.replace(base.vision, **options),
                              language=dataclasses.replace(base.language, **options))
    got_loss, got_grads = loss_and_grads(cfg)
    np.testing.assert_allclose(got_loss, expected_loss, rtol=1e-6)
    for g, e in zip(jax.tree.leaves(got_grads), jax.tree.leaves(expected_grads)):
      np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-6)
