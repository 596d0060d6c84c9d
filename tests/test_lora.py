"""LoRA (lora.py) on a tiny HF LLaVA: step 0 is the base model, the merge is the paper's
W + (alpha / r) A B (checked against transformers running the adapters unmerged, as forward
hooks), base kernels stay bit-identical in training, frozen params get no AdamW moments."""
import jax
import ml_collections
import numpy as np
import pytest
import torch
import transformers
from flax import traverse_util

from configs import common
from drivlm_jax import hf, lora, optim, train
from drivlm_jax.model import vlm
from tests import reference as ref

IMAGE_TOKEN = 4
LORA = ml_collections.ConfigDict(dict(rank=4, alpha=8.0, targets=common.LM_LORA_TARGETS))


def llava_dir(path, vocab=272, seed=0):
  """A random tiny LLaVA (CLIP 32 px / patch 8 + Qwen2), every 0-/1-D param perturbed."""
  vis = ref.clip_vision(layers=2, seed=seed)
  lm = ref.causal_lm("qwen2", vocab=vocab, kv_heads=2, tie=True, seed=seed)
  config = transformers.LlavaConfig(
      vision_config=vis.config.to_dict(), text_config=lm.config.to_dict(),
      image_token_index=IMAGE_TOKEN, vision_feature_layer=-2,
      vision_feature_select_strategy="default", tie_word_embeddings=True)
  torch.manual_seed(seed)
  model = ref.perturb(transformers.LlavaForConditionalGeneration(config), seed=seed + 1)
  return ref.save(model, path), model


@pytest.fixture(scope="module")
def base(tmp_path_factory):
  path, model = llava_dir(tmp_path_factory.mktemp("llava"))
  cfg, params = hf.load_vlm(path)
  return model, cfg, {**vlm.init(cfg, jax.random.key(0)), **params}


def _prompt(cfg):
  n = cfg.num_visual_tokens
  ids = np.random.default_rng(0).integers(10, 200, (2, n + 6)).astype(np.int32)
  ids[:, 2:2 + n] = IMAGE_TOKEN
  return ids


def _torch_logits(model, ids, xt):
  with torch.inference_mode():
    return model(input_ids=torch.from_numpy(ids).long(), pixel_values=xt).logits.numpy()


def test_step0_is_the_base_model_and_the_merge_is_the_papers(base, tmp_path):
  model, cfg, params = base
  ids, (x, xt) = _prompt(cfg), ref.images(2, cfg.vision.image_size)
  logits = lambda p: np.asarray(vlm.apply(cfg, p, x, ids)["lm_logits"])
  adapted = {**params, "lora": lora.init(LORA, params, jax.random.key(1))}
  np.testing.assert_array_equal(logits(lora.merge(adapted, LORA)), logits(params))

  # A "trained" adapter: B random too. Reference: transformers with each adapted Linear
  # running x W^T + (alpha / r) (x A) B as a forward hook, weights unmerged.
  rng = np.random.default_rng(2)
  adapted["lora"] = jax.tree.map(lambda v: rng.normal(0, 0.05, v.shape).astype(np.float32),
                                 adapted["lora"])
  merged = lora.merge(adapted, LORA)
  hooks, scale = [], LORA.alpha / LORA.rank
  for path, a in traverse_util.flatten_dict(adapted["lora"]).items():
    if path[-1] != "a":
      continue
    b = traverse_util.flatten_dict(adapted["lora"])[path[:-1] + ("b",)]
    module = path[-2]
    for i in range(a.shape[0]):
      layer = model.model.language_model.layers[i]
      linear = getattr(layer.self_attn if path[-3] == "self_attn" else layer.mlp, module)
      a_i = torch.from_numpy(np.asarray(a[i]).reshape(-1, LORA.rank))
      b_i = torch.from_numpy(np.asarray(b[i]).reshape(LORA.rank, -1))
      hooks.append(linear.register_forward_hook(
          lambda mod, inp, out, a_i=a_i, b_i=b_i: out + scale * (inp[0] @ a_i) @ b_i))
  unmerged = _torch_logits(model, ids, xt)
  for h in hooks:
    h.remove()
  assert ref.max_diff(logits(merged), unmerged) <= 1e-4
  # Merged and saved as LLaVA, transformers gives the unmerged model's logits.
  hf.save_vlm(cfg, merged, tmp_path / "merged")
  again = transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path / "merged")
  assert ref.max_diff(_torch_logits(again.eval(), ids, xt), unmerged) <= 1e-5


