"""`remat`, `scan_unroll` and the train step's compile options change how layers run, never
what they compute."""
import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common
from drivlm_jax import train
from drivlm_jax.model import vision, vlm


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


def _while_stacks(hlo: str, num_layers: int) -> list:
  """Per while loop over layers in a compiled HLO text (one with [num_layers, ...]
  operands), the dtypes of those operands."""
  loops = (re.findall(rf"\b(f32|bf16)\[{num_layers},", shapes)
           for shapes in re.findall(r"= \((.*?)\) while\(", hlo))
  return [stacks for stacks in loops if stacks]


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="an XLA CPU pass")
def test_bf16_step_options_keep_saved_activations_bf16_into_the_backward():
  """`train.step_compiler_options` for bf16 on CPU: the bf16 activations the forward layer
  loop saves reach the backward loop as bf16, and the gradients are the same. It gives
  options exactly where XLA's invariant code motion would otherwise convert each whole stack
  to float32 before the backward loop (jaxlib 0.10; not 0.11.2 or 0.12.0.1)."""
  cfg = vision.Config(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                      num_heads=2, num_layers=5, dtype="bfloat16")
  params = vision.init(cfg, jax.random.key(0))
  x = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
  loss = lambda p: vision.apply(cfg, p, x)["pooled"].astype(jnp.float32).sum()
  options = train.step_compiler_options("float32", "bfloat16")
  assert train.step_compiler_options("float32") == {}
  compiled = {name: jax.jit(jax.grad(loss), compiler_options=o).lower(params).compile()
              for name, o in (("default", {}), ("options", options))}
  loops = {n: _while_stacks(c.as_text(), cfg.num_layers) for n, c in compiled.items()}
  assert [len(v) for v in loops.values()] == [2, 2], "expected a forward and a backward loop"
  (forward, backward), (_, default_backward) = loops["options"], loops["default"]
  assert forward.count("bf16") > 0 and backward.count("bf16") == forward.count("bf16")
  assert (default_backward.count("bf16") < forward.count("bf16")) == bool(options)
  got, expected = (compiled[n](params) for n in ("options", "default"))
  for g, e in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
    np.testing.assert_array_equal(g, e)
