"""`cfg.scan=False` (`layers.LayerLoop`) against the scanned tower it replaces: the same
params from init, the same outputs and gradients, remat taking the scan (the memory it
saves), the gradient of `layers.unstack` against autodiff of plain indexing, constant
(numpy) params staying one constant per layer, and the unrolled backward's fusions not
growing with depth (the norms' closed-form gradient, `layers.Norm`)."""
import dataclasses
import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from drivlm_jax.model import layers, vision

CFG = vision.Config(family="clip", image_size=32, patch_size=8, hidden_size=32,
                    intermediate_size=64, num_layers=3, num_heads=4, hidden_act="quick_gelu")


def test_loop_initialises_the_scanned_params():
  scanned = vision.init(CFG, jax.random.key(0))
  looped = vision.init(dataclasses.replace(CFG, scan=False), jax.random.key(0))
  jax.tree.map(np.testing.assert_array_equal, scanned, looped)
  assert vision.logical_axes(dataclasses.replace(CFG, scan=False)) == vision.logical_axes(CFG)


def _loss(cfg, p, images):
  out = vision.apply(cfg, p, images)
  return jnp.sum(out["pooled"] ** 2) + jnp.sum(out["last_hidden_state"][:, 1:] ** 3)


def test_loop_matches_scan_outputs_and_gradients():
  params = vision.init(CFG, jax.random.key(0))
  images = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  loop_cfg = dataclasses.replace(CFG, scan=False)
  want_loss, want = jax.jit(jax.value_and_grad(lambda p: _loss(CFG, p, images)))(params)
  got_loss, got = jax.jit(jax.value_and_grad(lambda p: _loss(loop_cfg, p, images)))(params)
  np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
  # Rounding-level atol: some gradients are zero in exact arithmetic (the key bias's).
  scale = max(float(np.abs(w).max()) for w in jax.tree.leaves(want))
  jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6 * scale),
               got, want)


def test_remat_takes_the_scan_and_saves_its_memory():
  cfg = dataclasses.replace(CFG, num_layers=4)
  params = vision.init(cfg, jax.random.key(0))
  images = jnp.zeros((8, 32, 32, 3))

  def temp_bytes(c):
    grad = jax.jit(jax.grad(lambda p: _loss(c, p, images)))
    return grad.lower(params).compile().memory_analysis().temp_size_in_bytes

  looped, remat = dataclasses.replace(cfg, scan=False), dataclasses.replace(cfg, remat=True)
  assert temp_bytes(dataclasses.replace(remat, scan=False)) == temp_bytes(remat)
  assert temp_bytes(remat) < 0.7 * temp_bytes(looped)


def test_unstack_gradient_is_indexing_gradient():
  tree = {"a": jnp.arange(24.0).reshape(4, 3, 2), "b": jnp.arange(8.0).reshape(4, 2)}
  weights = jnp.arange(1.0, 5.0)

  def via(split):
    def f(t):
      return sum(w * jnp.sum(jnp.sin(x["a"])) + jnp.sum(x["b"] ** 2) * w
                 for w, x in zip(weights, split(t)))
    return jax.grad(f)(tree)

  want = via(lambda t: [jax.tree.map(lambda a: a[i], t) for i in range(4)])
  got = via(lambda t: layers.unstack(t, 4))
  jax.tree.map(np.testing.assert_allclose, got, want)


def test_constant_params_stay_one_constant_per_layer():
  """The export traces numpy params: each layer's weights must be constants of their own
  (ONNX initializers onnxruntime prepacks), not run-time slices of the stacked array."""
  params = jax.tree.map(np.asarray, vision.init(CFG, jax.random.key(0)))
  images = np.zeros((1, 32, 32, 3), np.float32)
  cfg = dataclasses.replace(CFG, scan=False)
  jaxpr = jax.make_jaxpr(lambda x: vision.apply(cfg, params, x)["pooled"])(images)
  stacked = params["encoder"]["layers"]["mlp"]["fc1"]["kernel"]
  shapes = [np.shape(c) for c in jaxpr.consts]
  assert stacked.shape[1:] in shapes and stacked.shape not in shapes


