"""`cpu_gemm`: float32 (and bfloat16) einsums on MKL through the FFI kernel, against numpy
(float64), XLA's own gradients and transformers; when it is chosen; and the ONNX export around
it."""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from drivlm_jax import hf
from drivlm_jax.model import cpu_gemm, language, layers, vision
from export import graphs, kernels
from tests import reference as ref

try:
  with cpu_gemm.use("mkl"):
    cpu_gemm.active()
  MISSING = None
except cpu_gemm.Unavailable as e:   # no MKL wheel (not x86-64 Linux) or no compiler
  MISSING = str(e)
needs_kernel = pytest.mark.skipif(MISSING is not None, reason=f"MKL kernel: {MISSING}")
needs_avx512 = pytest.mark.skipif(not cpu_gemm.has_avx512(),
                                  reason="the packed-weight kernel needs AVX-512F")
needs_bf16 = pytest.mark.skipif(not cpu_gemm.has_bf16(),
                                reason="MKL's bfloat16 GEMM: an Intel CPU with AMX or AVX-512 BF16")

# spec, a's shape, b's shape: plain, transposed and swapped GEMMs, leading batch indices
# (attention's three forms), several free or contracted indices, and splits across threads.
ROUTED = [
    ("btd,df->btf", (2, 3, 4), (4, 5)),
    ("btf,df->btd", (2, 3, 5), (4, 5)),            # b transposed (a weight's input gradient)
    ("btd,btf->df", (2, 3, 4), (2, 3, 5)),         # a transposed (a weight gradient)
    ("bd,dhk->bhk", (3, 4), (4, 2, 5)),
    ("bhk,dhk->bd", (3, 2, 5), (4, 2, 5)),         # two contracted indices
    ("ij,jk->ki", (3, 4), (4, 5)),                 # output transposed: B^T A^T
    ("bkqd,bksd->bkqs", (2, 3, 7, 4), (2, 3, 5, 4)),
    ("bkqs,bksd->bkqd", (2, 3, 7, 5), (2, 3, 5, 4)),
    ("bkqd,bkqs->bksd", (2, 3, 7, 4), (2, 3, 7, 5)),
    # over 2^21 multiply-adds per item: split across threads, at odd offsets
    ("mk,kn->mn", (513, 128), (128, 97)),          # rows
    ("km,kn->mn", (128, 513), (128, 97)),          # rows of a transposed a
    ("mk,nk->mn", (97, 128), (513, 128)),          # columns of a transposed b
    ("mk,kn->mn", (97, 128), (128, 513)),          # columns
    ("bkm,bkn->bnm", (2, 128, 97), (2, 128, 513)),  # batch, swapped, columns
]
KEPT = ["ij,jk", "ij,ij->i", "bij,jk->ik", "ibj,jk->bik", "ijk,jk->ik",
        "bij,bjk->ikb", "i,i->"]


def _operands(sa, sb, seed=0):
  rng = np.random.default_rng(seed)
  return (jnp.asarray(rng.standard_normal(sa, dtype=np.float32)),
          jnp.asarray(rng.standard_normal(sb, dtype=np.float32)))


@needs_kernel
@pytest.mark.parametrize("spec,sa,sb", ROUTED, ids=[s for s, _, _ in ROUTED])
def test_einsum_and_its_gradients_on_mkl_match_numpy_and_xla(spec, sa, sb):
  a, b = _operands(sa, sb)
  f = lambda a, b: layers.einsum(spec, a, b)   # noqa: E731
  loss = lambda a, b: jnp.sum(jnp.sin(f(a, b)))   # noqa: E731
  with cpu_gemm.use("mkl"):
    assert "ffi_call" in str(jax.make_jaxpr(jax.grad(loss, (0, 1)))(a, b))
    out = jax.jit(f)(a, b)
    grads = jax.jit(jax.grad(loss, (0, 1)))(a, b)
  with cpu_gemm.use("xla"):
    assert "ffi_call" not in str(jax.make_jaxpr(jax.grad(loss, (0, 1)))(a, b))
    xla_grads = jax.grad(loss, (0, 1))(a, b)
  expected = np.einsum(spec, np.float64(a), np.float64(b))
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
  for ours, theirs in zip(grads, xla_grads):
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5 * np.abs(theirs).max())