def test_lora_params_shard_like_their_kernels_and_frozen_params_get_no_moments(base):
  _, cfg, params = base
  axes = vlm.logical_axes(cfg)
  lora_axes = lora.logical_axes(LORA, params, axes)
  q = axes["language"]["layers"]["self_attn"]["q_proj"]["kernel"]      # layers, embed, heads, kv
  assert tuple(lora_axes["language"]["layers"]["self_attn"]["q_proj"]["a"]) == (*q[:2], None)
  assert tuple(lora_axes["language"]["layers"]["self_attn"]["q_proj"]["b"]) == (q[0], None,
                                                                              *q[2:])
  config = ml_collections.ConfigDict(dict(lora=LORA, optimizer=dict(
      learning_rate=1e-3, warmup_steps=1, weight_decay=0.1, grad_clip_norm=1.0,
      parts=[{"pattern": "^vision/", "freeze": True}])))
  full = {**params, "lora": lora.init(LORA, params, jax.random.key(1))}
  opt = train.optimizer_config(config, full)
  state = optim.make(opt, full, 10).init(full)
  keystr = jax.tree_util.keystr
  leaves = [keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(state)[0]]
  names = {keystr(p): p for p, _ in jax.tree_util.tree_flatten_with_path(full)[0]}
  with_moments = {k for k in names if any(leaf.endswith(k) for leaf in leaves)}
  targets = {"".join(f"['{k}']" for k in p) for p in lora.targets(LORA, params)}
  frozen = {k for k in names if names[k][0].key == "vision" or k in targets}
  assert with_moments == set(names) - frozen


def test_only_the_adapted_kernels_freeze(base):
  """An unanchored target pattern that also matches a part of the training state that is
  not the model's (a CLIP text tower's q_proj) adapts the model's kernels only, and only
  those freeze: the text tower keeps training."""
  _, cfg, params = base
  config = ml_collections.ConfigDict(dict(
      lora=dict(rank=4, alpha=8.0, targets="self_attn/q_proj/kernel$"),
      optimizer=dict(learning_rate=1e-3, warmup_steps=1, weight_decay=0.0,
                     grad_clip_norm=1.0, parts=[])))
  state = {**params, "lora": lora.init(config.lora, params, jax.random.key(1)),
           "text": {"layers": {"self_attn": {"q_proj": {"kernel": np.ones((2, 8, 8))}}}}}
  labels = traverse_util.flatten_dict(optim.part_labels(
      state, list(train.optimizer_config(config, state).parts)))
  frozen = {"/".join(p) for p, label in labels.items() if label == "frozen"}
  assert frozen == {"/".join(p) for p in lora.targets(config.lora, params)}
  assert "text/layers/self_attn/q_proj/kernel" not in frozen


def test_the_patch_embedding_adapter_is_low_rank(base):
  """The patch embedding's conv kernel [p, p, C, D] is a (p * p * C) -> D map: its adapter is
  A [p, p, C, r], B [r, D] and the merged update has rank <= r."""
  _, _, params = base
  config = ml_collections.ConfigDict(dict(rank=2, alpha=4.0,
                                          targets="patch_embedding/kernel$"))
  adapters = lora.init(config, params, jax.random.key(1))
  kernel = params["vision"]["embeddings"]["patch_embedding"]["kernel"]
  adapter = adapters["vision"]["embeddings"]["patch_embedding"]
  a = adapter["a"]
  p, _, c, d = kernel.shape
  assert a.shape == (p, p, c, 2) and adapter["b"].shape == (2, d)
  adapter["b"] = np.ones((2, d), np.float32)
  merged = lora.merge({**params, "lora": adapters}, config)["vision"]["embeddings"][
      "patch_embedding"]
  delta = np.asarray(merged["kernel"] - kernel).reshape(p * p * c, d)
  assert np.linalg.matrix_rank(delta, tol=1e-5) <= 2
  np.testing.assert_allclose(delta, 2.0 * np.asarray(a).reshape(-1, 2) @ np.ones((2, d)),
                             rtol=1e-5, atol=1e-6)
