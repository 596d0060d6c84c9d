"""LLaMA/Qwen2 decoder LM: RMSNorm, RoPE, SwiGLU, grouped-query attention, KV cache.

Padding-aware: batches are left-padded and `attention_mask` ([B, T], 1 = token) gives both the
key mask and the positions (cumulative count of real tokens), so a padded row computes what
the same row computes unpadded. The KV cache is an explicit pytree (see `init_cache`).
"""
import dataclasses
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from drivlm_jax.model import layers


@dataclasses.dataclass(frozen=True)
class Config:
  family: str = "qwen2"             # "llama" | "qwen2" (for HF export)
  vocab_size: int = 151936
  hidden_size: int = 896
  intermediate_size: int = 4864
  num_layers: int = 24
  num_heads: int = 14
  num_kv_heads: int = 2
  head_dim: int | None = None       # default hidden_size // num_heads
  rms_norm_eps: float = 1e-6
  rope_theta: float = 1_000_000.0
  # HF's `rope_parameters` beyond rope_theta, as sorted (key, value) pairs (a dict is taken):
  # () for plain RoPE, else ("rope_type", "linear" | "llama3" | "yarn") and that type's keys
  # (`ROPE_KEYS`), read as transformers' modeling_rope_utils reads them.
  rope_scaling: tuple = ()
  max_position_embeddings: int = 32768
  qkv_bias: bool = True             # Qwen2: True; LLaMA: attention_bias
  o_bias: bool = False              # LLaMA attention_bias also biases o_proj
  mlp_bias: bool = False
  tie_word_embeddings: bool = True
  # The checkpoint's special token ids (its config.json), carried to what `hf.save_*` writes
  # so that transformers' generate stops where the source's does; our generation takes eos
  # from the tokenizer. eos may be several ids (a tuple).
  bos_token_id: int | None = None
  eos_token_id: int | tuple | None = None
  pad_token_id: int | None = None
  dtype: str = "float32"
  param_dtype: str = "float32"
  scan_unroll: int = 1
  remat: bool = False
  scan: bool = True               # False: a Python loop over the same params (`layers.LayerLoop`)

  def __post_init__(self):
    if self.family not in ("llama", "qwen2"):
      raise ValueError(f"language family must be 'llama' or 'qwen2', got {self.family!r}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_heads {self.num_heads} not a multiple of num_kv_heads "
                       f"{self.num_kv_heads}")
    scaling = dict(self.rope_scaling)
    check_rope_scaling(scaling)
    object.__setattr__(self, "rope_scaling", tuple(sorted(scaling.items())))
    if isinstance(self.eos_token_id, list):   # config.json / a ConfigDict: a list
      object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))

  @property
  def dim_per_head(self) -> int:
    return self.head_dim or self.hidden_size // self.num_heads


# rope_type -> (required, optional) keys of its rope_scaling, as transformers reads them.
ROPE_KEYS = {
    "linear": ({"factor"}, set()),
    "llama3": ({"factor", "low_freq_factor", "high_freq_factor",
                "original_max_position_embeddings"}, set()),
    "yarn": ({"factor", "original_max_position_embeddings"},
             {"attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim",
              "truncate"}),
}


def check_rope_scaling(scaling: dict):
  """A ValueError unless `scaling` is {} or names a `ROPE_KEYS` type with its keys."""
  if not scaling:
    return
  kind = scaling.get("rope_type")
  if kind not in ROPE_KEYS:
    raise ValueError(f"rope_scaling rope_type {kind!r} is not supported; known: "
                     f"{sorted(ROPE_KEYS)}")
  required, optional = ROPE_KEYS[kind]
  missing, unknown = required - set(scaling), set(scaling) - required - optional - {"rope_type"}
  if missing or unknown:
    raise ValueError(f"rope_scaling for rope_type {kind!r}: missing {sorted(missing)}, "
                     f"unknown {sorted(unknown)}")


