"""HF LLaVA directories in and out (`hf.load_vlm` / `hf.save_vlm`) against transformers'
LlavaForConditionalGeneration on tiny random models with every 0-/1-D parameter perturbed."""
import dataclasses
import json
import pathlib

import jax
import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from configs import demo
from drivlm_jax import hf, pretrained, run as run_lib
from drivlm_jax.evals import generation
from drivlm_jax.model import vlm
from tests import reference as ref

IMAGE_TOKEN = 7
CASES = {
    # SigLIP + Qwen2 (GQA), tied embeddings, every vision token projected, no projector bias;
    # 36 px in patches of 8 leaves a remainder, as so400m-patch14-384 does (27 x 14 = 378).
    "siglip_qwen2": dict(vision=lambda: ref.siglip_vision(image_size=36, layers=2),
                         lm=lambda: ref.causal_lm("qwen2", vocab=96, kv_heads=2, tie=True),
                         layer=-1, strategy="full", bias=False),
    # CLIP + LLaMA with one KV head, untied, penultimate layer, class token dropped.
    "clip_llama": dict(vision=lambda: ref.clip_vision(layers=3),
                       lm=lambda: ref.causal_lm("llama", vocab=96, kv_heads=1, tie=False),
                       layer=-2, strategy="default", bias=True),
    # Several feature layers (the embeddings, the last, the first), concatenated in that
    # order for the projector (HF LLaVA's list form).
    "clip_qwen2_layers": dict(vision=lambda: ref.clip_vision(layers=3),
                              lm=lambda: ref.causal_lm("qwen2", vocab=96, kv_heads=2, tie=False),
                              layer=[0, -1, 1], strategy="default", bias=True),
}


def _llava(name):
  case = CASES[name]
  vis, lm = case["vision"](), case["lm"]()
  config = transformers.LlavaConfig(
      vision_config=vis.config.to_dict(), text_config=lm.config.to_dict(),
      image_token_index=IMAGE_TOKEN, vision_feature_layer=case["layer"],
      vision_feature_select_strategy=case["strategy"], projector_hidden_act="gelu",
      multimodal_projector_bias=case["bias"],
      tie_word_embeddings=lm.config.tie_word_embeddings)
  torch.manual_seed(3)
  return ref.perturb(transformers.LlavaForConditionalGeneration(config), seed=4)


@pytest.fixture(scope="module", params=sorted(CASES))
def llava(request, tmp_path_factory):
  """(torch model, its directory, our cfg, our full params)."""
  model = _llava(request.param)
  path = ref.save(model, tmp_path_factory.mktemp(request.param))
  cfg, params = hf.load_vlm(path)
  assert set(params) == {"vision", "projector", "language"}
  return model, path, cfg, {**vlm.init(cfg, jax.random.key(0)), **params}


def _prompt(cfg, seed=0):
  return ref.llava_prompt(cfg, IMAGE_TOKEN, seed)


def _hf_logits(model, ids, mask, xt):
  positions = np.where(mask > 0, np.cumsum(mask, -1) - 1, 1)
  with torch.inference_mode():
    return model(input_ids=torch.from_numpy(ids).long(), pixel_values=xt,
                 attention_mask=torch.from_numpy(mask).long(),
                 position_ids=torch.from_numpy(positions).long()).logits.numpy()


def _assert_logits_match(model, cfg, params):
  """Our logits with `params` (completed by fresh DriVLM parts) against `model`'s."""
  params = {**vlm.init(cfg, jax.random.key(0)), **params}
  ids, mask = _prompt(cfg)
  x, xt = ref.images(2, cfg.vision.image_size)
  ours = np.asarray(vlm.apply(cfg, params, x, ids, mask)["lm_logits"])
  real = mask > 0
  assert ref.max_diff(ours[real], _hf_logits(model, ids, mask, xt)[real]) <= 1e-4


def test_logits_match_transformers(llava):
  model, _, cfg, params = llava
  ids, mask = _prompt(cfg)
  x, xt = ref.images(2, cfg.vision.image_size)
  ours = np.asarray(vlm.apply(cfg, params, x, ids, mask)["lm_logits"])
  real = mask > 0
  assert ref.max_diff(ours[real], _hf_logits(model, ids, mask, xt)[real]) <= 1e-4


def test_greedy_generation_matches_transformers(llava):
  model, _, cfg, params = llava
  ids, _ = _prompt(cfg, seed=1)
  x, xt = ref.images(2, cfg.vision.image_size, seed=1)
  ours = vlm.generate(cfg, params, x, ids, max_new_tokens=6)
  with torch.inference_mode():
    theirs = model.generate(input_ids=torch.from_numpy(ids).long(), pixel_values=xt,
                            attention_mask=torch.ones(ids.shape, dtype=torch.long),
                            max_new_tokens=6, do_sample=False, pad_token_id=0)
  np.testing.assert_array_equal(np.asarray(ours), theirs.numpy())


