"""CLIP text tower + projections + logit scale against transformers' CLIPModel."""
import numpy as np
import pytest
import torch
import transformers

from drivlm_jax import hf
from drivlm_jax.model import text, vision
from tests import reference as ref

TOL = 1e-5


def _tokens(cfg, batch=3, length=10, seed=0):
  """Right-padded ids with one EOS per row (as CLIP tokenizers produce) and their mask."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(3, cfg.vocab_size - 1, (batch, length)).astype(np.int32)
  mask = np.zeros_like(ids)
  for row, n in enumerate(rng.integers(3, length + 1, batch)):
    ids[row, n - 1] = cfg.eos_token_id if cfg.eos_token_id != 2 else cfg.vocab_size - 1
    ids[row, n:] = 0
    mask[row, :n] = 1
  return ids, mask


@pytest.mark.parametrize("kwargs", [
    dict(),
    dict(hidden=48, heads=3, layers=3, vision_hidden=32, projection=16),
    dict(eos_token_id=2),  # legacy checkpoints: pooled at argmax(input_ids)
])
def test_clip_text_and_similarity_match_transformers(tmp_path, kwargs):
  model = ref.clip_model(**kwargs)
  path = ref.save(model, tmp_path)
  cfg, params = hf.load_text_tower(path)
  vcfg, vparams = hf.load_vision_tower(path)
  ids, mask = _tokens(cfg)
  x, xt = ref.images(2, vcfg.image_size)
  ours = text.apply(cfg, params, ids, mask)
  image_embeds = text.image_embeds(cfg, params, vision.apply(vcfg, vparams, x)["pooled"])
  tid, tmask = torch.from_numpy(ids).long(), torch.from_numpy(mask).long()
  with torch.inference_mode():
    t_out = model.text_model(input_ids=tid, attention_mask=tmask)
    full = model(input_ids=tid, attention_mask=tmask, pixel_values=xt)
    text_embeds = model.text_projection(t_out.pooler_output)
    ref_image_embeds = model.visual_projection(model.vision_model(pixel_values=xt).pooler_output)
  assert ref.max_diff(ours["last_hidden_state"], t_out.last_hidden_state) <= TOL
  assert ref.max_diff(ours["pooled"], t_out.pooler_output) <= TOL
  assert ref.max_diff(ours["text_embeds"], text_embeds) <= TOL
  assert ref.max_diff(image_embeds, ref_image_embeds) <= TOL
  logits = text.similarity(params, image_embeds, ours["text_embeds"])
  assert ref.max_diff(logits, full.logits_per_image) <= 1e-4  # scaled by exp(logit_scale)


def test_text_round_trip_as_full_clip_model(tmp_path):
  model = ref.clip_model()
  path = ref.save(model, tmp_path / "src")
  cfg, params = hf.load_text_tower(path)
  vision_tower = hf.load_vision_tower(path)
  hf.save_text_tower(cfg, params, str(tmp_path / "out"), vision_tower=vision_tower)
  reloaded = transformers.CLIPModel.from_pretrained(str(tmp_path / "out")).eval()
  ids, mask = _tokens(cfg, seed=1)
  x, xt = ref.images(2, 32, seed=1)
  with torch.inference_mode():
    full = reloaded(input_ids=torch.from_numpy(ids).long(),
                    attention_mask=torch.from_numpy(mask).long(), pixel_values=xt)
  ours = text.apply(cfg, params, ids, mask)
  image_embeds = text.image_embeds(cfg, params, vision.apply(*vision_tower, x)["pooled"])
  assert ref.max_diff(text.similarity(params, image_embeds, ours["text_embeds"]),
                      full.logits_per_image) <= 1e-4


def test_text_round_trip_without_vision_keeps_everything(tmp_path):
  cfg, params = hf.load_text_tower(ref.save(ref.clip_model(), tmp_path / "src"))
  hf.save_text_tower(cfg, params, str(tmp_path / "out"))
  reloaded = transformers.CLIPTextModelWithProjection.from_pretrained(str(tmp_path / "out"))
  ids, mask = _tokens(cfg, seed=2)
  with torch.inference_mode():
    theirs = reloaded.eval()(input_ids=torch.from_numpy(ids).long(),
                             attention_mask=torch.from_numpy(mask).long())
  assert ref.max_diff(text.apply(cfg, params, ids, mask)["text_embeds"],
                      theirs.text_embeds) <= TOL
  cfg2, params2 = hf.load_text_tower(str(tmp_path / "out"))
  assert cfg2 == cfg
  np.testing.assert_array_equal(params2["visual_projection"]["kernel"],
                                params["visual_projection"]["kernel"])
  np.testing.assert_array_equal(params2["logit_scale"], params["logit_scale"])


def test_text_longer_than_the_position_table_is_an_error(tmp_path):
  """As transformers refuses it (a lookup past the table would give NaN here)."""
  cfg, params = hf.load_text_tower(ref.save(ref.clip_model(), tmp_path / "src"))
  ids = np.ones((1, cfg.max_position_embeddings + 1), np.int32)
  with pytest.raises(ValueError, match=rf"{cfg.max_position_embeddings + 1} tokens: .* at most "
                                       rf"max_position_embeddings = {cfg.max_position_embeddings}"):
    text.apply(cfg, params, ids, np.ones_like(ids))
