"""Building blocks shared by the vision tower, the CLIP text tower and the decoder LM.

Every parameter carries logical axis names (`embed`, `mlp`, `heads`, `kv_heads`, `kv`,
`vocab`, `layers`) and the main activations carry (`batch`, `length`, ...); `parallel.py`
maps these names onto a device mesh. Without rules in scope the annotations are no-ops.
"""
import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from drivlm_jax.model import cpu_gemm

# transformers' ACT2FN names (each the same function as there), as config.json spells them.
ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_python": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "relu": jax.nn.relu,
}


def activation(name: str):
  if name not in ACTIVATIONS:
    raise ValueError(f"Unsupported activation {name!r}; known: {sorted(ACTIVATIONS)}")
  return ACTIVATIONS[name]


def constrain(x, *axes):
  """Logical sharding constraint on an activation (no-op without rules)."""
  return nn.with_logical_constraint(x, axes)


def _init(init, axes):
  return nn.with_logical_partitioning(init, axes)


class Dense(nn.Module):
  """Linear map contracting the last `n_in` dims of x into `features` (a tuple).

  Kernel [*in_dims, *features] named `in_axes + out_axes`, bias [*features] named `out_axes`;
  LeCun-normal init over the full fan-in (a fixed 0.02 would shrink small widths' signals
  layer after layer until attention probes get no gradient).
  """
  features: tuple
  n_in: int
  in_axes: tuple
  out_axes: tuple
  use_bias: bool
  dtype: Any
  param_dtype: Any

  @nn.compact
  def __call__(self, x):
    n_in, n_out = self.n_in, len(self.features)
    init = nn.initializers.lecun_normal(in_axis=tuple(range(n_in)),
                                        out_axis=tuple(range(n_in, n_in + n_out)))
    kernel = self.param("kernel", _init(init, self.in_axes + self.out_axes),
                        x.shape[-n_in:] + self.features, self.param_dtype)
    y = contract_last(x.astype(self.dtype), kernel, n_in)
    if self.use_bias:
      bias = self.param("bias", _init(nn.initializers.zeros, self.out_axes), self.features,
                        self.param_dtype)
      y = add_bias(y, bias)
    return y


def contract_last(x, kernel, n_in):
  """x [..., *in] . kernel [*in, *out] -> [..., *out] in x's dtype, the last n_in dims of x
  contracted (`einsum`)."""
  letters = "abcdefghijklmnopqrstuvwxyz"
  lead, ins, outs = (letters[:x.ndim - n_in], letters[x.ndim - n_in:x.ndim],
                     letters[x.ndim:x.ndim + kernel.ndim - n_in])
  return einsum(f"{lead}{ins},{ins}{outs}->{lead}{outs}", x, kernel)


def einsum(spec, a, b, out_dtype=None):
  """`jnp.einsum` in `a`'s dtype, accumulated in float32, the result in `out_dtype` (default:
  `a`'s dtype). `b` is in `a`'s dtype or is a float32 parameter, cast to it here. `spec` must
  name every index in two of its three terms (a matmul, batched or not).

  Its gradient is two einsums of the same form (custom VJP), in `a`'s dtype, accumulated in
  float32:
  - for bf16 (or fp16) `a` this keeps every matmul of the backward low-precision, as torch's
    autocast does: JAX's own transpose of a float32-accumulating matmul takes the float32
    cotangent, and XLA's CPU backend runs such mixed matmuls in float32 (measured: the bf16
    ViT-B/16 step no faster than the float32 one). A float32 `b` (a parameter) is cast
    inside, so the backward reads the parameter instead of a saved low-precision copy (under
    `nn.scan`, a stacked copy of every layer's weights) and its gradient is float32 from the
    accumulator, never rounded to bf16;
  - in float32 too: autodiff's transposed dots let XLA's CPU backend write a weight
    gradient's cotangent transposed from inside its elementwise producer's fusion (strided,
    ~100 ms per SwiGLU projection at Qwen2-0.5B shapes) for an Eigen dot, where these einsums
    go to YNNPACK as they are (6 Qwen2-0.5B layers, batch 4 x 256: gradient 3.86 -> 2.76 s).

  Float32 matmuls, forward and backward, run on MKL on a single-device Intel CPU (`cpu_gemm`),
  as do bfloat16 ones where it multiplies bfloat16 in hardware (`cpu_gemm.has_bf16`); a numpy
  `b` (a constant weight: the deployed student's) on `cpu_gemm`'s packed-weight kernel where
  it applies.
  """
  out_dtype = jnp.dtype(out_dtype or a.dtype)
  if isinstance(b, np.ndarray):   # before the custom VJP, which would make it a tracer
    out = cpu_gemm.constant_einsum(spec, a, b)
    if out is not None:
      return out.astype(out_dtype)
  return _einsum(spec, out_dtype, a, b)


