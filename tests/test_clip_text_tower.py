"""The CLIP stage with a real CLIP text tower (`config.clip.text_tower`): its weights come in
through `pretrained.start`, and the captions are in its own tokens, so the pipeline's
caption embeddings equal transformers' CLIPModel.get_text_features."""
import jax
import torch

from drivlm_jax import adapt, pretrained, run as run_lib
from drivlm_jax.data import pipeline, sources
from drivlm_jax.model import text, vlm
from tests import chat
from tests import reference as ref
from tests.test_train import small_config


def test_the_clip_stage_uses_the_checkpoints_text_tower_and_tokenizer(tmp_path):
  tok = chat.clip_tokenizer(tmp_path / "clip")
  model = ref.clip_model(vocab=len(tok), vision_hidden=64, eos_token_id=tok.eos_token_id)
  model.save_pretrained(tmp_path / "clip")
  config = small_config(str(tmp_path / "data"), "method=clip_finetune,steps=2",
                        **{"clip.text_tower": str(tmp_path / "clip")})
  cfg = run_lib.model_config(config)
  data = sources.prepare(config.data, str(tmp_path / "run"))
  feats = run_lib.features(config, cfg, data["tokenizer"])
  (component,) = adapt.build(config, cfg, feats)
  params = vlm.init(cfg, jax.random.key(0))
  params["text"] = component.init(jax.random.key(1))
  params = pretrained.start(params, cfg, config)

  batch = next(iter(pipeline.batches(data["source", "train"], feats, 4, seed=0)))
  for ids, mask in zip(batch["caption_ids"], batch["caption_mask"]):
    assert list(ids[mask > 0]) == tok(tok.decode(ids[mask > 0], skip_special_tokens=True)
                                      )["input_ids"]
    assert ids[0] == tok.bos_token_id and ids[mask > 0][-1] == tok.eos_token_id
  ours = text.apply(component.tcfg, params["text"], batch["caption_ids"],
                    batch["caption_mask"])["text_embeds"]
  with torch.inference_mode():
    theirs = model.get_text_features(
        input_ids=torch.from_numpy(batch["caption_ids"]).long(),
        attention_mask=torch.from_numpy(batch["caption_mask"]).long())
  theirs = getattr(theirs, "pooler_output", theirs)
  assert ref.max_diff(ours, theirs) <= 1e-5
