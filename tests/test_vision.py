"""Vision tower parity against transformers (CLIP and SigLIP), loading and round trip."""
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers

from drivlm_jax import hf, pretrained
from drivlm_jax.data import preprocess
from drivlm_jax.model import vision
from tests import reference as ref

TOL = 1e-5


def _check(model, path, batch=2):
  cfg, params = hf.load_vision_tower(path)
  x, xt = ref.images(batch, cfg.image_size)
  ours = vision.apply(cfg, params, x)
  with torch.inference_mode():
    theirs = model(pixel_values=xt)
  assert ref.max_diff(ours["last_hidden_state"], theirs.last_hidden_state) <= TOL
  if theirs.pooler_output is not None:
    assert ref.max_diff(ours["pooled"], theirs.pooler_output) <= TOL
  return cfg, params


@pytest.mark.parametrize("kwargs", [
    dict(),
    dict(image_size=28, patch_size=7, hidden=32, heads=2, layers=3),
    dict(image_size=16, patch_size=4, hidden=24, heads=3, layers=1),
    dict(act="relu"), dict(act="gelu_python"), dict(act="gelu_new"),
])
def test_clip_vision_matches_transformers(tmp_path, kwargs):
  model = ref.clip_vision(**kwargs)
  cfg, _ = _check(model, ref.save(model, tmp_path))
  assert cfg.family == "clip"


@pytest.mark.parametrize("kwargs", [
    dict(),
    dict(image_size=28, patch_size=7, hidden=32, heads=2, layers=3),
    dict(use_head=False),
])
def test_siglip_vision_matches_transformers(tmp_path, kwargs):
  model = ref.siglip_vision(**kwargs)
  cfg, _ = _check(model, ref.save(model, tmp_path))
  assert cfg.family == "siglip"


def test_a_siglip_tower_storing_a_head_its_config_turns_off_loads_as_transformers(tmp_path,
                                                                                  caplog):
  """vision_use_head false, the head's tensors still in the file: transformers leaves them
  unused; so do we, with a warning."""
  path = ref.save(ref.siglip_vision(), tmp_path / "src")
  config_file = tmp_path / "src" / "config.json"
  config_file.write_text(json.dumps({**json.loads(config_file.read_text()),
                                     "vision_use_head": False}))
  model = transformers.AutoModel.from_pretrained(path).eval()
  with caplog.at_level("WARNING"):
    cfg, _ = _check(model, path)
  assert not cfg.use_head and "pooling head" in caplog.text


def test_vision_from_full_clip_and_siglip_checkpoints(tmp_path):
  clip = ref.clip_model()
  _check(clip.vision_model, ref.save(clip, tmp_path / "clip"))
  siglip = ref.siglip_model()
  _check(siglip.vision_model, ref.save(siglip, tmp_path / "siglip"))


def test_sharded_checkpoint_loads(tmp_path):
  model = ref.clip_vision()
  path = ref.save(model, tmp_path, max_shard_size="40KB")
  assert (tmp_path / hf.SAFETENSORS_INDEX).exists()
  _check(model, path)


@pytest.mark.parametrize("make", [ref.clip_vision, ref.siglip_vision])
def test_save_round_trip_loads_in_transformers(tmp_path, make):
  """With the checkpoint's own image statistics (its saved processor's), which the model
  config takes, a run's pretrained start keeps and the saved tower's processor holds."""
  model = make()
  src = ref.save(model, tmp_path / "src")
  own = {"image_mean": [0.3, 0.4, 0.5], "image_std": [0.2, 0.25, 0.3]}
  processors = {"clip": transformers.CLIPImageProcessor,
                "siglip": transformers.SiglipImageProcessor}
  family = "siglip" if "Siglip" in type(model).__name__ else "clip"
  processors[family](**own).save_pretrained(src)
  cfg, params = hf.load_vision_tower(src)
  assert preprocess.statistics(cfg) == tuple(tuple(own[k]) for k in own)
  fields = pretrained.model_fields(init_vision=src)
  assert fields["vision"]["image_mean"] == (0.3, 0.4, 0.5)
  # A fresh projector on a SigLIP tower (no class token) takes every patch.
  assert fields.get("vision_feature_select_strategy") == ("full" if family == "siglip" else None)
  hf.save_vision_tower(cfg, params, str(tmp_path / "out"))
  reloaded = transformers.AutoModel.from_pretrained(str(tmp_path / "out")).eval()
  assert type(reloaded) is type(model)
  processor = transformers.AutoImageProcessor.from_pretrained(str(tmp_path / "out"))
  assert type(processor).__name__.startswith(processors[family].__name__)
  assert {k: list(getattr(processor, k)) for k in own} == own
  x, xt = ref.images(2, cfg.image_size, seed=1)
  ours = vision.apply(cfg, params, x)
  with torch.inference_mode():
    theirs = reloaded(pixel_values=xt)
  assert ref.max_diff(ours["last_hidden_state"], theirs.last_hidden_state) <= TOL
  assert ref.max_diff(ours["pooled"], theirs.pooler_output) <= TOL


