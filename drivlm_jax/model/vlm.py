"""The VLM: vision tower -> MLP projector -> visual tokens spliced into the LM's input
embeddings at the image placeholder token, plus the driving heads.

The action head (4 logits) and explanation head (21 logits) read an attention-pooled summary
of the visual tokens, so the deployable student (vision + heads) runs without the LM. `apply`
returns every intermediate feature the adaptation losses need.

Several cameras (`num_cameras` = V > 1, images [B, V, H, W, 3]): the one tower encodes each
view, a learned camera embedding (zero at init) is added to each view's tokens where the
views meet (at the reweighting point, else at the tower's output), and the V token groups
follow each other in camera order: the visual tokens are [B, V * N, D], the heads pool over
all of them, and the instruction scores and prunes the tokens of all views together (k kept
overall, as many from one camera as the instruction wants). Tower layers after a scoring
point inside the tower run on all views' kept tokens jointly (static shapes; CLIP's V class
tokens are always kept). V = 1 has no camera embedding: the model of a single camera.
"""
import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from drivlm_jax.model import language, layers, reweighting, vision

NUM_ACTIONS = 4    # forward, stop_or_slow, turn_left, turn_right
NUM_REASONS = 21   # BDD-OIA explanations


@dataclasses.dataclass(frozen=True)
class Config:
  vision: vision.Config
  language: language.Config
  image_token_id: int
  # HF hidden_states index; LLaVA uses -2. Several (a tuple): their features concatenated
  # along the width, in that order (HF LLaVA with a list), the projector taking them all.
  vision_feature_layer: int | tuple[int, ...] = -1
  # Which tokens of that layer are projected, as HF LLaVA: "default" drops the first token
  # (CLIP's class token; for SigLIP, the first patch), "full" keeps every token.
  vision_feature_select_strategy: str = "default"
  projector_act: str = "gelu"
  projector_bias: bool = True        # HF `multimodal_projector_bias`
  head_hidden: int = 256
  num_actions: int = NUM_ACTIONS
  num_reasons: int = NUM_REASONS
  reweight: bool = False             # instruction-guided token gates before the projector
  reweight_dim: int = 128
  # Where the instruction scores (and prunes) the patch tokens: after this many vision layers
  # (0 = right after the patch embedding; the later layers then run on the kept tokens only),
  # or None = at the feature layer, just before the projector.
  reweight_layer: int | None = None
  num_cameras: int = 1               # V views per example, images [B, V, H, W, 3] when > 1

  def __post_init__(self):
    if not isinstance(self.vision_feature_layer, int):   # a list (config.json): hashable
      object.__setattr__(self, "vision_feature_layer", tuple(self.vision_feature_layer))
      if not self.vision_feature_layer:
        raise ValueError("vision_feature_layer: an empty list names no layer")
    deepest = max(self.feature_positions)          # each within the tower, or an error
    if self.reweight_layer is not None and not 0 <= self.reweight_layer <= deepest:
      raise ValueError(f"reweight_layer {self.reweight_layer} is outside the {deepest} vision "
                       f"layers up to the feature layer")
    if self.num_cameras < 1:
      raise ValueError(f"num_cameras must be >= 1, got {self.num_cameras}")
    if (self.num_cameras > 1 and self.vision.family == "siglip"
        and self.vision_feature_select_strategy == "default"):
      raise ValueError("vision_feature_select_strategy 'default' drops a SigLIP view's first "
                       "patch (HF LLaVA), which has no place among several cameras' pruned "
                       "tokens; with num_cameras > 1 set it to 'full'")
    if self.vision_feature_select_strategy not in ("default", "full"):
      raise ValueError(f"vision_feature_select_strategy must be 'default' or 'full', got "
                       f"{self.vision_feature_select_strategy!r}")
    if not 0 <= self.image_token_id < self.language.vocab_size:
      raise ValueError(f"image_token_id {self.image_token_id} outside the LM vocabulary "
                       f"({self.language.vocab_size})")

  @property
  def feature_positions(self) -> tuple[int, ...]:
    """How many vision layers each feature layer has run, in the config's order."""
    layers_ = self.vision_feature_layer
    return tuple(vision.layer_position(self.vision, l)
                 for l in ((layers_,) if isinstance(layers_, int) else layers_))

  @property
  def num_visual_tokens(self) -> int:
    """All views' tokens: the LM's image placeholders per example."""
    tokens = self.vision.num_patches + (self.vision.family == "clip")
    return self.num_cameras * (tokens - (self.vision_feature_select_strategy == "default"))