def rope_frequencies(cfg: Config):
  """(inv_freq [head_dim // 2] float32, the factor on cos and sin) of `cfg`'s RoPE: plain,
  linear (Chen et al., 2023), Llama 3.1's wavelength-banded scaling or YaRN (Peng et al.,
  2023), each in float32 as transformers' `modeling_rope_utils` computes it. Built with numpy
  from the static config, so the table enters XLA as a constant: computed inside a jitted
  function, XLA's rewrites of its pow and divisions put up to half of the frequencies an ulp
  off, which shows in the logits at long positions (Qwen2 shapes at position 32000: 3e-4)."""
  f32 = np.float32
  dim = cfg.dim_per_head
  exponents = (np.arange(0, dim, 2, dtype=f32) / f32(dim)).astype(np.float64)
  powers = (np.float64(cfg.rope_theta) ** exponents).astype(f32)
  inv_freq = f32(1.0) / powers
  p = dict(cfg.rope_scaling)
  kind = p.get("rope_type", "default")
  if kind == "default":
    return inv_freq, 1.0
  if kind == "linear":
    return (inv_freq / f32(p["factor"])).astype(f32), 1.0
  if kind == "llama3":
    factor, old_len = f32(p["factor"]), f32(p["original_max_position_embeddings"])
    low, high = f32(p["low_freq_factor"]), f32(p["high_freq_factor"])
    wavelen = f32(2 * math.pi) / inv_freq
    scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (f32(1) - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return np.where(medium, smoothed, scaled).astype(f32), 1.0
  # YaRN: interpolate the low frequencies, keep the high ones, ramp between; scale cos/sin.
  old_len = p["original_max_position_embeddings"]
  factor = p["factor"] or cfg.max_position_embeddings / old_len

  def mscale(scale, m=1.0):
    return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

  attention_factor = p.get("attention_factor")
  if attention_factor is None:
    m, m_all = p.get("mscale"), p.get("mscale_all_dim")
    attention_factor = (mscale(factor, m) / mscale(factor, m_all) if m and m_all
                        else mscale(factor))

  def correction_dim(rotations):
    return dim * math.log(old_len / (rotations * 2 * math.pi)) / (2 * math.log(cfg.rope_theta))

  lo, hi = correction_dim(p.get("beta_fast") or 32), correction_dim(p.get("beta_slow") or 1)
  if p.get("truncate", True):
    lo, hi = math.floor(lo), math.ceil(hi)
  lo, hi = max(lo, 0), min(hi, dim - 1)
  hi = hi + 0.001 if lo == hi else hi
  keep = f32(1) - np.clip((np.arange(dim // 2, dtype=f32) - f32(lo)) / f32(hi - lo), 0, 1)
  interpolated = f32(1.0) / (f32(factor) * powers)
  return ((interpolated * (f32(1) - keep) + inv_freq * keep).astype(f32),
          float(attention_factor))


def rope_tables(positions, cfg: Config):
  """positions [B, T] int -> (cos, sin), each [B, T, 1, head_dim] float32 (HF rotate_half)."""
  inv_freq, scale = rope_frequencies(cfg)
  freqs = positions.astype(jnp.float32)[..., None] * inv_freq
  emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
  if scale == 1.0:
    return jnp.cos(emb), jnp.sin(emb)
  return jnp.cos(emb) * scale, jnp.sin(emb) * scale


def apply_rope(x, cos, sin):
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  return (x * cos + rotated * sin).astype(x.dtype)


class Attention(nn.Module):
  """Grouped-query self-attention with RoPE; writes k/v into `kv_cache` when given."""
  cfg: Any

  @nn.compact
  def __call__(self, x, rope, mask, kv_cache, cache_index):
    cfg = self.cfg
    dh = cfg.dim_per_head
    proj = lambda name, heads, axis: layers.dense(
        (heads, dh), ("embed",), (axis, "kv"), cfg=cfg, name=name, use_bias=cfg.qkv_bias)(x)
    q = apply_rope(proj("q_proj", cfg.num_heads, "heads"), *rope)
    k = apply_rope(proj("k_proj", cfg.num_kv_heads, "kv_heads"), *rope)
    v = proj("v_proj", cfg.num_kv_heads, "kv_heads")
    if kv_cache is not None:
      k, v = (jax.lax.dynamic_update_slice_in_dim(c, new.astype(c.dtype), cache_index, axis=1)
              for c, new in zip(kv_cache, (k, v)))
      kv_cache = (k, v)
    out = layers.attention(q, k.astype(q.dtype), v.astype(q.dtype), mask)
    out = layers.constrain(out, "batch", "length", "heads", "kv")
    out = layers.dense(cfg.hidden_size, ("heads", "kv"), ("embed",), cfg=cfg, name="o_proj",
                       axis=(-2, -1), use_bias=cfg.o_bias)(out)
    return out, kv_cache


class GatedMlp(nn.Module):
  """SwiGLU: down(silu(gate(x)) * up(x))."""
  cfg: Any

  @nn.compact
  def __call__(self, x):
    cfg = self.cfg
    proj = lambda name: layers.dense(cfg.intermediate_size, ("embed",), ("mlp",), cfg=cfg,
                                     name=name, use_bias=cfg.mlp_bias)(x)
    # Recomputed in the backward from gate and up, as `layers.Mlp` does its activation:
    # autodiff would also save silu's intermediates, [B, T, mlp] each (Qwen2-0.5B shapes, 6
    # layers, batch 4 x 256 tokens: 25% fewer temporaries in float32, 18% in bf16, where the
    # gradient is also 5% faster on CPU).
    glu = jax.checkpoint(lambda gate, up: jax.nn.silu(gate) * up, prevent_cse=False)
    h = layers.constrain(glu(proj("gate_proj"), proj("up_proj")), "batch", "length", "mlp")
    return layers.dense(cfg.hidden_size, ("mlp",), ("embed",), cfg=cfg, name="down_proj",
                        use_bias=cfg.mlp_bias)(h)


class DecoderLayer(nn.Module):
  """Pre-RMSNorm decoder block; scan-compatible: returns (x, updated kv_cache)."""
  cfg: Any

  @nn.compact
  def __call__(self, x, rope, mask, kv_cache, cache_index):
    cfg = self.cfg
    h = layers.rms_norm(cfg, "input_layernorm", cfg.rms_norm_eps)(x)
    h, kv_cache = Attention(cfg, name="self_attn")(h, rope, mask, kv_cache, cache_index)
    x = x + h
    h = layers.rms_norm(cfg, "post_attention_layernorm", cfg.rms_norm_eps)(x)
    x = x + GatedMlp(cfg, name="mlp")(h)
    return layers.constrain(x, "batch", "length", "embed"), kv_cache


class Decoder(nn.Module):
  cfg: Any

  @nn.compact
  def __call__(self, input_ids, inputs_embeds, positions, mask, kv_cache=None, cache_index=0):
    cfg = self.cfg
    embed = layers.embed(cfg.vocab_size, cfg.hidden_size, cfg=cfg, name="embed_tokens")
    x = (_pad_row_frozen(cfg, input_ids, embed(input_ids)) if inputs_embeds is None
         else inputs_embeds.astype(cfg.dtype))
    rope = rope_tables(positions, cfg)
    stack = layers.stack_layers(DecoderLayer, cfg, cfg.num_layers, "layers",
                                in_axes=(nn.broadcast, nn.broadcast, 0, nn.broadcast))
    x, kv_cache = stack(layers.constrain(x, "batch", "length", "embed"), rope, mask,
                        kv_cache, cache_index)
    x = layers.rms_norm(cfg, "norm", cfg.rms_norm_eps)(x)
    if cfg.tie_word_embeddings:   # float32 logits, accumulated in float32 (layers.einsum)
      logits = layers.einsum("btd,vd->btv", x, embed.embedding, jnp.float32)
    else:
      logits = layers.dense(cfg.vocab_size, ("embed",), ("vocab",), cfg=cfg, name="lm_head",
                            use_bias=False)(x)
    logits = layers.constrain(logits.astype(jnp.float32), "batch", "length", "vocab")
    return {"logits": logits, "hidden_states": x, "kv_cache": kv_cache}


def _dummy_inputs(batch=1, length=4):
  ids = jnp.zeros((batch, length), jnp.int32)
  pos = jnp.zeros((batch, length), jnp.int32)
  return ids, None, pos, None


def init(cfg: Config, key) -> dict:
  """Random params (plain nested dict)."""
  return layers.unbox(Decoder(layers.scanned(cfg)).init(key, *_dummy_inputs()))


def logical_axes(cfg: Config):
  """Logical PartitionSpec per parameter (same tree as `init`)."""
  return layers.logical_axes(Decoder(layers.scanned(cfg)).init, jax.random.key(0), *_dummy_inputs())


def _pad_row_frozen(cfg: Config, input_ids, x):
  """The pad id's embedding row gets no gradient from its lookups, as in transformers (its
  nn.Embedding's padding_idx is the config's pad_token_id); a tied head still trains it."""
  if cfg.pad_token_id is None:
    return x
  pad = cfg.pad_token_id % cfg.vocab_size   # torch reads a negative padding_idx from the end
  return jnp.where((input_ids == pad)[..., None], jax.lax.stop_gradient(x), x)


def embed_tokens(cfg: Config, params, input_ids):
  """input_ids [B, T] -> [B, T, D] input embeddings (for splicing in other modalities)."""
  x = jnp.take(params["embed_tokens"]["embedding"], input_ids, axis=0).astype(cfg.dtype)
  return _pad_row_frozen(cfg, input_ids, x)


def positions_from_mask(attention_mask, offset=0):
  """[B, T] 0/1 mask -> [B, T] positions: running count of real tokens (HF generate rule)."""
  pos = jnp.cumsum(attention_mask, axis=-1) - 1 + jnp.asarray(offset)[..., None]
  return jnp.where(attention_mask > 0, pos, 1).astype(jnp.int32)


def forward(cfg: Config, params, input_ids=None, *, inputs_embeds=None, attention_mask=None,
            cache=None) -> dict:
  """The full decoder. Give `input_ids` [B, T] int32 or `inputs_embeds` [B, T, D].

  attention_mask: [B, T] (1 = real token, 0 = left padding) or None (all real).
  cache: from `init_cache`, or None for a cache-free forward. The new tokens are appended
  after the cache's current end and attend to everything before them.
  Returns {"logits": [B, T, V] float32, "hidden_states": [B, T, D] (after the final norm),
  "cache": updated cache or None}.
  """
  x = input_ids if inputs_embeds is None else inputs_embeds
  b, t = x.shape[:2]
  am = jnp.ones((b, t), jnp.int32) if attention_mask is None else attention_mask.astype(jnp.int32)
  model = Decoder(cfg)
  if cache is None:
    causal = jnp.tril(jnp.ones((t, t), bool))
    mask = causal[None] & (am[:, None, :] > 0)
    out = model.apply({"params": params}, input_ids, inputs_embeds, positions_from_mask(am), mask)
    return {"logits": out["logits"], "hidden_states": out["hidden_states"], "cache": None}

  index = cache["index"]
  slots = cache["k"].shape[2]
  valid = jax.lax.dynamic_update_slice_in_dim(cache["mask"], am > 0, index, axis=1)
  query_slot = index + jnp.arange(t)
  mask = (jnp.arange(slots)[None, :] <= query_slot[:, None])[None] & valid[:, None, :]
  out = model.apply({"params": params}, input_ids, inputs_embeds,
                    positions_from_mask(am, cache["pos"]), mask, (cache["k"], cache["v"]), index)
  k, v = out["kv_cache"]
  cache = {"k": k, "v": v, "mask": valid, "index": index + t, "pos": cache["pos"] + am.sum(-1)}
  return {"logits": out["logits"], "hidden_states": out["hidden_states"], "cache": cache}


def apply(cfg: Config, params, input_ids, attention_mask=None):
  """input_ids [B, T] int32 -> logits [B, T, V] float32."""
  return forward(cfg, params, input_ids, attention_mask=attention_mask)["logits"]


def init_cache(cfg: Config, batch: int, max_len: int, dtype=None) -> dict:
  """An empty KV cache for `max_len` tokens.

  {"k", "v": [L, B, max_len, K, Dh]; "mask": [B, max_len] bool (slot holds a real token);
   "index": int32 next slot; "pos": [B] int32 next position id}.
  """
  shape = (cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.dim_per_head)
  dtype = dtype or cfg.dtype
  return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype),
          "mask": jnp.zeros((batch, max_len), bool), "index": jnp.zeros((), jnp.int32),
          "pos": jnp.zeros((batch,), jnp.int32)}


def sample_token(logits, rng, temperature=0.0, top_p=1.0):
  """logits [B, V] -> [B] int32: greedy when temperature == 0, else nucleus sampling."""
  if temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / temperature
  if top_p < 1.0:
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    # Keep the smallest prefix whose mass reaches top_p (always at least one token).
    keep = (jnp.cumsum(probs, axis=-1) - probs) < top_p
    threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < threshold, -jnp.inf, logits)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "temperature", "top_p",
                                             "eos_token_id", "pad_token_id"))
