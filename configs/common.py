"""Shared config pieces: model size presets and big_vision-style `arg` parsing.

A preset is a ConfigDict with `vision`, `language` (fields of `vision.Config` /
`language.Config`) and VLM-level fields; `drivlm_jax.model.vlm.config_from_dict` builds
the frozen `vlm.Config` from it, so any field can be overridden on the command line
(`--config.model.language.num_layers=4`).
"""
import ml_collections

_CLIP_B16 = dict(family="clip", image_size=224, patch_size=16, hidden_size=768,
                 intermediate_size=3072, num_layers=12, num_heads=12, layer_norm_eps=1e-5,
                 hidden_act="quick_gelu")
_CLIP_L14_336 = dict(family="clip", image_size=336, patch_size=14, hidden_size=1024,
                     intermediate_size=4096, num_layers=24, num_heads=16, layer_norm_eps=1e-5,
                     hidden_act="quick_gelu")
_SIGLIP_B16 = dict(family="siglip", image_size=224, patch_size=16, hidden_size=768,
                   intermediate_size=3072, num_layers=12, num_heads=12, layer_norm_eps=1e-6,
                   hidden_act="gelu_pytorch_tanh")
_QWEN2_05B = dict(family="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864,
                  num_layers=24, num_heads=14, num_kv_heads=2, rms_norm_eps=1e-6,
                  rope_theta=1_000_000.0, qkv_bias=True, tie_word_embeddings=True)
_QWEN2_15B = dict(family="qwen2", vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                  num_layers=28, num_heads=12, num_kv_heads=2, rms_norm_eps=1e-6,
                  rope_theta=1_000_000.0, qkv_bias=True, tie_word_embeddings=True)
_QWEN2_IMAGE_PAD = 151655  # "<|image_pad|>" in the Qwen2 vocabulary

MODEL_PRESETS = {
    # CPU-sized: trains in minutes on 2 cores.
    "tiny": dict(
        vision=dict(family="clip", image_size=64, patch_size=8, hidden_size=64,
                    intermediate_size=128, num_layers=2, num_heads=4, hidden_act="quick_gelu"),
        language=dict(family="qwen2", vocab_size=512, hidden_size=64, intermediate_size=128,
                      num_layers=2, num_heads=4, num_kv_heads=2, rope_theta=10_000.0,
                      max_position_embeddings=512),
        image_token_id=3, head_hidden=64),
    # CPU-sized teacher: twice the tiny student's width and depth, same grid and tokenizer.
    "tiny_teacher": dict(
        vision=dict(family="clip", image_size=64, patch_size=8, hidden_size=128,
                    intermediate_size=256, num_layers=4, num_heads=4, hidden_act="quick_gelu"),
        language=dict(family="qwen2", vocab_size=512, hidden_size=128, intermediate_size=256,
                      num_layers=2, num_heads=4, num_kv_heads=2, rope_theta=10_000.0,
                      max_position_embeddings=512),
        image_token_id=3, head_hidden=128),
    # Student: CLIP ViT-B/16 + Qwen2-0.5B shapes (LLaVA-style, penultimate vision layer).
    "clip_b16_qwen05b": dict(vision=_CLIP_B16, language=_QWEN2_05B,
                             image_token_id=_QWEN2_IMAGE_PAD, vision_feature_layer=-2),
    "siglip_b16_qwen05b": dict(vision=_SIGLIP_B16, language=_QWEN2_05B,
                               image_token_id=_QWEN2_IMAGE_PAD, vision_feature_layer=-1),
    # Teacher: CLIP ViT-L/14-336 + Qwen2-1.5B shapes.
    "clip_l14_qwen15b": dict(vision=_CLIP_L14_336, language=_QWEN2_15B,
                             image_token_id=_QWEN2_IMAGE_PAD, vision_feature_layer=-2),
}


def model_config(preset: str) -> ml_collections.ConfigDict:
  if preset not in MODEL_PRESETS:
    raise KeyError(f"unknown model preset {preset!r}; known: {sorted(MODEL_PRESETS)}")
  return ml_collections.ConfigDict(MODEL_PRESETS[preset])


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """`"a=1,b=x,runlocal"` -> ConfigDict over `defaults`, with values typed like the defaults
  (a bare name means True). Unknown names are an error, not a silent no-op."""
  result = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or "").split(",")):
    name, _, value = item.partition("=")
    if name not in defaults:
      raise KeyError(f"unknown config arg {name!r}; known: {sorted(defaults)}")
    default = defaults[name]
    if isinstance(default, bool):
      parsed = value.lower() in ("", "1", "true", "yes")
    elif default is None:
      parsed = value
    else:
      parsed = type(default)(value)
    result[name] = parsed
  return result