def test_save_vlm_loads_in_transformers_and_back(llava, tmp_path):
  model, _, cfg, params = llava
  out = tmp_path / "saved"
  hf.save_vlm(cfg, params, out)
  again, info = transformers.LlavaForConditionalGeneration.from_pretrained(
      out, local_files_only=True, output_loading_info=True)
  assert not any(info.values()), info      # no missing, unexpected or mismatched keys
  for key in ("bos_token_id", "eos_token_id", "pad_token_id"):   # not LlamaConfig's defaults
    assert getattr(again.config.text_config, key) == getattr(model.config.text_config, key)
  ids, mask = _prompt(cfg, seed=2)
  x, xt = ref.images(2, cfg.vision.image_size, seed=2)
  real = mask > 0
  assert ref.max_diff(_hf_logits(again.eval(), ids, mask, xt)[real],
                      _hf_logits(model, ids, mask, xt)[real]) <= 1e-5
  # The DriVLM parts ride along in drivlm.safetensors and come back exactly.
  cfg2, params2 = hf.load_vlm(out)
  assert cfg2 == cfg and set(params2) == {"vision", "projector", "language", "heads"}
  jax.tree.map(np.testing.assert_array_equal, params2, params)


def test_module_named_layout_loads_the_same(llava, tmp_path):
  """Checkpoints written from the module's state dict (`model.vision_tower...`, `lm_head`)."""
  model, path, cfg, params = llava
  (tmp_path / "config.json").write_text((pathlib.Path(path) / "config.json").read_text())
  state = {k: v.contiguous() for k, v in model.state_dict().items()}
  if cfg.language.tie_word_embeddings:
    state.pop("lm_head.weight")
  save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
  _, loaded = hf.load_vlm(str(tmp_path))
  jax.tree.map(np.testing.assert_array_equal, loaded,
               {k: params[k] for k in ("vision", "projector", "language")})


def test_a_row_without_its_placeholders_is_an_error_as_in_transformers(llava):
  """One placeholder short in row 1: transformers raises, and so do we (splicing would
  otherwise repeat a visual token, silently)."""
  model, _, cfg, params = llava
  ids, mask = _prompt(cfg)
  ids[1, np.flatnonzero(ids[1] == IMAGE_TOKEN)[0]] = 1
  x, xt = ref.images(2, cfg.vision.image_size)
  with pytest.raises(ValueError, match="Image features and image tokens do not match"):
    _hf_logits(model, ids, mask, xt)
  want = rf"row\(s\) \[1\] hold \[{cfg.num_visual_tokens - 1}\] image placeholders"
  with pytest.raises(ValueError, match=want):
    vlm.apply(cfg, params, x, ids, mask)
  with pytest.raises(ValueError, match=want):
    generation.generate(cfg, params, x, ids, max_new_tokens=2, attention_mask=mask)


def test_errors_name_the_tensor_or_field(llava, tmp_path):
  _, path, cfg, params = llava
  with pytest.raises(hf.CheckpointError, match="model_type 'llava' is not supported"):
    hf.load_language_model(path)
  bad = dict(params, projector=jax.tree.map(lambda v: v[..., :-1], params["projector"]))
  small = jax.tree.map(np.asarray, bad)
  out = tmp_path / "bad"
  hf.save_vlm(cfg, small, out)
  with pytest.raises(hf.CheckpointError,
                     match=r"tensor .multi_modal_projector\.linear_\d\.\w+. has shape"):
    hf.load_vlm(str(out))
  with pytest.raises(hf.CheckpointError, match="is not 'llava'"):
    hf.load_vlm(ref.save(ref.causal_lm(), tmp_path / "lm"))


def test_a_tied_config_with_another_stored_head_loads_untied_as_transformers(tmp_path):
  """An untied LLaVA whose config.json says tied: transformers keeps the stored lm_head (it
  differs from the embedding), and so does `load_vlm`."""
  path = ref.save(_llava("clip_llama"), tmp_path / "llava")
  config_file = pathlib.Path(path) / "config.json"
  config = json.loads(config_file.read_text())
  config["tie_word_embeddings"] = True
  config["text_config"]["tie_word_embeddings"] = True
  config_file.write_text(json.dumps(config))
  model = transformers.LlavaForConditionalGeneration.from_pretrained(path).eval()
  cfg, params = hf.load_vlm(path)
  assert not cfg.language.tie_word_embeddings
  _assert_logits_match(model, cfg, params)
  # A run started from it (init=) is configured untied too, and takes the stored head.
  config = demo.get_config(f"init={path}")
  config.data.tokenizer = str(tmp_path)   # not read here
  config = pretrained.configure(config)
  assert not config.model.language.tie_word_embeddings
  run_cfg = run_lib.model_config(config)
  started = pretrained.start(vlm.init(run_cfg, jax.random.key(0)), run_cfg, config)
  jax.tree.map(np.testing.assert_array_equal, started["language"], params["language"])


