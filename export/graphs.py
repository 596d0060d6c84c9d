"""The functions that become ONNX graphs: the deployable student (vision tower + instruction
reweighting/pruning + action and explanation heads) and the LM's prefill and decode step.

Each takes raw RGB frames, float32 [B, H, W, 3] (V cameras: [B, V, H, W, 3], V static) in
0..255 at the model's resolution, and normalises them itself, so the device only resizes and
casts its camera frames. Layers are
traced as a loop (`scan=False`): flax's scan cannot trace a symbolic batch, and TensorRT
optimises an unrolled graph best.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from drivlm_jax.data import preprocess
from drivlm_jax.model import language, vlm

INSTRUCTION = ("instruction_ids", "instruction_mask")
STUDENT_OUTPUTS = ("action_probs", "reason_probs", "token_scores")
# The KV cache (HF's naming): the decode step takes `past_*` and returns `present_*`.
CACHE = ("k", "v", "mask", "pos")
PREFILL_INPUTS = ("image", *INSTRUCTION, "input_ids", "attention_mask")
DECODE_INPUTS = ("token", *(f"past_{c}" for c in CACHE), "cache_index")
LM_OUTPUTS = ("logits", *(f"present_{c}" for c in CACHE))


def for_export(cfg: vlm.Config) -> vlm.Config:
  """The same model, fp32, with its layers traced as a loop (no remat: a forward only)."""
  cfg = vlm.with_dtype(cfg, "float32")
  return dataclasses.replace(
      cfg, vision=dataclasses.replace(cfg.vision, scan=False, remat=False),
      language=dataclasses.replace(cfg.language, scan=False, remat=False))


def constants(params):
  """Params as numpy arrays: indexing them (one layer of the stack) then happens while
  tracing, so every layer's weights become plain initializers of the graph (foldable by
  TensorRT, quantisable by onnxruntime) instead of runtime slices of one stacked tensor."""
  return jax.tree.map(np.asarray, params)


def normalize(cfg: vlm.Config, image):
  """0..255 RGB -> the tower's normalised input (what the data pipeline feeds in training)."""
  mean, std = (jnp.asarray(v, jnp.float32) for v in preprocess.statistics(cfg.vision))
  return (image / 255.0 - mean) / std


def image_shape(cfg: vlm.Config) -> tuple:
  """One example's frames: (S, S, 3), or (V, S, S, 3) for V cameras (static in the graph)."""
  size = cfg.vision.image_size
  return ((size, size, 3) if cfg.num_cameras == 1 else (cfg.num_cameras, size, size, 3))


def student_io(cfg: vlm.Config):
  """(input names, output names) of the student graph: without reweighting it takes the
  image only and has no token scores."""
  if cfg.reweight:
    return ("image", *INSTRUCTION), STUDENT_OUTPUTS
  return ("image",), STUDENT_OUTPUTS[:2]


def student(cfg: vlm.Config, params, keep_ratio: float):
  """(image, [instruction_ids, instruction_mask]) -> (action_probs [B, 4], reason_probs
  [B, 21], [token_scores [B, N]])."""
  def fn(image, *instruction):
    out = vlm.encode_image(cfg, params, normalize(cfg, image), *instruction,
                           keep_ratio=keep_ratio)
    probs = (jax.nn.sigmoid(out["action_logits"]), jax.nn.sigmoid(out["reason_logits"]))
    return (*probs, out["token_scores"]) if cfg.reweight else probs
  return fn


def _lm_out(out):
  cache = out["cache"]
  return (out["logits"][:, -1], cache["k"], cache["v"], cache["mask"], cache["pos"])


def prefill(cfg: vlm.Config, params, max_new_tokens: int):
  """(image, instruction_ids, instruction_mask, input_ids [B, T] left-padded prompt with the
  image placeholders, attention_mask [B, T]) -> (logits [B, V] of the next token, present_k,
  present_v [L, B, S = T + max_new_tokens, K, Dh], present_mask [B, S] bool, present_pos [B]
  int32).
  The visual tokens use every patch (as `vlm.generate` does). The next decode step writes
  at cache_index T."""
  def fn(image, instruction_ids, instruction_mask, input_ids, attention_mask):
    visual = vlm.encode_image(cfg, params, normalize(cfg, image), instruction_ids,
                              instruction_mask)["visual_tokens"]
    embeds = language.embed_tokens(cfg.language, params["language"], input_ids)
    embeds = vlm.splice(embeds, visual, input_ids == cfg.image_token_id)
    cache = language.init_cache(cfg.language, input_ids.shape[0],
                                input_ids.shape[1] + max_new_tokens, jnp.float32)
    return _lm_out(language.forward(cfg.language, params["language"], inputs_embeds=embeds,
                                    attention_mask=attention_mask, cache=cache))
  return fn


def decode(cfg: vlm.Config, params):
  """One step: (token [B] int32, past_k, past_v, past_mask, past_pos, cache_index [] int32 =
  the slot to write) -> (logits [B, V], present_k, present_v, present_mask, present_pos)."""
  def fn(token, k, v, mask, pos, index):
    cache = {"k": k, "v": v, "mask": mask, "pos": pos, "index": index}
    return _lm_out(language.forward(cfg.language, params["language"], token[:, None],
                                    cache=cache))
  return fn
