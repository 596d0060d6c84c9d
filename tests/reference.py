"""Tiny random HF models (transformers + torch), the independent reference for parity tests.

HF's random init sets biases to 0 and norm weights to 1, so a loader that dropped them would
still match; `perturb` randomises every 0-/1-D parameter first.
"""
import numpy as np
import torch
import transformers


def perturb(model, seed=0, scale=0.2):
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for _, p in model.named_parameters():
      if p.ndim <= 1:
        p.add_(torch.randn(p.shape, generator=g) * scale)
  return model.eval()


def save(model, path, **kwargs):
  model.save_pretrained(str(path), **kwargs)
  return str(path)


def clip_vision(image_size=32, patch_size=8, hidden=48, heads=4, layers=2, act="quick_gelu",
                seed=0):
  torch.manual_seed(seed)
  cfg = transformers.CLIPVisionConfig(
      image_size=image_size, patch_size=patch_size, hidden_size=hidden,
      intermediate_size=2 * hidden + 8, num_attention_heads=heads, num_hidden_layers=layers,
      layer_norm_eps=3e-5, hidden_act=act)
  return perturb(transformers.CLIPVisionModel(cfg), seed)


def siglip_vision(image_size=32, patch_size=8, hidden=48, heads=4, layers=2, use_head=True,
                  seed=0):
  torch.manual_seed(seed)
  cfg = transformers.SiglipVisionConfig(
      image_size=image_size, patch_size=patch_size, hidden_size=hidden,
      intermediate_size=2 * hidden + 8, num_attention_heads=heads, num_hidden_layers=layers,
      layer_norm_eps=2e-6, vision_use_head=use_head)
  return perturb(transformers.SiglipVisionModel(cfg), seed)


def clip_model(vocab=99, hidden=32, heads=4, layers=2, vision_hidden=48, projection=24,
               eos_token_id=98, seed=0):
  torch.manual_seed(seed)
  text = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=3 * hidden,
              num_attention_heads=heads, num_hidden_layers=layers, max_position_embeddings=16,
              layer_norm_eps=4e-5, eos_token_id=eos_token_id, bos_token_id=1,
              pad_token_id=0)
  vision = dict(image_size=32, patch_size=8, hidden_size=vision_hidden,
                intermediate_size=2 * vision_hidden, num_attention_heads=4, num_hidden_layers=2,
                layer_norm_eps=3e-5)
  cfg = transformers.CLIPConfig(text_config=text, vision_config=vision,
                                projection_dim=projection)
  return perturb(transformers.CLIPModel(cfg), seed)


def siglip_model(seed=0):
  torch.manual_seed(seed)
  cfg = transformers.SiglipConfig(
      text_config=dict(vocab_size=64, hidden_size=32, intermediate_size=64,
                       num_attention_heads=4, num_hidden_layers=1, max_position_embeddings=16),
      vision_config=dict(image_size=32, patch_size=8, hidden_size=48, intermediate_size=80,
                         num_attention_heads=4, num_hidden_layers=2, layer_norm_eps=2e-6))
  return perturb(transformers.SiglipModel(cfg), seed)


def causal_lm(family="qwen2", vocab=128, hidden=64, heads=4, kv_heads=2, layers=2,
              tie=True, bias=False, head_dim=None, rope=None, pad=None, seed=0):
  """A tiny random HF Qwen2 or LLaMA; `rope`: rope_parameters other than the default's;
  `pad`: a pad_token_id (its embedding row then gets no gradient in transformers)."""
  torch.manual_seed(seed)
  common = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden + 16,
                num_attention_heads=heads, num_key_value_heads=kv_heads,
                num_hidden_layers=layers, rms_norm_eps=3e-5, initializer_range=0.1,
                rope_parameters=rope or {"rope_type": "default", "rope_theta": 5000.0},
                tie_word_embeddings=tie, max_position_embeddings=256,
                bos_token_id=None, eos_token_id=None, pad_token_id=pad)
  if head_dim is not None:
    common["head_dim"] = head_dim
  if family == "qwen2":
    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common))
  else:
    cfg = transformers.LlamaConfig(attention_bias=bias, mlp_bias=bias, **common)
    model = transformers.LlamaForCausalLM(cfg)
  return perturb(model, seed)


def llava_prompt(cfg, image_token, seed=0):
  """Left-padded prompts [pad..., text, the image's tokens, text] for a vlm.Config ->
  (input_ids [2, T] int32, attention_mask [2, T])."""
  rng = np.random.default_rng(seed)
  n = cfg.num_visual_tokens
  ids = rng.integers(10, cfg.language.vocab_size, (2, n + 9)).astype(np.int32)
  ids[:, 3:3 + n] = image_token
  mask = np.ones_like(ids)
  mask[1, :2] = 0
  ids[mask == 0] = 0
  return ids, mask


def images(batch, size, seed=0):
  """Random normalised NHWC images and the NCHW torch tensor of the same values."""
  x = np.random.default_rng(seed).normal(size=(batch, size, size, 3)).astype(np.float32)
  return x, torch.from_numpy(x.transpose(0, 3, 1, 2).copy())


def max_diff(ours, theirs):
  theirs = theirs.detach().numpy() if isinstance(theirs, torch.Tensor) else theirs
  return float(np.max(np.abs(np.asarray(ours) - theirs)))