# save_pretrained's names -> the module names (`model.` ...) other tools write.
_MODULE_NAMES = (("language_model.model.", "model.language_model."),
                 ("language_model.lm_head.", "lm_head."), ("vision_tower.", "model.vision_tower."),
                 ("multi_modal_projector.", "model.multi_modal_projector."))


def _module_name(key):
  return next((new + key[len(old):] for old, new in _MODULE_NAMES if key.startswith(old)), key)


@pytest.mark.parametrize("name,layout", [("siglip_qwen2", "saved"), ("clip_llama", "saved"),
                                         ("siglip_qwen2", "module")])
def test_a_tied_llava_storing_only_the_head_loads_as_transformers(tmp_path, name, layout):
  """A tied checkpoint whose file holds the shared matrix only as lm_head (some converters
  write it so), in either layout: transformers ties it either way; we read the embedding from
  the head."""
  path = ref.save(_llava(name), tmp_path / "llava")
  config_file = pathlib.Path(path) / "config.json"
  config_file.write_text(json.dumps({**json.loads(config_file.read_text()),
                                     "tie_word_embeddings": True}))
  file = pathlib.Path(path) / "model.safetensors"
  tensors = load_file(str(file))
  if layout == "module":
    tensors = {_module_name(k): v for k, v in tensors.items()}
  embed = next(k for k in tensors if k.endswith("embed_tokens.weight"))
  head = "lm_head.weight" if embed.startswith("model.") else "language_model.lm_head.weight"
  save_file({**{k: v for k, v in tensors.items() if k not in (embed, head)},
             head: tensors[embed]},
            str(file), metadata={"format": "pt"})
  model = transformers.LlavaForConditionalGeneration.from_pretrained(path).eval()
  cfg, params = hf.load_vlm(path)
  assert cfg.language.tie_word_embeddings
  np.testing.assert_array_equal(params["language"]["embed_tokens"]["embedding"],
                                tensors[embed].numpy())
  _assert_logits_match(model, cfg, params)


def test_a_siglip_llava_stored_without_its_unused_head_loads_as_transformers(tmp_path, caplog):
  """The SigLIP config says vision_use_head but no head tensor is stored: transformers loads it
  (a random head, which LLaVA never reads); so do we, without a head, and say so."""
  path = ref.save(_llava("siglip_qwen2"), tmp_path / "llava")
  file = pathlib.Path(path) / "model.safetensors"
  tensors = load_file(str(file))
  assert any(".head." in k for k in tensors)
  save_file({k: v for k, v in tensors.items() if ".head." not in k}, str(file),
            metadata={"format": "pt"})
  model = transformers.LlavaForConditionalGeneration.from_pretrained(path).eval()
  with caplog.at_level("WARNING"):
    cfg, params = hf.load_vlm(path)
  assert not cfg.vision.use_head and "no head tensors" in caplog.text
  # A run started from it (init=) builds the same tower, and keeps its own input transform.
  config = demo.get_config(f"init={path},standardize=1")
  config.data.tokenizer = str(tmp_path)   # not read here
  config = pretrained.configure(config)
  assert not config.model.vision.use_head and config.model.vision.standardize
  run_cfg = run_lib.model_config(config)
  fresh = vlm.init(run_cfg, jax.random.key(0))
  started = pretrained.start(fresh, run_cfg, config)
  jax.tree.map(np.testing.assert_array_equal, started["vision"], params["vision"])
  _assert_logits_match(model, cfg, params)


def test_a_siglip_llava_storing_a_head_its_config_turns_off_loads_as_transformers(tmp_path,
                                                                                  caplog):
  """vision_use_head false, the head's tensors still in the file: transformers leaves them
  unused (a warning); so do we."""
  path = ref.save(_llava("siglip_qwen2"), tmp_path / "llava")
  config_file = pathlib.Path(path) / "config.json"
  config = json.loads(config_file.read_text())
  config["vision_config"]["vision_use_head"] = False
  config_file.write_text(json.dumps(config))
  assert any(".head." in k for k in load_file(str(pathlib.Path(path) / "model.safetensors")))
  model = transformers.LlavaForConditionalGeneration.from_pretrained(path).eval()
  with caplog.at_level("WARNING"):
    cfg, params = hf.load_vlm(path)
  assert not cfg.vision.use_head and "pooling head" in caplog.text
  _assert_logits_match(model, cfg, params)