def test_standardize_feeds_transformers_each_image_at_mean_0_std_1(tmp_path):
  """`standardize`: the HF tower on images standardised by numpy ((x - mean) / (std + eps)
  over each image's pixels and channels); such a tower has no HF form to save."""
  model = ref.clip_vision()
  cfg, params = hf.load_vision_tower(ref.save(model, tmp_path))
  cfg = dataclasses.replace(cfg, standardize=True)
  x, _ = ref.images(2, cfg.image_size)
  x = np.asarray(x) * np.array([0.2, 3.0])[:, None, None, None] + 0.5   # two exposures
  flat = x.reshape(2, -1)
  expected = (flat - flat.mean(1, keepdims=True)) / (flat.std(1, keepdims=True)
                                                     + vision.STANDARDIZE_EPS)
  with torch.inference_mode():
    theirs = model(pixel_values=torch.from_numpy(
        expected.reshape(x.shape).transpose(0, 3, 1, 2).astype(np.float32)))
  ours = vision.apply(cfg, params, x.astype(np.float32))
  assert ref.max_diff(ours["last_hidden_state"], theirs.last_hidden_state) <= TOL
  with pytest.raises(hf.CheckpointError, match=r"vision.standardize: HF's CLIP/SigLIP towers"):
    hf.save_vision_tower(cfg, params, str(tmp_path / "out"))


def test_an_activation_we_lack_is_an_error_naming_the_config(tmp_path):
  path = ref.save(ref.clip_vision(act="mish"), tmp_path)   # in transformers' ACT2FN
  with pytest.raises(hf.CheckpointError, match=r"config.json: hidden_act 'mish' is not "):
    hf.load_vision_tower(path)


def test_wrong_image_shape_is_a_clear_error(tmp_path):
  cfg, params = hf.load_vision_tower(ref.save(ref.clip_vision(), tmp_path))
  with pytest.raises(ValueError, match=r"NHWC"):
    vision.apply(cfg, params, np.zeros((1, 3, 32, 32), np.float32))


def test_bf16_compute_stays_close_to_transformers_fp32(tmp_path):
  """The mixed-precision path (bf16 compute, fp32 params; matmuls accumulate in fp32): within
  bf16 rounding of HF's fp32 output, and bf16 where the compute dtype says."""
  model = ref.clip_vision(image_size=28, patch_size=7, hidden=32, heads=2, layers=3)
  cfg, params = hf.load_vision_tower(ref.save(model, tmp_path))
  x, xt = ref.images(2, cfg.image_size)
  ours = vision.apply(dataclasses.replace(cfg, dtype="bfloat16"), params, x)
  with torch.inference_mode():
    theirs = model(pixel_values=xt).last_hidden_state.numpy()
  assert ours["last_hidden_state"].dtype == jnp.bfloat16
  err = ref.max_diff(ours["last_hidden_state"].astype(jnp.float32), theirs)
  assert 1e-4 < err <= 3e-2 * np.abs(theirs).max(), (err, np.abs(theirs).max())


@pytest.mark.parametrize("make", [ref.clip_vision, ref.siglip_vision])
def test_bf16_gradients_stay_close_to_transformers_fp32(tmp_path, make):
  """The mixed-precision backward (custom gradients of the bf16 matmuls and bias adds, the
  activation recomputed): every parameter's gradient within bf16 rounding of torch's fp32
  backward, and float32 like the params."""
  model = make(image_size=28, patch_size=7, hidden=32, heads=2, layers=3)
  cfg, params = hf.load_vision_tower(ref.save(model, tmp_path / "model"))
  x, xt = ref.images(2, cfg.image_size)
  out = vision.apply(cfg, params, x)
  rng = np.random.default_rng(1)
  w = {k: rng.normal(size=out[k].shape).astype(np.float32) for k in ("last_hidden_state", "pooled")}
  bf16 = dataclasses.replace(cfg, dtype="bfloat16")

  def loss(p):   # both outputs: the pooled one reaches SigLIP's attention-pooling head
    out = vision.apply(bf16, p, x)
    return sum(jnp.sum(out[k].astype(jnp.float32) * w[k]) for k in w)

  grads = jax.grad(loss)(params)
  assert {g.dtype for g in jax.tree.leaves(grads)} == {jnp.dtype(jnp.float32)}
  theirs = model(pixel_values=xt)
  (sum((getattr(theirs, name) * torch.from_numpy(w[k])).sum()
       for k, name in (("last_hidden_state", "last_hidden_state"), ("pooled", "pooler_output")))
   .backward())
  hf.save_vision_tower(cfg, grads, str(tmp_path / "grads"))   # our grads under HF's names
  ours = safetensors.numpy.load_file(str(tmp_path / "grads" / hf.SAFETENSORS))
  ours = {k.removeprefix("vision_model."): v for k, v in ours.items()}
  theirs = {n: p.grad.numpy() for n, p in model.named_parameters() if p.grad is not None}
  assert set(theirs) <= set(ours) and len(theirs) > 30
  # Relative to each tensor's own scale (bf16 rounding through 3 layers and the head: up to
  # 3.3% here, 3.6% before the custom bias gradient); where the true gradient is zero (the key biases:
  # softmax ignores a shift shared by all keys) both sides are rounding noise, small
  # against the largest gradient.
  largest = max(np.abs(g).max() for g in theirs.values())
  for name, g in theirs.items():
    err, scale = ref.max_diff(ours[name], g), np.abs(g).max()
    if scale < 1e-5 * largest:
      assert err <= 1e-3 * largest, (name, err, largest)
    else:
      assert err <= 5e-2 * scale, (name, err, scale)