@needs_kernel
@needs_bf16
@pytest.mark.parametrize("spec,sa,sb", ROUTED, ids=[s for s, _, _ in ROUTED])
def test_bf16_einsum_and_its_gradients_on_mkl(spec, sa, sb):
  """bfloat16 operands, float32 accumulation: the product against numpy in float64 on the same
  (rounded) operands; its VJP (`layers.einsum`'s, bfloat16 GEMMs rounded once at the end)
  against XLA's float32 VJP of the same operands and cotangent."""
  a, b = (x.astype(jnp.bfloat16) for x in _operands(sa, sb))
  out_shape = np.einsum(spec, np.zeros(sa), np.zeros(sb)).shape
  ct = jnp.asarray(np.random.default_rng(1).standard_normal(out_shape), jnp.bfloat16)
  vjp = lambda f: jax.jit(lambda a, b, ct: jax.vjp(f, a, b)[1](ct))  # noqa: E731
  with cpu_gemm.use("mkl"):
    hlo = vjp(functools.partial(layers.einsum, spec)).lower(a, b, ct).as_text()
    assert hlo.count(cpu_gemm.BF16_TARGET) == 2   # both gradients on the bf16 kernel
    out = jax.jit(lambda a, b: cpu_gemm.einsum(spec, a, b))(a, b)
    grads = vjp(functools.partial(layers.einsum, spec))(a, b, ct)
  f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
  with cpu_gemm.use("xla"):
    want = vjp(lambda a, b: jnp.einsum(spec, a, b, precision="highest"))(f32(a), f32(b), f32(ct))
  assert out.dtype == jnp.float32
  expected = np.einsum(spec, np.float64(f32(a)), np.float64(f32(b)))
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
  for ours, theirs in zip(grads, want):
    assert ours.dtype == jnp.bfloat16
    np.testing.assert_allclose(f32(ours), theirs, rtol=2 ** -7, atol=1e-5 * np.abs(theirs).max())


# spec, a's shape, b's shape (a numpy constant): rows within one register tile, across tiles
# and across row chunks (256); columns not a multiple of the 32-column panel (16, 17, 77);
# depths across the 192-deep blocks; a layer's multi-index kernels; splits across threads.
PACKED = [
    ("td,df->tf", (1, 5), (5, 3)),
    ("td,df->tf", (13, 193), (193, 17)),
    ("td,df->tf", (15, 192), (192, 16)),
    ("btd,df->btf", (2, 300, 40), (40, 77)),
    ("btd,dhk->bthk", (1, 50, 96), (96, 3, 32)),     # q/k/v projections
    ("bthk,hkd->btd", (1, 50, 3, 32), (3, 32, 96)),  # output projection: two contracted
    ("td,df->tf", (300, 400), (400, 50)),            # two row chunks, three depth blocks
    ("td,df->tf", (50, 768), (768, 400)),            # split across threads, last panel partial
]


@needs_kernel
@needs_avx512
@pytest.mark.parametrize("spec,sa,sb", PACKED, ids=[f"{s}{sa}" for s, sa, _ in PACKED])
def test_a_constant_weight_takes_the_packed_kernel_and_matches_numpy(spec, sa, sb):
  a, b = (np.asarray(x) for x in _operands(sa, sb))
  f = lambda a: layers.einsum(spec, a, b)   # noqa: E731
  with cpu_gemm.use("mkl"):
    assert cpu_gemm.PACKED_TARGET in jax.jit(f).lower(a).as_text()
    out, vjp = jax.vjp(jax.jit(f), a)
  with cpu_gemm.use("xla"):
    assert "custom_call" not in jax.jit(f).lower(a).as_text()
  expected = np.einsum(spec, np.float64(a), np.float64(b))
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
  # The gradient in `a`: the cotangent contracted with b over b's free indices.
  g = np.random.default_rng(1).standard_normal(out.shape).astype(np.float32)
  sa_, sb_ = spec.split("->")[0].split(",")
  expected = np.einsum(f"{spec.split('->')[1]},{sb_}->{sa_}", np.float64(g), np.float64(b))
  np.testing.assert_allclose(vjp(g)[0], expected, rtol=1e-5,
                             atol=1e-5 * np.abs(expected).max())