def with_dtype(cfg: Config, dtype: str) -> Config:
  """`cfg` computing in `dtype` ("float32", "bfloat16"); the params keep theirs."""
  return dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, dtype=dtype),
                             language=dataclasses.replace(cfg.language, dtype=dtype))


def patch_layout(cfg: Config) -> tuple[int, np.ndarray | None]:
  """Where the (unpruned) visual tokens lie on the views' patch grids, [V * N] cells view
  after view: (the class tokens in front, each later token's cell; None when every cell is
  there, in order). CLIP's "full" keeps each view's class token in front; SigLIP's "default"
  drops each view's first patch (as HF LLaVA does)."""
  n = cfg.vision.num_patches
  default = cfg.vision_feature_select_strategy == "default"
  if cfg.vision.family == "clip":
    return (0 if default else cfg.num_cameras), None
  if default:
    return 0, np.array([i for i in range(cfg.num_cameras * n) if i % n])
  return 0, None


def on_grid(cfg: Config, tokens):
  """Visual tokens [B, T, D] -> ([B, V * N, D] on the views' patch grids, each view's cells
  row-major, [V * N] float 0/1 of the cells that hold a token (None: all do)); class tokens
  are left out, a cell without a token is zeros."""
  lead, cells = patch_layout(cfg)
  tokens = tokens[:, lead:]
  if cells is None:
    return tokens, None
  size = cfg.num_cameras * cfg.vision.num_patches
  grid = jnp.zeros((tokens.shape[0], size, tokens.shape[-1]), tokens.dtype)
  valid = np.zeros(size, np.float32)
  valid[cells] = 1.0
  return grid.at[:, cells].set(tokens), valid


class Projector(nn.Module):
  """LLaVA projector: linear_1 -> act -> linear_2 ([B, N, Dv] -> [B, N, D])."""
  cfg: Any

  @nn.compact
  def __call__(self, x):
    lm = self.cfg.language
    bias = self.cfg.projector_bias
    h = layers.dense(lm.hidden_size, ("embed_vision",), ("mlp",), cfg=lm, name="linear_1",
                     use_bias=bias)(x)
    h = layers.activation(self.cfg.projector_act)(h)
    h = layers.dense(lm.hidden_size, ("mlp",), ("embed",), cfg=lm, name="linear_2",
                     use_bias=bias)(h)
    return layers.constrain(h, "batch", "length", "embed")


