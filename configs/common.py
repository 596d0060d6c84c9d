"""Shared config pieces: model size presets and big_vision-style `arg` parsing.

A preset is a ConfigDict with `vision`, `language` (fields of `vision.Config` /
`language.Config`) and VLM-level fields; `drivlm_jax.model.vlm.config_from_dict` builds
the frozen `vlm.Config` from it, so any field can be overridden on the command line
(`--config.model.language.num_layers=4`).
"""
import ml_collections

# The ViT-B/16 towers train looped, not scanned (`layers.LayerLoop`: faster steps, same params;
# measured on these 12-layer towers, not on the 24-layer teacher).
_CLIP_B16 = dict(family="clip", image_size=224, patch_size=16, hidden_size=768,
                 intermediate_size=3072, num_layers=12, num_heads=12, layer_norm_eps=1e-5,
                 hidden_act="quick_gelu", scan=False)
_CLIP_L14_336 = dict(family="clip", image_size=336, patch_size=14, hidden_size=1024,
                     intermediate_size=4096, num_layers=24, num_heads=16, layer_norm_eps=1e-5,
                     hidden_act="quick_gelu")
_SIGLIP_B16 = dict(family="siglip", image_size=224, patch_size=16, hidden_size=768,
                   intermediate_size=3072, num_layers=12, num_heads=12, layer_norm_eps=1e-6,
                   hidden_act="gelu_pytorch_tanh", scan=False)
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
    # SigLIP has no class token: every patch is projected ("full", as LLaVA-OneVision).
    "siglip_b16_qwen05b": dict(vision=_SIGLIP_B16, language=_QWEN2_05B,
                               image_token_id=_QWEN2_IMAGE_PAD, vision_feature_layer=-1,
                               vision_feature_select_strategy="full"),
    # Teacher: CLIP ViT-L/14-336 + Qwen2-1.5B shapes.
    "clip_l14_qwen15b": dict(vision=_CLIP_L14_336, language=_QWEN2_15B,
                             image_token_id=_QWEN2_IMAGE_PAD, vision_feature_layer=-2),
}


def model_config(preset: str) -> ml_collections.ConfigDict:
  if preset not in MODEL_PRESETS:
    raise KeyError(f"unknown model preset {preset!r}; known: {sorted(MODEL_PRESETS)}")
  # One camera unless a config says otherwise (model.num_cameras=6 with six_cam data).
  return ml_collections.ConfigDict({"num_cameras": 1, **MODEL_PRESETS[preset]})


# LoRA targets: the LM's attention and MLP kernels (add "|^vision/..." for the vision tower).
LM_LORA_TARGETS = r"^language/layers/(self_attn/[qkvo]_proj|mlp/(gate|up|down)_proj)/kernel$"
RECIPES = ("full", "freeze_vision", "freeze_lm", "lora_lm", "lora_lm_freeze_vision")


def finetune(config, recipe: str, rank: int = 16):
  """What trains, as config: `config.lora` (rank 0 = off) and frozen `optimizer.parts`.

  full                   every param trains
  freeze_vision          the vision tower is frozen (no gradients, no AdamW state)
  freeze_lm              the LM is frozen (the projector, heads and vision tower train)
  lora_lm                LoRA (rank `rank`, alpha 2 * rank) on the LM's attention and MLP
                         kernels; the whole LM is frozen (embeddings and norms too), the
                         adapters, projector, heads and vision tower train
  lora_lm_freeze_vision  both
  """
  if recipe not in RECIPES:
    raise KeyError(f"unknown finetune recipe {recipe!r}; known: {list(RECIPES)}")
  lora_on = recipe.startswith("lora")
  config.lora = ml_collections.ConfigDict(dict(
      rank=rank if lora_on else 0, alpha=2.0 * rank, targets=LM_LORA_TARGETS))
  frozen = {"freeze_vision": ["^vision/"], "freeze_lm": ["^language/"],
            "lora_lm": ["^language/"],
            "lora_lm_freeze_vision": ["^language/", "^vision/"]}.get(recipe, [])
  config.optimizer.parts = [{"pattern": p, "freeze": True} for p in frozen] + list(
      config.optimizer.get("parts", []))


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


