"""VLM parts: heads, truncated and split towers, pruning inside the tower. Whole-model
parity with transformers' LLaVA (both families, generation, save/load) is tests/test_llava.py."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from drivlm_jax import hf
from drivlm_jax.model import vision, vlm
from tests import reference as ref

TOL = 1e-5
IMAGE_TOKEN = 5


def _llava(tmp_path, family, feature_layer):
  vis, lm = ref.clip_vision(layers=3), ref.causal_lm(family=family, vocab=96)
  config = transformers.LlavaConfig(
      vision_config=vis.config.to_dict(), text_config=lm.config.to_dict(),
      image_token_index=IMAGE_TOKEN, image_seq_length=16, vision_feature_layer=feature_layer,
      vision_feature_select_strategy="default", projector_hidden_act="gelu",
      tie_word_embeddings=lm.config.tie_word_embeddings)
  torch.manual_seed(1)
  llava = transformers.LlavaForConditionalGeneration(config)
  llava.model.vision_tower.load_state_dict(vis.state_dict())
  llava.model.language_model.load_state_dict(lm.model.state_dict())
  llava.lm_head.load_state_dict(lm.lm_head.state_dict())
  ref.perturb(llava.model.multi_modal_projector, seed=2)
  llava.eval()
  vcfg, vparams = hf.load_vision_tower(ref.save(vis, tmp_path / "vision"))
  lcfg, lparams = hf.load_language_model(ref.save(lm, tmp_path / "lm"))
  cfg = vlm.Config(vision=vcfg, language=lcfg, image_token_id=IMAGE_TOKEN,
                   vision_feature_layer=feature_layer)
  params = vlm.init(cfg, jax.random.key(0))
  proj = llava.model.multi_modal_projector
  params.update(vision=vparams, language=lparams, projector={
      name: {"kernel": getattr(proj, name).weight.detach().numpy().T,
             "bias": getattr(proj, name).bias.detach().numpy()}
      for name in ("linear_1", "linear_2")})
  return llava, cfg, params


def _prompt(cfg, seed=0):
  return ref.llava_prompt(cfg, IMAGE_TOKEN, seed)


def _softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def test_heads_read_attention_pooled_visual_tokens(tmp_path):
  _, cfg, params = _llava(tmp_path, "llama", -1)
  x, _ = ref.images(2, cfg.vision.image_size, seed=3)
  out = vlm.encode_image(cfg, params, x)
  # Reference: multi-head attention of the learned probe over the visual tokens, in numpy.
  p = jax.tree.map(np.asarray, params["heads"]["pool"])
  tokens = np.asarray(out["visual_tokens"])
  q = np.einsum("d,dhk->hk", p["probe"][0, 0], p["q_proj"]["kernel"]) + p["q_proj"]["bias"]
  k = np.einsum("bnd,dhk->bnhk", tokens, p["k_proj"]["kernel"]) + p["k_proj"]["bias"]
  v = np.einsum("bnd,dhk->bnhk", tokens, p["v_proj"]["kernel"]) + p["v_proj"]["bias"]
  attn = _softmax(np.einsum("hk,bnhk->bhn", q, k) / np.sqrt(q.shape[-1]))
  pooled = np.einsum("bhn,bnhk->bhk", attn, v)
  pooled = np.einsum("bhk,hkd->bd", pooled, p["out_proj"]["kernel"]) + p["out_proj"]["bias"]
  np.testing.assert_allclose(out["pooled_visual"], pooled, atol=1e-5)
  # The image-only path and the full path agree on everything they share.
  ids, mask = _prompt(cfg)
  full = vlm.apply(cfg, params, x, ids, mask)
  np.testing.assert_allclose(full["action_logits"], out["action_logits"], atol=1e-6)


def test_truncated_tower_equals_hf_hidden_states(tmp_path):
  model = ref.clip_vision(layers=3)
  cfg, params = hf.load_vision_tower(ref.save(model, tmp_path))
  x, xt = ref.images(1, cfg.image_size)
  with torch.inference_mode():
    hidden = model(pixel_values=xt, output_hidden_states=True).hidden_states
  for layer in (-1, -2, 1):
    tcfg, tparams = vision.truncate(cfg, params, layer)
    got = vision.apply(tcfg, tparams, x)["patch_features"]
    assert ref.max_diff(got, hidden[layer][:, 1:]) <= TOL
  with pytest.raises(ValueError, match="outside a 3-layer tower"):
    vision.truncate(cfg, params, -5)


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_split_tower_equals_the_whole(tmp_path, family):
  model = ref.clip_vision(layers=3) if family == "clip" else ref.siglip_vision(layers=3)
  cfg, params = hf.load_vision_tower(ref.save(model, tmp_path))
  x, xt = ref.images(2, cfg.image_size)
  with torch.inference_mode():
    hf_out = model(pixel_values=xt, output_hidden_states=True)
  whole = vision.apply(cfg, params, x)
  for layer in (0, 1, 3):
    (stem_cfg, stem), (tail_cfg, tail) = vision.split(cfg, params, layer)
    hidden = vision.apply_part(stem_cfg, stem, x, "stem")
    assert ref.max_diff(hidden, hf_out.hidden_states[layer]) <= TOL
    out = vision.apply_part(tail_cfg, tail, hidden, "tail")
    for k in ("last_hidden_state", "pooled", "patch_features"):
      np.testing.assert_allclose(out[k], whole[k], atol=1e-5)
  with pytest.raises(ValueError, match="outside a 3-layer tower"):
    vision.split(cfg, params, 4)


def test_pruning_inside_the_tower_runs_later_layers_on_the_kept_tokens():
  from configs import common
  import dataclasses
  cfg = dataclasses.replace(vlm.config_from_dict(common.model_config("tiny")), reweight=True,
                            reweight_dim=32, reweight_layer=0)
  params = vlm.init(cfg, jax.random.key(0))
  params["reweighting"]["gain"] = jnp.float32(1.0)   # 0 at init: all gates 1, scores tied
  images = np.random.default_rng(0).normal(size=(2, 64, 64, 3)).astype(np.float32)
  instruction = np.array([[20, 21, 22, 0], [30, 31, 0, 0]], np.int32)
  mask = (instruction > 0).astype(np.int32)
  out = vlm.encode_image(cfg, params, images, instruction, mask, keep_ratio=0.25)
  # Reference: embeddings -> gate and keep the top 16 patches (class token kept) -> all layers.
  (stem_cfg, stem), (tail_cfg, tail) = vision.split(cfg.vision, params["vision"], 0)
  hidden = np.asarray(vision.apply_part(stem_cfg, stem, images, "stem"))
  scores = np.asarray(out["token_scores"])
  assert scores.shape == (2, 64)
  top = np.sort(np.argsort(-scores, axis=1)[:, :16], axis=1)
  np.testing.assert_array_equal(out["kept_indices"], top)
  gated = hidden[:, 1:] * 2 / (1 + np.exp(-scores[..., None]))
  kept = np.concatenate([hidden[:, :1], np.take_along_axis(gated, top[..., None], 1)], 1)
  expected = vision.apply_part(tail_cfg, tail, kept, "tail")["patch_features"]
  np.testing.assert_allclose(out["patch_features"], expected, atol=1e-5)
  assert out["visual_tokens"].shape == (2, 16, cfg.language.hidden_size)


def test_several_feature_layers_take_the_kept_tokens_of_each():
  """Features of layers before, at and after the pruning point, concatenated in the config's
  order: the earlier ones ungated at the kept tokens, the pruning point's gated."""
  from configs import common
  import dataclasses
  base = vlm.config_from_dict(common.model_config("tiny"))
  assert base.vision.num_layers >= 2
  cfg = dataclasses.replace(base, reweight=True, reweight_dim=32, reweight_layer=1,
                            vision_feature_layer=[0, -1, 1])
  assert cfg.vision_feature_layer == (0, -1, 1)
  params = vlm.init(cfg, jax.random.key(0))
  assert params["projector"]["linear_1"]["kernel"].shape[0] == 3 * cfg.vision.hidden_size
  params["reweighting"]["gain"] = jnp.float32(1.0)
  images = np.random.default_rng(0).normal(size=(2, 64, 64, 3)).astype(np.float32)
  instruction = np.array([[20, 21, 22, 0], [30, 31, 0, 0]], np.int32)
  mask = (instruction > 0).astype(np.int32)
  out = vlm.encode_image(cfg, params, images, instruction, mask, keep_ratio=0.25)
  # Reference from the split tower (checked against HF's hidden states above).
  stem0 = vision.apply_part(*vision.split(cfg.vision, params["vision"], 0)[0], images, "stem")
  (stem_cfg, stem), (tail_cfg, tail) = vision.split(cfg.vision, params["vision"], 1)
  hidden1 = np.asarray(vision.apply_part(stem_cfg, stem, images, "stem"))
  scores = np.asarray(out["token_scores"])
  top = np.sort(np.argsort(-scores, axis=1)[:, :16], axis=1)
  np.testing.assert_array_equal(out["kept_indices"], top)
  take = lambda h: np.take_along_axis(np.asarray(h)[:, 1:], top[..., None], 1)
  gated = np.concatenate([hidden1[:, :1], hidden1[:, 1:] * 2 / (1 + np.exp(-scores[..., None]))],
                         1)
  last = vision.apply_part(tail_cfg, tail, np.concatenate([gated[:, :1], take(gated)], 1),
                           "tail")["patch_features"]
  expected = np.concatenate([take(stem0), last, take(gated)], axis=-1)
  np.testing.assert_allclose(out["patch_features"], expected, atol=1e-5)
  assert out["visual_tokens"].shape == (2, 16, cfg.language.hidden_size)
  with pytest.raises(ValueError, match="reweight_layer 3 is outside the 2 vision layers"):
    dataclasses.replace(cfg, vision_feature_layer=(0, 2), reweight_layer=3)
  with pytest.raises(ValueError, match="outside a"):
    dataclasses.replace(cfg, vision_feature_layer=(0, 9))