@needs_kernel
@needs_avx512
def test_only_a_float32_numpy_layer_kernel_is_packed():
  a, b = _operands((50, 64), (64, 96))
  assert cpu_gemm.pack(np.asarray(b)).shape == (3, 64, cpu_gemm.PANEL)
  with cpu_gemm.use("mkl"):
    assert cpu_gemm.constant_einsum("td,df->tf", a, b) is None          # not a constant
    assert cpu_gemm.constant_einsum("td,df->tf", a, np.asarray(b)) is not None
    assert cpu_gemm.constant_einsum("td,fd->tf", a, np.asarray(b).T) is None   # transposed
    assert cpu_gemm.constant_einsum("td,df->tf", a.astype(jnp.bfloat16),
                                    np.asarray(b)) is None
    assert cpu_gemm.constant_einsum("btd,bdf->btf", a[None], np.asarray(b)[None]) is None
    assert cpu_gemm.constant_einsum("td,df->ft", a, np.asarray(b)) is None   # swapped output
    assert cpu_gemm.constant_einsum("dt,df->tf", a.T, np.asarray(b)) is None  # a transposed
    assert cpu_gemm.constant_einsum("td,df->tf", a, np.asarray(b, np.float64)) is None
    # vmapped over a's rows' batch: each call multiplies by the same packed weight
    per_row = jax.vmap(lambda x: layers.einsum("td,df->tf", x, np.asarray(b)))
    assert cpu_gemm.PACKED_TARGET in str(jax.make_jaxpr(per_row)(a.reshape(5, 10, 64)))
    batched = per_row(a.reshape(5, 10, 64))
    np.testing.assert_allclose(batched.reshape(50, 96), np.float64(a) @ np.float64(b), rtol=1e-5,
                               atol=1e-4)
  with cpu_gemm.use("xla"):
    assert cpu_gemm.constant_einsum("td,df->tf", a, np.asarray(b)) is None
  with cpu_gemm.use("mkl"), cpu_gemm.packing(False):
    assert cpu_gemm.constant_einsum("td,df->tf", a, np.asarray(b)) is None


@needs_kernel
@pytest.mark.parametrize("dtype", [jnp.float32, pytest.param(jnp.bfloat16, marks=needs_bf16)])
def test_vmapped_einsum_runs_the_kernel_per_element(dtype):
  """The kernel takes operands of any rank (sizes as attributes); under vmap each element is
  one call: a batched a, b or both, and a swapped output."""
  f64 = lambda x: np.float64(x.astype(jnp.float32))  # noqa: E731
  a, b = (x.astype(dtype) for x in _operands((3, 2, 4, 7, 5), (3, 2, 4, 6, 5)))
  cases = [((0, 0), a, b, "nbkqd,nbksd->nbkqs"),     # in_axes, a, b, numpy's spec
           ((0, None), a, b[0], "nbkqd,bksd->nbkqs"),
           ((None, 0), a[0], b, "bkqd,nbksd->nbkqs")]
  with cpu_gemm.use("mkl"):
    for in_axes, x, y, spec in cases:
      f = jax.vmap(lambda x, y: cpu_gemm.einsum("bkqd,bksd->bkqs", x, y), in_axes)
      assert "ffi_call" in str(jax.make_jaxpr(f)(x, y))
      np.testing.assert_allclose(jax.jit(f)(x, y), np.einsum(spec, f64(x), f64(y)), rtol=1e-5,
                                 atol=1e-5)
    x, y = a[:, 0, 0], b[:, 0, 0]                    # [3, 7, 5], [3, 6, 5]
    swapped = jax.vmap(lambda x, y: cpu_gemm.einsum("mk,nk->nm", x, y))(x, y)
    np.testing.assert_allclose(swapped, np.einsum("imk,ink->inm", f64(x), f64(y)), rtol=1e-5,
                               atol=1e-5)


@pytest.mark.parametrize("spec", KEPT)
def test_einsums_that_need_a_transpose_or_broadcast_stay_with_xla(spec):
  assert cpu_gemm.plan(spec) is None


@needs_kernel
def test_mixed_broadcast_and_empty_operands_stay_with_xla():
  with cpu_gemm.use("mkl"):
    a, b = _operands((2, 3, 4), (4, 5))
    assert cpu_gemm.einsum("btd,df->btf", a.astype(jnp.bfloat16), b) is None
    bf16 = cpu_gemm.einsum("btd,df->btf", a.astype(jnp.bfloat16), b.astype(jnp.bfloat16))
    assert (bf16 is not None) == cpu_gemm.has_bf16()
    assert cpu_gemm.einsum("bqd,bsd->bqs", *_operands((1, 3, 4), (2, 5, 4))) is None
    assert cpu_gemm.einsum("btd,df->btf", *_operands((0, 3, 4), (4, 5))) is None
    assert cpu_gemm.einsum("btd,df->btf", a, b) is not None