def _matmul(spec, a, b):
  """`spec` of `a` and `b` (one dtype) accumulated in float32: a GEMM on MKL where
  `cpu_gemm` takes it (an Intel CPU; bfloat16 where `cpu_gemm.has_bf16`), else XLA's dot."""
  out = cpu_gemm.einsum(spec, a, b)
  return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32) if out is None else out


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _einsum(spec, out_dtype, a, b):
  return _matmul(spec, a, b.astype(a.dtype)).astype(out_dtype)


def _einsum_fwd(spec, out_dtype, a, b):
  return _einsum(spec, out_dtype, a, b), (a, b)


def _einsum_bwd(spec, out_dtype, residuals, g):
  del out_dtype
  a, b = residuals
  (sa, sb), so = spec.split("->")[0].split(","), spec.split("->")[1]
  g = g.astype(a.dtype)
  da = _matmul(f"{so},{sb}->{sa}", g, b.astype(a.dtype))
  db = _matmul(f"{sa},{so}->{sb}", a, g)
  return da.astype(a.dtype), db.astype(b.dtype)


_einsum.defvjp(_einsum_fwd, _einsum_bwd)


def add_bias(y, bias):
  """y + bias in y's dtype, bias [*features] being y's trailing dims. For a bf16 (or fp16)
  y, the bias gradient is a float32-accumulating matmul of the cotangent with ones: XLA's
  CPU backend would otherwise convert the whole cotangent to float32 and sum it by a
  reduce-window tree (the bf16 CLIP ViT-B/16 gradient at batch 8: 2.94 -> 2.78 s)."""
  if bias.shape != y.shape[y.ndim - bias.ndim:]:
    raise ValueError(f"bias {bias.shape} is not the trailing dims of {y.shape}")
  if y.dtype == jnp.float32:
    return y + bias.astype(y.dtype)
  return _low_precision_add_bias(y, bias)


@jax.custom_vjp
def _low_precision_add_bias(y, bias):
  return y + bias.astype(y.dtype)


def _add_bias_fwd(y, bias):
  # The residual is only the bias' shape and dtype (an empty array carries both).
  return _low_precision_add_bias(y, bias), jnp.zeros((0, *bias.shape), bias.dtype)


def _add_bias_bwd(empty, g):
  # Only the leading dims are merged: the feature dims keep their (sharded) layout.
  rows = g.reshape(-1, *empty.shape[1:])
  db = jnp.tensordot(jnp.ones(rows.shape[:1], g.dtype), rows, axes=1,
                     preferred_element_type=jnp.float32)
  return g, db.astype(empty.dtype)


_low_precision_add_bias.defvjp(_add_bias_fwd, _add_bias_bwd)


def dense(features, in_axes, out_axes, *, cfg, name, use_bias=True, axis=-1):
  """`Dense` from an int or tuple of `features`; `axis` -1 contracts the last dim, (-2, -1)
  the last two (e.g. heads and head_dim of an output projection)."""
  features = (features,) if isinstance(features, int) else tuple(features)
  n_in = 1 if axis == -1 else len(axis)
  return Dense(features, n_in, tuple(in_axes), tuple(out_axes), use_bias, cfg.dtype,
               cfg.param_dtype, name=name)