def test_mixed_constant_and_traced_leaves():
  """Numpy leaves are sliced while tracing even beside traced ones; the traced ones still get
  the stacked gradient."""
  tree = {"w": np.arange(6.0).reshape(3, 2), "b": jnp.arange(3.0)}

  def f(b):
    layers_ = layers.unstack({"w": tree["w"], "b": b}, 3)
    assert all(isinstance(x["w"], np.ndarray) for x in layers_)
    return sum(jnp.sum(x["w"]) * x["b"] ** 2 for x in layers_)

  np.testing.assert_allclose(jax.grad(f)(tree["b"]), 2 * tree["b"] * tree["w"].sum(1))


def _largest_fusion(hlo: str) -> int:
  """The most operands of a loop fusion in compiled HLO text, concatenations left out (a
  stack of the layers' gradients has one operand per layer by nature)."""
  computations = re.finditer(r"^(%\S+) .*?\{\n(.*?)^\}", hlo, re.M | re.S)
  bodies = {m.group(1): m.group(2) for m in computations}
  return max(m.group(1).count("%") for m in
             re.finditer(r"= (?:\(.*?\)|\S+) fusion\((.*?)\), kind=kLoop, calls=(%[\w.-]+)", hlo)
             if "concatenate(" not in bodies[m.group(2)])


def test_unrolled_backward_fusions_do_not_grow_with_depth():
  """XLA's CPU fusion duplicates ops it counts as unary into all their consumers; a norm's
  input gradient ending in an add of a broadcast statistic was one, so each layer's fusions
  recomputed every later layer's (8, 15, ..., 177 operands in CLIP ViT-B/16's backward).
  With the norms' closed-form gradient (`layers.Norm`: one cotangent for the input) the
  largest fusion is the same at 2 and 8 layers."""
  images = jnp.ones((2, 32, 32, 3))

  def largest(num_layers):
    cfg = dataclasses.replace(CFG, num_layers=num_layers, scan=False)
    params = vision.init(cfg, jax.random.key(0))
    grad = jax.jit(jax.grad(lambda p: _loss(cfg, p, images)))
    return _largest_fusion(grad.lower(params).compile().as_text())

  assert largest(8) == largest(2)


class _Norm(nn.Module):
  """Ours (`layers.layer_norm` / `rms_norm`) or flax's own module, as a submodule "norm"."""
  kind: str
  ours: bool

  @nn.compact
  def __call__(self, x):
    cfg = dataclasses.replace(CFG, hidden_size=x.shape[-1], scan=False)   # unrolled
    if self.ours:
      return (layers.layer_norm if self.kind == "layer" else layers.rms_norm)(cfg, "norm", 1e-5)(x)
    if self.kind == "layer":
      return nn.LayerNorm(1e-5, use_fast_variance=False, name="norm")(x)
    return nn.RMSNorm(1e-5, name="norm")(x)


def test_norms_keep_flax_gradients():
  """Our norms' closed-form gradients (`layers.Norm`) are autodiff's of flax's own modules,
  for the input, scale and bias, beside a residual use of the input."""
  x = jax.random.normal(jax.random.key(0), (3, 5, 16))
  for kind in ("layer", "rms"):
    params = layers.unbox(_Norm(kind, True).init(jax.random.key(1), x))
    params = jax.tree.map(lambda p: p + jax.random.normal(jax.random.key(2), p.shape), params)

    def loss(ours, v, x):
      return jnp.sum(jnp.tanh(_Norm(kind, ours).apply({"params": v}, x) + x) ** 2)

    assert "custom_vjp" in str(jax.make_jaxpr(functools.partial(loss, True))(params, x))
    got = jax.grad(functools.partial(loss, True), argnums=(0, 1))(params, x)
    want = jax.grad(functools.partial(loss, False), argnums=(0, 1))(params, x)
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6), got, want)