def test_modes(monkeypatch):
  """auto leaves the suite's 8 CPU devices to XLA (a sharded dot must stay one GSPMD can
  split); a bad mode is an error naming where it came from."""
  assert jax.device_count() > 1 and not cpu_gemm.active()
  with cpu_gemm.use("auto"):   # nor a sharded program's constant weights on the packed kernel
    assert not cpu_gemm.packs()
  monkeypatch.setenv("DRIVLM_CPU_GEMM", "xla")
  assert cpu_gemm.mode() == "xla" and not cpu_gemm.active()
  with cpu_gemm.use("auto"):
    assert cpu_gemm.mode() == "auto"
  monkeypatch.setenv("DRIVLM_CPU_GEMM", "blas")
  with pytest.raises(ValueError, match="DRIVLM_CPU_GEMM"):
    cpu_gemm.mode()
  with pytest.raises(ValueError, match="cpu_gemm.use"):
    with cpu_gemm.use("fast"):
      pass


@needs_kernel
def test_clip_vision_and_qwen2_on_mkl_match_transformers(tmp_path):
  model = ref.clip_vision()
  cfg, params = hf.load_vision_tower(ref.save(model, tmp_path / "clip"))
  x, xt = ref.images(2, cfg.image_size)
  with cpu_gemm.use("mkl"):
    assert "ffi_call" in str(jax.make_jaxpr(lambda x: vision.apply(cfg, params, x))(x))
    ours = vision.apply(cfg, params, x)
  with torch.inference_mode():
    theirs = model(pixel_values=xt)
  assert ref.max_diff(ours["last_hidden_state"], theirs.last_hidden_state) <= 1e-5
  assert ref.max_diff(ours["pooled"], theirs.pooler_output) <= 1e-5
  # As the deployed student runs it: numpy weights, looped layers (packed where AVX-512 is).
  deployed = jax.jit(functools.partial(vision.apply, dataclasses.replace(cfg, scan=False),
                                       graphs.constants(params)))
  with cpu_gemm.use("mkl"):
    hlo = deployed.lower(x).as_text()
    assert (cpu_gemm.PACKED_TARGET in hlo) == cpu_gemm.has_avx512()
    ours = deployed(x)
  assert ref.max_diff(ours["last_hidden_state"], theirs.last_hidden_state) <= 1e-5

  lm = ref.causal_lm(family="qwen2", kv_heads=2, tie=True)
  cfg, params = hf.load_language_model(ref.save(lm, tmp_path / "qwen2"))
  ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 11)).astype(np.int32)
  with cpu_gemm.use("mkl"):
    logits = language.apply(cfg, params, ids)
  with torch.inference_mode():
    assert ref.max_diff(logits, lm(torch.from_numpy(ids).long()).logits) <= 1e-5