def generate(cfg: Config, params, input_ids, max_new_tokens: int = 8, *, attention_mask=None,
             inputs_embeds=None, rng=None, temperature: float = 0.0, top_p: float = 1.0,
             eos_token_id: int | None = None, pad_token_id: int | None = None):
  """Greedy (default) or temperature/top-p decoding with a KV cache.

  input_ids: [B, T] int32, left-padded if `attention_mask` is given. `inputs_embeds`
  ([B, T, D]) replaces the prompt's embeddings (e.g. with visual tokens spliced in).
  After a row emits `eos_token_id` (an id, or a tuple of ids: any of them) it emits
  `pad_token_id` (default: the first eos), as HF does.
  Returns [B, T + max_new_tokens] int32: the prompt followed by the new tokens.
  """
  b, t = input_ids.shape
  rng = jax.random.key(0) if rng is None else rng
  stops = (eos_token_id,) if isinstance(eos_token_id, int) else tuple(eos_token_id or ())
  pad = (stops[0] if stops else None) if pad_token_id is None else pad_token_id
  cache = init_cache(cfg, b, t + max_new_tokens)
  out = forward(cfg, params, None if inputs_embeds is not None else input_ids,
                inputs_embeds=inputs_embeds, attention_mask=attention_mask, cache=cache)

  def finish(token, done):
    if not stops:
      return token, done
    token = jnp.where(done, pad, token)
    return token, done | jnp.isin(token, jnp.asarray(stops, token.dtype))

  rng, key = jax.random.split(rng)
  first, done = finish(sample_token(out["logits"][:, -1], key, temperature, top_p),
                       jnp.zeros((b,), bool))

  def step(carry, key):
    token, cache, done = carry
    logits = forward(cfg, params, token[:, None], cache=cache)
    token, done = finish(sample_token(logits["logits"][:, -1], key, temperature, top_p), done)
    return (token, logits["cache"], done), token

  keys = jax.random.split(rng, max_new_tokens - 1)
  _, rest = jax.lax.scan(step, (first, out["cache"], done), keys)
  return jnp.concatenate([input_ids.astype(jnp.int32), first[:, None], rest.T], axis=1)