class AttentionPool(nn.Module):
  """A learned probe attends over the visual tokens: [B, N, D] -> [B, D].

  Unlike a mean, it keeps where things are (left lane vs right lane), which the actions need.
  """
  cfg: Any

  @nn.compact
  def __call__(self, tokens):
    lm = self.cfg.language
    heads, d = lm.num_heads, lm.hidden_size
    probe = layers.param(self, "probe", (1, 1, d), (None, None, "embed"),
                         init=nn.initializers.normal(1.0), dtype=lm.param_dtype)
    proj = lambda name, x: layers.dense((heads, d // heads), ("embed",), ("heads", "kv"), cfg=lm,
                                        name=name)(x)
    q = proj("q_proj", jnp.broadcast_to(probe.astype(tokens.dtype), (tokens.shape[0], 1, d)))
    pooled = layers.attention(q, proj("k_proj", tokens), proj("v_proj", tokens))
    return layers.dense(d, ("heads", "kv"), ("embed",), cfg=lm, name="out_proj",
                        axis=(-2, -1))(pooled)[:, 0]


class Head(nn.Module):
  """LayerNorm -> dense -> GELU -> dense: pooled [B, D] -> logits [B, num_out]."""
  cfg: Any
  num_out: int

  @nn.compact
  def __call__(self, x):
    lm, hidden = self.cfg.language, self.cfg.head_hidden
    h = layers.layer_norm(lm, "norm", 1e-5)(x)
    h = jax.nn.gelu(layers.dense(hidden, ("embed",), ("mlp",), cfg=lm, name="fc1")(h))
    return layers.dense(self.num_out, ("mlp",), (None,), cfg=lm, name="fc2")(h).astype(jnp.float32)


class Heads(nn.Module):
  """Visual tokens [B, N, D] -> attention-pooled feature and the two heads' logits."""
  cfg: Any

  @nn.compact
  def __call__(self, visual_tokens):
    pooled = AttentionPool(self.cfg, name="pool")(visual_tokens)
    return {"pooled_visual": pooled,
            "action_logits": Head(self.cfg, self.cfg.num_actions, name="action")(pooled),
            "reason_logits": Head(self.cfg, self.cfg.num_reasons, name="reason")(pooled)}


def _dummy(cfg: Config):
  width = cfg.vision.hidden_size * len(cfg.feature_positions)
  return (jnp.zeros((1, 1, width), jnp.float32),
          jnp.zeros((1, 1, cfg.language.hidden_size), jnp.float32))


def init(cfg: Config, key) -> dict:
  """{"vision", "projector", "language", "heads"} params."""
  kv, kp, kl, kh, kr = jax.random.split(key, 5)
  patches, tokens = _dummy(cfg)
  params = {"vision": vision.init(cfg.vision, kv),
            "projector": layers.unbox(Projector(cfg).init(kp, patches)),
            "language": language.init(cfg.language, kl),
            "heads": layers.unbox(Heads(cfg).init(kh, tokens))}
  if cfg.reweight:
    params["reweighting"] = reweighting.init(_reweight_config(cfg), kr, cfg.vision.hidden_size,
                                             cfg.language.hidden_size)
  if cfg.num_cameras > 1:
    params["cameras"] = jnp.zeros((cfg.num_cameras, cfg.vision.hidden_size),
                                  cfg.vision.param_dtype)
  return params


def _reweight_config(cfg: Config) -> reweighting.Config:
  return reweighting.Config(cfg.reweight_dim, cfg.language.dtype, cfg.language.param_dtype)


def logical_axes(cfg: Config):
  patches, tokens = _dummy(cfg)
  key = jax.random.key(0)
  axes = {"vision": vision.logical_axes(cfg.vision),
          "projector": layers.logical_axes(Projector(cfg).init, key, patches),
          "language": language.logical_axes(cfg.language),
          "heads": layers.logical_axes(Heads(cfg).init, key, tokens)}
  if cfg.reweight:
    text = jnp.zeros((1, 3, cfg.language.hidden_size))
    axes["reweighting"] = layers.logical_axes(reweighting.Scorer(_reweight_config(cfg)).init,
                                              key, patches, text, jnp.ones((1, 3)))
  if cfg.num_cameras > 1:
    axes["cameras"] = jax.sharding.PartitionSpec(None, "embed_vision")
  return axes


def check_image_tokens(cfg: Config, input_ids):
  """A ValueError unless every row of `input_ids` holds exactly `cfg.num_visual_tokens`
  image placeholders (`splice` needs it; transformers' LLaVA raises the same), naming the
  rows. Traced ids (inside jit) cannot be checked: the jitted callers check on the host."""
  if input_ids is None or isinstance(input_ids, jax.core.Tracer):
    return
  counts = (np.asarray(input_ids) == cfg.image_token_id).sum(axis=-1).reshape(-1)
  bad = np.flatnonzero(counts != cfg.num_visual_tokens)[:8]
  if bad.size:
    raise ValueError(f"input_ids row(s) {bad.tolist()} hold {counts[bad].tolist()} image "
                     f"placeholders (token {cfg.image_token_id}); every row needs exactly "
                     f"num_visual_tokens = {cfg.num_visual_tokens}, one per visual token")


def splice(text_embeds, visual_tokens, is_image):
  """Puts visual token j at the j-th placeholder of each row.

  text_embeds [B, T, D]; visual_tokens [B, N, D]; is_image [B, T] bool with N placeholders
  per row (static shapes: extra placeholders repeat the last visual token).
  """
  index = jnp.clip(jnp.cumsum(is_image, axis=1) - 1, 0, visual_tokens.shape[1] - 1)
  gathered = jnp.take_along_axis(visual_tokens, index[..., None], axis=1)
  return jnp.where(is_image[..., None], gathered.astype(text_embeds.dtype), text_embeds)


def _flat_views(cfg: Config, images):
  """[B, V, H, W, 3] (or [B, H, W, 3] for one camera) -> ([B * V, H, W, 3], B)."""
  v = cfg.num_cameras
  if images.ndim == 5 and images.shape[1] == v:
    return images.reshape(-1, *images.shape[2:]), images.shape[0]
  if images.ndim == 4 and v == 1:
    return images, images.shape[0]
  want = "[B, H, W, 3] or [B, 1, H, W, 3]" if v == 1 else f"[B, {v}, H, W, 3]"
  raise ValueError(f"images must be {want} for num_cameras={v}, got {list(images.shape)}")


def encode_image(cfg: Config, params, images, instruction_ids=None, instruction_mask=None,
                 keep_ratio: float = 1.0) -> dict:
  """images [B, H, W, 3] (or [B, V, H, W, 3]) -> vision features, visual tokens and head
  logits (no LM).

  With `cfg.reweight`, the instruction (ids [B, L] and mask [B, L]) scores the patch tokens
  of all views ("token_scores" [B, V * N]) after `cfg.reweight_layer` vision layers (None: at
  the (deepest) feature layer); they are gated by 2 sigmoid(score), and `keep_ratio` < 1
  keeps only the best-scoring ceil(V * N * keep_ratio) ("kept_indices", into the V * N), so
  the layers after run on fewer tokens. A feature layer before that point contributes its
  (ungated) hidden states at the kept tokens.
  """
  positions = cfg.feature_positions
  vcfg, vparams = vision.truncate(cfg.vision, params["vision"], max(positions))
  views = cfg.num_cameras
  flat, b = _flat_views(cfg, images)
  out = {}
  reweighting.check_keep_ratio(keep_ratio)
  if not cfg.reweight and keep_ratio < 1.0:
    raise ValueError("pruning (keep_ratio < 1) needs cfg.reweight: tokens are kept by score")
  if cfg.reweight and instruction_ids is None:
    raise ValueError("cfg.reweight needs the instruction (instruction_ids, instruction_mask)")
  one_pass = not cfg.reweight and views == 1 and len(positions) == 1
  if one_pass:
    vout = vision.apply(vcfg, vparams, flat)
    hidden_at = {positions[0]: vout["hidden"]}
  else:
    layer = (cfg.reweight_layer if cfg.reweight and cfg.reweight_layer is not None
             else vcfg.num_layers)
    # Per view up to `layer`, keeping the hidden states of earlier feature layers.
    cuts = sorted({p for p in positions if p < layer}) + [layer]
    (stem_cfg, stem), _ = vision.split(vcfg, vparams, cuts[0])
    per_view = {cuts[0]: vision.apply_part(stem_cfg, stem, flat, "stem")}
    for lo, hi in zip(cuts, cuts[1:]):
      per_view[hi] = vision.apply_layers(vcfg, vparams, per_view[lo], lo, hi)
    clip = vcfg.family == "clip"          # CLIP's class tokens are always kept, first
    # SigLIP has no class token: "default" drops each view's first patch (after the tower,
    # as HF LLaVA does), which pruning therefore never keeps (`candidates`: the patches that
    # can end up selected).
    _, cells = patch_layout(cfg)
    first = cells is not None
    candidates = cells if first else np.arange(views * vcfg.num_patches)

    def joint(hidden):
      """[B * V, T, Dv] -> the views' patches [B, V * N, Dv] behind their class tokens (CLIP:
      [B, V + V * N, Dv]), each view tagged by its camera embedding."""
      hidden = hidden.reshape(b, views, *hidden.shape[1:])
      if views > 1:
        hidden = hidden + params["cameras"][None, :, None].astype(hidden.dtype)
      width = hidden.shape[-1]
      patches = hidden[:, :, clip:].reshape(b, -1, width)
      return jnp.concatenate([hidden[:, :, 0], patches], axis=1) if clip else patches

    def behind_leads(tokens, patches):   # (no empty concatenation: ONNX mishandles one)
      return jnp.concatenate([tokens[:, :views], patches], axis=1) if clip else patches

    def select(tokens, kept):
      """The kept patches of `joint`'s tokens (all where none are pruned), behind the class
      tokens."""
      if kept is None:
        return tokens
      patches = tokens[:, views * clip:]
      return behind_leads(tokens, jnp.take_along_axis(patches, kept[..., None], axis=1))

    x, kept = joint(per_view[layer]), None
    if cfg.reweight:
      text = language.embed_tokens(cfg.language, params["language"], instruction_ids)
      patches = x[:, views * clip:]
      scores = reweighting.scores(_reweight_config(cfg), params["reweighting"], patches, text,
                                  instruction_mask)
      out["token_scores"] = scores
      x = behind_leads(x, reweighting.reweight(patches, scores))
      if keep_ratio < 1.0:
        kept = reweighting.top_k(scores, keep_ratio, candidates)
        out["kept_indices"] = kept
    hidden_at = {p: select(joint(per_view[p]), kept) for p in cuts[:-1]}
    # The views together from `layer` on, keeping the hidden states of the later ones.
    x, done = select(x, kept), layer
    for p in sorted({p for p in positions if p >= layer}):
      hidden_at[p] = x = vision.apply_layers(vcfg, vparams, x, done, p)
      done = p
    _, (tail_cfg, tail) = vision.split(vcfg, vparams, vcfg.num_layers)
    vout = vision.apply_part(tail_cfg, tail, x, "tail", views)
    if first and kept is None:
      hidden_at = {p: h[:, candidates] for p, h in hidden_at.items()}
  # "default" drops each view's first token: CLIP's class tokens, first in the joint tail;
  # SigLIP's first patches: here in the one-pass path, above (`candidates`) in the other.
  default = cfg.vision_feature_select_strategy == "default"
  drop = views * default if cfg.vision.family == "clip" or one_pass else 0
  selected = jnp.concatenate([hidden_at[p][:, drop:] for p in positions], axis=-1)
  out.update(image_pooled=vout["pooled"],            # [B, Dv] vision pooled feature
             patch_features=selected)                # [B, num_visual_tokens or k, Dv * F]
  visual_tokens = Projector(cfg).apply({"params": params["projector"]}, selected)
  heads = Heads(cfg).apply({"params": params["heads"]}, visual_tokens)
  return {**out, "visual_tokens": visual_tokens,     # [B, N or k, D]
          **heads}  # pooled_visual [B, D], action_logits [B, 4], reason_logits [B, 21]


def apply(cfg: Config, params, images, input_ids=None, attention_mask=None,
          instruction_ids=None, instruction_mask=None) -> dict:
  """images [B, H, W, 3] (or [B, V, H, W, 3]) float32 (normalised); input_ids [B, T] int32
  holding `cfg.num_visual_tokens` copies of `cfg.image_token_id` per row (left-padded, with
  `attention_mask`), or None for the image-only path.

  Returns `encode_image`'s dict plus, with input_ids, "lm_logits" [B, T, V] and
  "lm_hidden_states" [B, T, D] (after the LM's final norm).
  """
  check_image_tokens(cfg, input_ids)
  out = encode_image(cfg, params, images, instruction_ids, instruction_mask)
  if input_ids is not None:
    embeds = language.embed_tokens(cfg.language, params["language"], input_ids)
    embeds = splice(embeds, out["visual_tokens"], input_ids == cfg.image_token_id)
    lm = language.forward(cfg.language, params["language"], inputs_embeds=embeds,
                          attention_mask=attention_mask)
    out.update(lm_logits=lm["logits"], lm_hidden_states=lm["hidden_states"])
  return out


def generate(cfg: Config, params, images, input_ids, max_new_tokens=16, *,
             instruction_ids=None, instruction_mask=None, **kwargs):
  """Answers/explanations: the prompt with visual tokens spliced in, decoded by
  `language.generate` (same keyword arguments). Returns [B, T + max_new_tokens]."""
  check_image_tokens(cfg, input_ids)
  visual = encode_image(cfg, params, images, instruction_ids, instruction_mask)["visual_tokens"]
  embeds = language.embed_tokens(cfg.language, params["language"], input_ids)
  embeds = splice(embeds, visual, input_ids == cfg.image_token_id)
  return language.generate(cfg.language, params["language"], input_ids, max_new_tokens,
                           inputs_embeds=embeds, **kwargs)


def _dataclass_from_dict(cls, values: dict, where: str):
  known = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(values) - known)
  if unknown:
    raise KeyError(f"unknown key(s) {unknown} in {where}; known: {sorted(known)}")
  return cls(**values)


def config_from_dict(model) -> Config:
  """A `vlm.Config` from a config's `model` ConfigDict (or plain dict) with `vision`,
  `language` and VLM-level fields; unknown keys are an error naming them."""
  values = model.to_dict() if hasattr(model, "to_dict") else dict(model)
  sub = {name: _dataclass_from_dict(part.Config, dict(values.pop(name)), f"model.{name}")
         for name, part in (("vision", vision), ("language", language))}
  return _dataclass_from_dict(Config, {**values, **sub}, "model")