def test_auto_leaves_small_products_to_xla(monkeypatch):
  """On a single device of an Intel CPU, auto takes a product of MIN_MACS multiply-adds and
  leaves a smaller one fused in XLA ("mkl" takes both)."""
  if MISSING:
    pytest.skip(f"MKL kernel: {MISSING}")
  monkeypatch.setattr(jax, "device_count", lambda: 1)
  monkeypatch.setattr(cpu_gemm.host, "cpuinfo", lambda: {"vendor_id": "GenuineIntel"})
  _clear_auto()
  try:
    big, small = _operands((cpu_gemm.MIN_MACS // 64, 8), (8, 8)), _operands((4, 8), (8, 8))
    with cpu_gemm.use("auto"):
      assert cpu_gemm.einsum("mk,kn->mn", *big) is not None
      assert cpu_gemm.einsum("mk,kn->mn", *small) is None
    with cpu_gemm.use("mkl"):
      assert cpu_gemm.einsum("mk,kn->mn", *small) is not None
  finally:
    _clear_auto()


def _clear_auto():
  cpu_gemm._auto.cache_clear()
  cpu_gemm._loads.cache_clear()
  cpu_gemm.has_avx512.cache_clear()


@needs_kernel
def test_auto_on_another_vendors_avx512_cpu_packs_constant_weights_only(monkeypatch):
  """On a single-device AVX-512 CPU that is not Intel's, auto keeps XLA's dots for every
  product but puts a deployed student's constant weights on the packed kernel (ours, not
  MKL's); the deployed student's kernel choice then times it against XLA's dots, with no MKL
  sgemm candidate."""
  if not cpu_gemm.has_avx512():
    pytest.skip("the packed-weight kernel needs AVX-512F")
  monkeypatch.setattr(jax, "device_count", lambda: 1)
  monkeypatch.setattr(cpu_gemm.host, "cpuinfo",
                      lambda: {"vendor_id": "AuthenticAMD", "flags": "avx2 fma avx512f"})
  _clear_auto()
  try:
    a, b = (np.asarray(x) for x in _operands((cpu_gemm.MIN_MACS // 64, 64), (64, 64)))
    f = lambda a: jnp.tanh(layers.einsum("mk,kn->mn", a, b))   # noqa: E731
    with cpu_gemm.use("auto"):
      assert not cpu_gemm.active() and cpu_gemm.packs()
      assert cpu_gemm.einsum("mk,kn->mn", a, b) is None
      assert cpu_gemm.PACKED_TARGET in jax.jit(f).lower(a).as_text()
      fn, chosen, p50 = kernels.fastest(f, [a], iters=2)
      assert set(p50) == {prefix + name for prefix in ("", "xla_dots/")
                          for name in kernels.CPU_CANDIDATES}
      np.testing.assert_allclose(fn(a), np.tanh(np.float64(a) @ np.float64(b)), atol=1e-5)
    with cpu_gemm.use("xla"):
      assert not cpu_gemm.packs()
    monkeypatch.setattr(cpu_gemm.host, "cpuinfo",
                        lambda: {"vendor_id": "AuthenticAMD", "flags": "avx2 fma"})
    _clear_auto()
    with cpu_gemm.use("auto"):
      assert not cpu_gemm.packs()
  finally:
    _clear_auto()


@needs_kernel
def test_a_function_traced_on_mkl_is_traced_again_for_xla():
  """The mode is part of JAX's cache keys: `use("xla")` after a jitted call on MKL (what the
  export does after the JAX student ran) gets XLA's dots, not the cached trace."""
  a, b = _operands((8, 8), (8, 8))

  def f(a, b):
    return layers.einsum("mk,kn->mn", a, b)

  with cpu_gemm.use("mkl"):
    jax.jit(f)(a, b)
  with cpu_gemm.use("xla"):
    assert "custom_call" not in jax.jit(f).lower(a, b).as_text()
    assert "ffi_call" not in str(jax.make_jaxpr(f)(a, b))
  with cpu_gemm.use("mkl"):
    assert "custom_call" in jax.jit(f).lower(a, b).as_text()


@needs_kernel
@pytest.mark.parametrize("constant", [False, True], ids=["weight_arg", "weight_constant"])
def test_the_deployed_student_kernels_try_xla_dots_beside_mkl_and_count_all_flops(constant):
  """A constant weight (packed on AVX-512) adds MKL's sgemm on it as a candidate."""
  a, b = (np.asarray(x) for x in _operands((64, 32), (32, 16)))

  def f(a, *b_arg):
    return jnp.tanh(layers.einsum("mk,kn->mn", a, b_arg[0] if b_arg else b))

  args = [a] if constant else [a, b]
  with cpu_gemm.use("mkl"):
    fn, chosen, p50 = kernels.fastest(f, args, iters=2)
    expected = {prefix + name for prefix in ("", "xla_dots/") for name in kernels.CPU_CANDIDATES}
    if constant and cpu_gemm.has_avx512():
      expected.add("mkl_sgemm/default")
    assert set(p50) == expected and chosen == min(p50, key=p50.get)
    np.testing.assert_allclose(fn(*args), np.tanh(np.float64(a) @ np.float64(b)), atol=1e-5)
    assert kernels.gflops(f, args, 1) == pytest.approx(2 * 64 * 32 * 16 / 1e9, rel=0.1)


@needs_kernel
def test_a_kernel_that_cannot_be_built_is_named(monkeypatch, tmp_path):
  (tmp_path / "file").write_text("")
  monkeypatch.setenv("DRIVLM_CACHE", str(tmp_path / "file" / "cache"))
  with pytest.raises(cpu_gemm.Unavailable, match="DRIVLM_CACHE"):
    cpu_gemm._build()
  monkeypatch.setenv("DRIVLM_CACHE", str(tmp_path / "cache"))
  monkeypatch.setenv("CXX", "no-such-compiler")
  with pytest.raises(cpu_gemm.Unavailable, match="no C.. compiler .no-such-compiler"):
    cpu_gemm._build()