def test_instruction_reweighting_and_pruning_path():
  from configs import common
  import dataclasses
  cfg = dataclasses.replace(vlm.config_from_dict(common.model_config("tiny")), reweight=True,
                            reweight_dim=32)
  params = vlm.init(cfg, jax.random.key(0))
  params["reweighting"]["gain"] = jnp.float32(1.0)   # 0 at init: all gates 1, scores tied
  images = np.random.default_rng(0).normal(size=(2, 64, 64, 3)).astype(np.float32)
  instruction = np.array([[20, 21, 22, 0], [30, 31, 0, 0]], np.int32)
  mask = (instruction > 0).astype(np.int32)
  full = vlm.encode_image(cfg, params, images, instruction, mask)
  assert full["token_scores"].shape == (2, cfg.num_visual_tokens)
  pruned = vlm.encode_image(cfg, params, images, instruction, mask, keep_ratio=0.25)
  assert pruned["visual_tokens"].shape == (2, 16, cfg.language.hidden_size)
  np.testing.assert_array_equal(
      np.sort(np.argsort(-np.asarray(full["token_scores"]), axis=1)[:, :16], axis=1),
      pruned["kept_indices"])
  # The gates are trained through the task loss.
  grads = jax.grad(lambda p: jnp.sum(vlm.encode_image(cfg, p, images, instruction, mask)
                                     ["action_logits"]))(params)
  assert float(jnp.abs(grads["reweighting"]["query"]["kernel"]).sum()) > 0
  with pytest.raises(ValueError, match="needs the instruction"):
    vlm.encode_image(cfg, params, images)