METHODS = ("source_only", "dann", "entmin", "drivlm_teacher", "drivlm_student", "oracle")
STAGES = ("clip_finetune",)     # trains parts for the methods; not itself compared


def stage_steps(method: str, total: int) -> int:
  """Training steps of `method` in a demo or ablation whose compared methods train `total`:
  the CLIP stage a quarter (a short contrastive warm-up), everything else `total`."""
  return max(1, total // 4) if method == "clip_finetune" else total


def check_method(arg) -> str:
  """`arg.method` (drivlm = drivlm_student), validated against `arg.teacher`."""
  method = "drivlm_student" if arg.method == "drivlm" else arg.method
  if method not in METHODS + STAGES:
    raise ValueError(f"method {arg.method!r}: known {', '.join(METHODS + STAGES)} (drivlm = "
                     f"drivlm_student)")
  if method == "drivlm_student" and not arg.teacher:
    raise ValueError("method=drivlm_student needs teacher=<run dir of a drivlm_teacher run> "
                     "(any run dir of drivlm_jax.train)")
  return method


# The adversarial weight of every discriminator level that is on, per method: what `python -m
# experiments.defaults` chose over four shifts and two seeds without target labels (README
# "The adversarial defaults"): on the teacher (at d90989b; DANN's one level shares it), and
# on the student warm-started from the CLIP stage and distilled from that teacher
# (`--stage student`, at f2dfdd6).
DA_WEIGHT = {"drivlm_teacher": 0.01, "dann": 0.01, "drivlm_student": 0.03}
# The student's relation distillation (loss.kd_relation: the heads' ranking of the batch's
# images, per class and domain, against the teacher's; losses/distill.relation_kd): chosen
# the same way on the student over {0, 0.3, 1} (README "Relation distillation", at f082dfa).
KD_RELATION = 0.3
# The student's heads distilled again pruned as deployed (loss.kd_pruned, to `keep_ratio`;
# adapt/distillation.py): chosen the same way on the student scored as deployed over
# {0, 0.3, 1} (README "Pruning-aware distillation", at 081dae6).
KD_PRUNED = 1.0


def add_method(config, method: str, teacher: str, keep_ratio: float,
               da_weight: float | None = None,
               init_from: str = "", fda_beta: float = 0.0, fda_fraction: float = 1.0):
  """The DriVLM stages as config: what each method trains on, and the weight of every loss
  term in the flat mapping `config.loss` (a weight of 0 turns a term off).

  source_only     labelled source only
  dann            baseline: + unlabelled target, one image-level discriminator behind the
                  gradient reversal (Ganin & Lempitsky, 2015), weight `da_weight` (default
                  DA_WEIGHT, the teacher's); no reweighting, no distillation
  entmin          baseline: + unlabelled target, entropy minimisation of the heads on it
                  (weight 0.1; drivlm_jax/adapt/entropy.py)
  drivlm_teacher  + unlabelled target; discriminators at the image, token and instance level
                  (weight `da_weight` each, default DA_WEIGHT; reversal ramped after 25% of
                  training: the three levels and the start 0.25, chosen before the debiased
                  average at the weight 0.03, are what `python -m experiments.defaults`
                  chose over four shifts without target labels, README "The adversarial
                  defaults");
                  instruction-guided token reweighting; with `fda_beta` > 0 also Fourier
                  domain adaptation (Yang & Soatto, 2020; adapt/fourier.py): a share
                  `fda_fraction` of the source rows restyled with a target row's
                  low-frequency amplitude. Off by default: the label-free rule of
                  experiments.defaults keeps it off (README "Fourier domain adaptation")
  drivlm_student  as the teacher (its own weight: DA_WEIGHT), + distillation from the
                  `teacher` run (heads, LM tokens, visual tokens, the heads' ranking of the
                  images: KD_RELATION; the heads again pruned to `keep_ratio` as deployed:
                  KD_PRUNED); evaluated with every token and pruned to `keep_ratio`
  oracle          labelled source + labelled target (the upper bound)
  clip_finetune   the stage before adaptation: contrastive image-caption loss only (CLIP
                  InfoNCE, SigLIP sigmoid for SigLIP towers) on both domains (captions:
                  the instruction, on every row, so the caption never tells the domain)
  `init_from` (a run dir, e.g. the clip_finetune run) warm-starts the model params.
  `da.objective` is what the features minimise against the discriminators: "reversal" (the
  paper's gradient reversal of their BCE) or "confusion" (non-saturating; adapt/alignment.py).
  Every part has its own switch (the ablations): --config.loss.da_image=0,
  --config.loss.da_token=0, --config.loss.da_instance=0, --config.model.reweight=False (for
  the student with --config.loss.kd_pruned=0: no gates, nothing to prune),
  --config.loss.kd_heads=0 (kd_relation, kd_pruned, kd_lm, kd_feature), --config.fda.beta=0.
  It sets: method, init_from, model.reweight(_layer), data.target_fraction,
  data.target_labelled, loss.*, da, distill, fda, clip, and the pruned evaluator of the student
  (`evals.target_pruned`). It never changes `batch_size`: each config sets it (rows per
  step, source and target together; see `with_target`).
  """
  drivlm = method.startswith("drivlm")
  config.method = method
  config.init_from = init_from
  config.init_vision = ""      # HF CLIP/SigLIP directory: the vision tower starts from it
  config.init_language = ""    # HF LLaMA/Qwen2 directory: the LM starts from it
  # Image-splice fields the config sets instead of init_from's checkpoint, comma-separated
  # (e.g. "vision_feature_layer": another layer's features through the same projector).
  config.pretrained_keep = ""
  config.model.reweight = drivlm
  config.model.reweight_layer = 0     # score right after the patch embedding: pruned tokens
                                      # skip every vision layer
  config.data.target_fraction = 0.0 if method == "source_only" else 0.5
  config.data.target_labelled = method == "oracle"
  if da_weight is None:
    da_weight = DA_WEIGHT.get(method, 0.0)
  w = da_weight if drivlm else 0.0
  kd = 1.0 if method == "drivlm_student" else 0.0
  clip = method == "clip_finetune"
  if clip:   # the CLIP stage trains the contrastive term only
    config.loss.update(action=0.0, reason=0.0, lm=0.0)
  config.loss.update(da_image=da_weight if method == "dann" else w, da_token=w, da_instance=w,
                     da_consistency=0.0, kd_heads=kd, kd_relation=kd * KD_RELATION,
                     kd_pruned=kd * KD_PRUNED, kd_lm=kd,
                     kd_feature=kd,
                     clip=1.0 if clip else 0.0, entmin=0.1 if method == "entmin" else 0.0,
                     entmin_reason=0.0)
  config.da = ml_collections.ConfigDict(dict(focal_gamma=0.0, hidden=128, objective="reversal",
                                             start=0.1 if init_from else 0.25))
  config.distill = ml_collections.ConfigDict(dict(
      teacher=teacher, temperature=2.0, feature_kind="cosine", rows="all", heads="sum",
      keep_ratio=keep_ratio))
  config.fda = ml_collections.ConfigDict(dict(beta=fda_beta if drivlm else 0.0,
                                             fraction=fda_fraction))
  if method == "drivlm_student":   # also evaluated as deployed: pruned to `keep_ratio`
    config.evals.target_pruned = dict(type="heads", role="target", domain="target_pruned",
                                      keep_ratio=keep_ratio,
                                      batch_size=config.evals.target.batch_size)
  # "auto" and the 0 sizes follow the vision tower the run trains (which a pretrained start
  # takes from its checkpoint): SigLIP's sigmoid loss for a SigLIP tower, CLIP's InfoNCE
  # else; a fresh text tower as wide as the vision tower (adapt/contrastive.py).
  config.clip = ml_collections.ConfigDict(dict(
      loss="auto",
      text=dict(hidden_size=0, intermediate_size=0, num_layers=2, num_heads=0,
                max_position_embeddings=64, projection_dim=0),
      text_tower=""))   # a CLIPModel directory: its text tower and tokenizer instead
  return config


def with_target(config) -> bool:
  """Whether the method adds target rows to each step (unlabelled: the baselines, the
  DriVLM methods and the CLIP stage; labelled: the oracle). Configs give such methods twice
  the rows per step, so that every method sees as many labelled source examples per step as
  source_only (half of a batch was too few: seed 1's teacher then stayed on the plateau and
  adapted to 51 target mAP, vs 66 source-only), and the oracle sees those plus as many
  labelled target rows: an upper bound."""
  return config.data.target_fraction > 0


def evals(batch_size: int, num_generate: int, max_new_tokens: int) -> ml_collections.ConfigDict:
  """The standard evaluators (`drivlm_jax.evals`): the heads on the source and target test
  splits, and the LM's answers on `num_generate` examples of each, every
  `config.eval_every_steps` (give one an `every` of its own to change that)."""
  heads = lambda role: dict(type="heads", role=role, batch_size=batch_size,
                            official_batch_size=1)   # BDD-OIA test.py's --batch_size
  answers = lambda role: dict(type="generation", role=role, num=num_generate,
                              max_new_tokens=max_new_tokens, batch_size=batch_size)
  return ml_collections.ConfigDict(dict(
      source=heads("source"), target=heads("target"),
      source_answers=answers("source"), target_answers=answers("target")))


def real_config(arg, description: str):
  """The real-scale DriVLM config over a user's folders (`--config.data.source_dir`,
  `--config.data.target_dir`, BDD-OIA or nuScenes layout, detected): CLIP ViT-B/16 +
  Qwen2-0.5B student, CLIP ViT-L/14-336 + Qwen2-1.5B teacher, bf16 compute, FSDP mesh."""
  method = check_method(arg)
  config = ml_collections.ConfigDict()
  config.description = description
  config.seed = 0
  preset = arg.model or ("clip_l14_qwen15b" if method == "drivlm_teacher" else "clip_b16_qwen05b")
  config.model = model_config(preset)
  # The default tokenizer is the sim's BPE (<image> = 3). A pretrained start (init=LLaVA
  # dir, --config.init_vision/init_language) takes the model config and the tokenizer from
  # the checkpoints (drivlm_jax/pretrained.py); composed towers set image_token_id to the
  # tokenizer's image placeholder.
  config.model.image_token_id = 3
  config.mixed_precision = True
  config.ema_decay = 0.999
  config.total_steps = arg.steps
  config.log_every_steps = 50
  config.eval_every_steps = 2000
  config.checkpoint_every_steps = 1000
  config.max_checkpoints = 3
  config.data = ml_collections.ConfigDict(dict(
      sim=False, source_dir="", target_dir="", tokenizer="", cache_dir="",
      nuscenes_config="front", target_fraction=0.0, target_labelled=False,
      max_len=384, resize="pad", augment=True, workers=8, read_threads=1, max_boxes=16,
      drivelm_questions="released"))   # or "challenge": pipeline.Features
  config.optimizer = ml_collections.ConfigDict(dict(
      learning_rate=1e-4, warmup_steps=500, weight_decay=0.05, grad_clip_norm=1.0,
      end_lr_ratio=0.05, grad_accum_steps=1, parts=[]))
  config.loss = ml_collections.ConfigDict(dict(action=1.0, reason=1.0, lm=1.0))
  config.evals = evals(batch_size=64, num_generate=64, max_new_tokens=48)
  add_method(config, method, arg.teacher, keep_ratio=0.25, init_from=arg.init)
  finetune(config, arg.tune)
  config.batch_size = 128 if with_target(config) else 64   # 64 labelled source rows a step
  config.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))
  config.rules = None
  config.multihost = "auto"
  return config