def test_a_directory_with_old_weights_beside_new_ones_reads_the_new(tmp_path, caplog):
  """Saving over a sharded checkpoint removes its index and shards (else a reader that looks
  for the index first reads the old weights); where both forms are present anyway, the single
  file is read, as transformers reads it."""
  old = _llava("clip_llama")
  path = ref.save(old, tmp_path / "llava", max_shard_size="300KB")
  shards = sorted(p.name for p in pathlib.Path(path).glob("model-*.safetensors"))
  assert len(shards) > 1
  cfg, params = hf.load_vlm(path)
  new = jax.tree.map(lambda a: a + 0.5, params)
  with caplog.at_level("WARNING"):
    hf.save_vlm(cfg, new, path)
  assert "replaced the sharded checkpoint" in caplog.text
  assert not any(pathlib.Path(path).glob("model-*.safetensors"))
  assert not (pathlib.Path(path) / "model.safetensors.index.json").exists()
  jax.tree.map(np.testing.assert_array_equal, hf.load_vlm(path)[1], new)
  both = ref.save(old, tmp_path / "both", max_shard_size="300KB")
  (pathlib.Path(both) / "model.safetensors").write_bytes(
      (pathlib.Path(path) / "model.safetensors").read_bytes())
  caplog.clear()
  with caplog.at_level("WARNING"):
    _, read = hf.load_vlm(both)
  assert "both model.safetensors and model.safetensors.index.json" in caplog.text
  jax.tree.map(np.testing.assert_array_equal, read, new)
  # An index is not trusted with paths: only this directory's shard files go; a malformed
  # one goes alone.
  (tmp_path / "outside.safetensors").write_bytes(b"keep")
  for index in ('{"weight_map": {"a": "../outside.safetensors"}}', "not json"):
    odd = tmp_path / "odd"
    odd.mkdir(exist_ok=True)
    (odd / "model.safetensors.index.json").write_text(index)
    hf.save_vlm(cfg, new, odd)
    assert not (odd / "model.safetensors.index.json").exists()
    assert (tmp_path / "outside.safetensors").read_bytes() == b"keep"
  _assert_logits_match(transformers.LlavaForConditionalGeneration.from_pretrained(both).eval(),
                       cfg, new)


def test_feature_layers_that_do_not_fit_name_the_file(tmp_path):
  path = ref.save(_llava("clip_llama"), tmp_path / "llava")
  config_file = pathlib.Path(path) / "config.json"
  config = json.loads(config_file.read_text())
  config_file.write_text(json.dumps({**config, "vision_feature_layer": [0, 7]}))
  with pytest.raises(hf.CheckpointError,
                     match=r"config\.json: feature_layer 7 is outside a 3-layer tower"):
    hf.load_vlm(path)


def test_a_kept_feature_layer_runs_the_checkpoint_on_another_layer(tmp_path):
  """`config.pretrained_keep`: the config's vision_feature_layer instead of the checkpoint's,
  through the same weights: transformers' LLaVA set to that layer gives the same logits. A
  field no checkpoint sets is an error naming the key."""
  import ml_collections
  from configs import common
  model = _llava("clip_llama")   # the penultimate layer (-2)
  path = ref.save(model, tmp_path / "llava")
  config = ml_collections.ConfigDict({"model": common.model_config("clip_b16_qwen05b"),
                                      "init_from": path, "data": {"tokenizer": "unused"},
                                      "pretrained_keep": "vision_feature_layer"})
  config.model.vision_feature_layer = 1
  config = pretrained.configure(config)
  cfg = vlm.config_from_dict(config.model)
  # The architecture is the checkpoint's; `scan` is the preset's (a field no checkpoint sets).
  assert cfg.vision_feature_layer == 1 and cfg.vision == dataclasses.replace(
      hf.vlm_config(path).vision, scan=False)
  params = pretrained.start(vlm.init(cfg, jax.random.key(0)), cfg, config)
  model.config.vision_feature_layer = 1
  _assert_logits_match(model, cfg, params)
  config.pretrained_keep = "vision_feature_layer, hidden_size"
  with pytest.raises(ValueError, match=r"config.pretrained_keep: hidden_size not among"):
    pretrained.configure(config)


def test_a_run_takes_the_checkpoints_list_of_layers_over_its_presets_int(tmp_path):
  import ml_collections
  from configs import common
  from drivlm_jax import pretrained
  path = ref.save(_llava("clip_qwen2_layers"), tmp_path / "llava")
  config = ml_collections.ConfigDict({"model": common.model_config("clip_b16_qwen05b"),
                                      "init_from": path, "data": {"tokenizer": "unused"}})
  assert config.model.vision_feature_layer == -2
  cfg = vlm.config_from_dict(pretrained.configure(config).model)
  assert cfg.vision_feature_layer == (0, -1, 1) and cfg.vision == dataclasses.replace(
      hf.vlm_config(path).vision, scan=False)   # `scan` is the preset's