def layer_norm(cfg, name, eps):
  """A LayerNorm (HF's names and init: `Norm`)."""
  return Norm(eps, True, cfg.dtype, cfg.param_dtype, name=name)


def rms_norm(cfg, name, eps):
  """An RMSNorm (HF's names and init: `Norm`)."""
  return Norm(eps, False, cfg.dtype, cfg.param_dtype, name=name)


class Norm(nn.Module):
  """LayerNorm (`centered`: scale and bias) or RMSNorm (scale), over the last axis, computed
  in float32 and returned in `dtype`; flax's parameter names ("scale", "bias") and values
  (two-pass variance: `nn.LayerNorm(use_fast_variance=False)`, `nn.RMSNorm`), with the
  gradient in closed form (`_normalize`)."""
  epsilon: float
  centered: bool
  dtype: Any
  param_dtype: Any

  @nn.compact
  def __call__(self, x):
    shape = (x.shape[-1],)
    scale = self.param("scale", _init(nn.initializers.ones, ("embed",)), shape,
                       self.param_dtype)
    bias = (self.param("bias", _init(nn.initializers.zeros, ("embed",)), shape,
                       self.param_dtype) if self.centered else None)
    return _normalize(x, scale, bias, self.epsilon).astype(self.dtype or x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _normalize(x, scale, bias, eps):
  """(x - mean) / sqrt(var + eps) * scale + bias (without bias: x / sqrt(mean(x^2) + eps) *
  scale) in float32. Its gradient is the normalisation's closed form, from the saved input and
  row statistics, as torch's native layer norm takes it: autodiff's own kept more [rows, D]
  arrays and passes (alternated in one process on a 2-core Xeon: the demo VLM train step 6%,
  CLIP ViT-B/16's 2.1% (bfloat16 7.7%) and a 6-layer Qwen2's 2.2% faster).

  The input's cotangent is one array, so in an unrolled backward (`LayerLoop`) each layer's
  residual gradient ends in an add of two full arrays. Autodiff of flax's norms summed the
  norm's several uses of its input into an add of a broadcast row statistic, which XLA's CPU
  fusion counts as unary and duplicated into every consumer, layer after layer: CLIP
  ViT-B/16's backward had fusions of 8, 15, ..., 177 operands (quadratic in depth, 0.26 s of
  a 3.3 s step; `tests/test_layer_loop.py` checks the largest is the same at 2 and 8
  layers)."""
  return _normalize_fwd(x, scale, bias, eps)[0]


def _normalize_fwd(x, scale, bias, eps):
  x32 = x.astype(jnp.float32)
  mean = jnp.mean(x32, axis=-1, keepdims=True) if bias is not None else None
  centered = x32 - mean if bias is not None else x32
  rstd = jax.lax.rsqrt(jnp.mean(centered * centered, axis=-1, keepdims=True) + eps)
  y = centered * (rstd * scale.astype(jnp.float32))   # flax's order of operations
  if bias is not None:
    y = y + bias.astype(jnp.float32)
  return y, (x, mean, rstd, scale, bias)


def _normalize_bwd(eps, residuals, g):
  del eps
  x, mean, rstd, scale, bias = residuals
  x32 = x.astype(jnp.float32)
  xhat = (x32 - mean if mean is not None else x32) * rstd
  g = g.astype(jnp.float32)
  dxhat = g * scale.astype(jnp.float32)
  inner = dxhat - xhat * jnp.mean(dxhat * xhat, axis=-1, keepdims=True)
  if bias is not None:
    inner = inner - jnp.mean(dxhat, axis=-1, keepdims=True)
  rows = tuple(range(g.ndim - 1))
  dscale = jnp.sum(g * xhat, axis=rows).astype(scale.dtype)
  dbias = None if bias is None else jnp.sum(g, axis=rows).astype(bias.dtype)
  return (rstd * inner).astype(x.dtype), dscale, dbias


_normalize.defvjp(_normalize_fwd, _normalize_bwd)


def unrolled(cfg) -> bool:
  """Whether `stack_layers` runs `cfg`'s layers as an unrolled `LayerLoop` (not a scan); a
  config without `scan` (a discriminator's: no layers to stack) counts as scanned."""
  return not getattr(cfg, "scan", True) and not getattr(cfg, "remat", False)


def embed(num, features, *, cfg, name, axes=("vocab", "embed"), init_std=0.02):
  return nn.Embed(num, features, name=name, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                  embedding_init=_init(nn.initializers.normal(init_std), axes))


def param(module, name, shape, axes, init=nn.initializers.normal(0.02), dtype=jnp.float32):
  return module.param(name, _init(init, axes), shape, dtype)


def attention(q, k, v, mask=None, scale=None):
  """Scaled dot-product attention with grouped-query heads.

  q: [B, T, N, Dh]; k, v: [B, S, K, Dh] with N % K == 0; mask: [B, T, S] bool
  (True = attend) or None. Softmax in float32; fully masked rows give finite output.
  Returns [B, T, N, Dh].
  """
  b, t, n, dh = q.shape
  kh, g = k.shape[2], n // k.shape[2]
  scale = dh ** -0.5 if scale is None else scale
  # Heads-first, with a kv head's g query heads stacked along the rows: two batched matmuls
  # of [g*T, Dh] x [Dh, S] per (batch, kv head), no transposes between them (at ViT-B/16's
  # shapes on a 2-core CPU, 2.5x faster forward and 1.7x forward + backward than einsums
  # over the [B, T, N, Dh] layout).
  q = (q * scale).reshape(b, t, kh, g, dh).transpose(0, 2, 3, 1, 4).reshape(b, kh, g * t, dh)
  k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
  if mask is not None:
    mask = jnp.broadcast_to(mask[:, None, None], (b, 1, g, t, mask.shape[-1]))
    mask = mask.reshape(b, 1, g * t, -1)
  out = _attend(q, k, v, mask)
  return out.reshape(b, kh, g, t, dh).transpose(0, 3, 1, 2, 4).reshape(b, t, n, dh)


@jax.custom_vjp
def _attend(q, k, v, mask):
  """softmax(q k^T) v over heads-first [B, K, R, Dh] queries and [B, K, S, Dh] keys and
  values; mask [B, 1, R, S] or None. Its gradient is the softmax's in the form flash
  attention uses: for the probabilities P, the output O and its cotangent dO, the scores'
  cotangent is P * (dO V^T - rowsum(dO * O)), where autodiff takes rowsum(P * dO V^T), a
  reduction over [R, S] instead of [R, Dh] and one more pass over the [R, S] arrays (the
  attention's forward and backward at ViT-B/16's shapes, batch 8, 2-core Xeon: 21.7 -> 19.3
  ms; Qwen2-0.5B's, causal, 256 tokens: 39.8 -> 37.0 ms)."""
  return _attend_fwd(q, k, v, mask)[0]


def _attend_fwd(q, k, v, mask):
  scores = einsum("bkqd,bksd->bkqs", q, k, out_dtype=jnp.float32)
  if mask is not None:
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  out = einsum("bkqs,bksd->bkqd", probs, v)
  return out, (q, k, v, mask, probs, out)


def _attend_bwd(residuals, g):
  q, k, v, mask, probs, out = residuals
  g = g.astype(v.dtype)
  dv = _matmul("bkqs,bkqd->bksd", probs, g)
  row = jnp.sum(g.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)
  ds = probs.astype(jnp.float32) * (_matmul("bkqd,bksd->bkqs", g, v) - row)
  if mask is not None:   # a fully masked row's uniform probabilities take no gradient
    ds = jnp.where(mask, ds, 0.0)
  ds = ds.astype(q.dtype)
  dq, dk = _matmul("bkqs,bksd->bkqd", ds, k), _matmul("bkqs,bkqd->bksd", ds, q)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


_attend.defvjp(_attend_fwd, _attend_bwd)


def stack_layers(layer_cls: Any, cfg, num_layers: int, name: str, in_axes=nn.broadcast):
  """`num_layers` copies of `layer_cls`, params stacked on a `layers` axis: one `nn.scan`, or
  with `cfg.scan=False` a `LayerLoop` over the same stacked params.

  `cfg.remat` rematerialises each layer in the backward pass, and takes the scan whatever
  `cfg.scan` says: in an unrolled loop XLA moves the recomputation back into the forward
  (a 6-layer ViT's gradient kept 98 MB of temporaries with remat or without, looped; 23 MB
  scanned). `cfg.scan_unroll` unrolls the scan (1 = rolled loop, num_layers = fully unrolled).
  """
  if unrolled(cfg):
    return LayerLoop(layer_cls, cfg, num_layers, in_axes, name=name)
  if cfg.remat:
    layer_cls = nn.remat(layer_cls, prevent_cse=False)
  return nn.scan(
      layer_cls, variable_axes={"params": 0}, split_rngs={"params": True},
      in_axes=in_axes, length=num_layers, unroll=max(1, min(cfg.scan_unroll, num_layers)),
      metadata_params={nn.PARTITION_NAME: "layers"})(cfg, name=name)


def scanned(cfg):
  """`cfg` with `scan=True`, to initialise: a `LayerLoop` takes the params a scan creates."""
  return dataclasses.replace(cfg, scan=True)


def unstack(tree, n: int) -> list:
  """[tree of layer i for i < n] from `tree` stacked on its leading axis (of length n). Its
  gradient stacks the layers' gradients into one array per leaf, where autodiff of `a[i]`
  would pad each layer's gradient to the full stack and add the n of them (a custom VJP: no
  forward-mode autodiff through it). Numpy leaves (the export's constants) are sliced here,
  so each layer's weights stay constants of their own (ONNX initializers that onnxruntime
  prepacks; slices of one stacked tensor at run time ran the pruned CLIP-B/16 student 2x
  slower there)."""
  leaves, treedef = jax.tree.flatten(tree)
  split = [[a[i] for i in range(n)] if isinstance(a, np.ndarray) else _unstack(a, n)
           for a in leaves]
  return [jax.tree.unflatten(treedef, [layers[i] for layers in split]) for i in range(n)]


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _unstack(a, n):
  return [a[i] for i in range(n)]


def _unstack_fwd(a, n):
  return _unstack(a, n), None


def _unstack_bwd(n, _, cotangents):
  return (jnp.stack(cotangents),)


_unstack.defvjp(_unstack_fwd, _unstack_bwd)


class LayerLoop(nn.Module):
  """`stack_layers`' stacked params applied by a Python loop, one layer at a time (apply
  only: initialise with `scan=True`, `scanned`).

  Flax's scan builds its carry with concrete shapes, so a trace whose batch is symbolic (the
  ONNX export with a dynamic batch) fails inside it; this loop traces with any shape and
  gives an unrolled graph, which is also what TensorRT optimises best. In training it saves
  each layer's activations for the backward as they are, where a scan writes them into
  stacked arrays and reads them back: the CLIP ViT-B/16 train step on a 2-core Xeon, float32
  batch 8, ran 3.47 s looped vs 3.59 s scanned, and bfloat16 0.90 vs 0.72 of torch's
  (`experiments.bench_train`, 2026-12-04), so the ViT-B/16 presets use it. Not with
  `cfg.remat` (`stack_layers`).
  """
  layer_cls: Any
  cfg: Any
  num_layers: int
  in_axes: Any

  @nn.compact
  def __call__(self, carry, *args):
    if self.is_initializing():
      raise ValueError("cfg.scan=False applies existing params; initialise with scan=True")
    in_axes = self.in_axes if isinstance(self.in_axes, tuple) else (self.in_axes,) * len(args)
    layer = self.layer_cls(self.cfg, parent=None)
    outs = []
    for i, params in enumerate(unstack(self.variables["params"], self.num_layers)):
      step_args = [jax.tree.map(lambda a: a[i], a) if axis == 0 else a
                   for a, axis in zip(args, in_axes)]
      carry, out = layer.apply({"params": params}, carry, *step_args)
      outs.append(out)
    if not outs or outs[0] is None:
      return carry, None
    return carry, jax.tree.map(lambda *xs: jnp.stack(xs), *outs)


class SelfAttention(nn.Module):
  """Multi-head self-attention with biases, as in CLIP/SigLIP (HF names q/k/v/out_proj)."""
  cfg: Any

  @nn.compact
  def __call__(self, x, mask=None):
    cfg = self.cfg
    heads, head_dim = cfg.num_heads, cfg.hidden_size // cfg.num_heads
    proj = lambda name: dense((heads, head_dim), ("embed",), ("heads", "kv"), cfg=cfg, name=name)
    q, k, v = proj("q_proj")(x), proj("k_proj")(x), proj("v_proj")(x)
    out = attention(q, k, v, mask)
    out = constrain(out, "batch", "length", "heads", "kv")
    return dense(cfg.hidden_size, ("heads", "kv"), ("embed",), cfg=cfg, name="out_proj",
                 axis=(-2, -1))(out)


class Mlp(nn.Module):
  """fc1 -> activation -> fc2 (CLIP/SigLIP MLP)."""
  cfg: Any

  @nn.compact
  def __call__(self, x):
    cfg = self.cfg
    h = dense(cfg.intermediate_size, ("embed",), ("mlp",), cfg=cfg, name="fc1")(x)
    # Recomputed in the backward from its input: autodiff of a gelu would otherwise save two
    # more [B, T, mlp] arrays per layer (CLIP ViT-B/16 at batch 8: 0.47 GB; in bf16 the
    # gradient 0.17 s faster, in float32 no slower).
    act = jax.checkpoint(activation(cfg.hidden_act), prevent_cse=False)
    h = constrain(act(h), "batch", "length", "mlp")
    return dense(cfg.hidden_size, ("mlp",), ("embed",), cfg=cfg, name="fc2")(h)


class EncoderLayer(nn.Module):
  """Pre-LayerNorm transformer block of CLIP/SigLIP; scan-compatible (carry, None)."""
  cfg: Any

  @nn.compact
  def __call__(self, x, mask):
    cfg = self.cfg
    h = layer_norm(cfg, "layer_norm1", cfg.layer_norm_eps)(x)
    x = x + SelfAttention(cfg, name="self_attn")(h, mask)
    h = layer_norm(cfg, "layer_norm2", cfg.layer_norm_eps)(x)
    x = x + Mlp(cfg, name="mlp")(h)
    return constrain(x, "batch", "length", "embed"), None


class Encoder(nn.Module):
  """`cfg.num_layers` scanned EncoderLayers. x: [B, T, D]; mask: [B, T, T] bool or None."""
  cfg: Any

  @nn.compact
  def __call__(self, x, mask=None):
    x, _ = stack_layers(EncoderLayer, self.cfg, self.cfg.num_layers, "layers")(x, mask)
    return x


def unbox(variables):
  """Plain arrays from a linen `init` result (drops the logical-partitioning boxes)."""
  return nn.meta.unbox(variables["params"])


def logical_axes(init_fn, *args):
  """Tree of logical `PartitionSpec`s matching the params that `init_fn(*args)` returns."""
  boxed = jax.eval_shape(init_fn, *args)
  return nn.get_partition_spec(boxed)["params"]
