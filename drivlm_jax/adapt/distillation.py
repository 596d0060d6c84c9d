"""Scene-aware teacher-to-student distillation (DriVLM part 4).

A frozen teacher (any run directory of `drivlm_jax.train`, named by `config.distill.teacher`;
empty: distillation is off) runs on the same batch as the student, on every row: the
teacher needs no labels. Its tower may differ from the student's in family and image size:
it sees the student's frames resized and normalised for it (`teacher_images`). Terms:
  kd_heads    sigmoid KD of the action and explanation heads
  kd_relation the heads' ranking of the batch's images, per class and domain (Pearson
              correlation with the teacher's: DIST's intra-class relation)
  kd_pruned   kd_heads and kd_relation again (at their weights, over kd_heads's), on the
              student pruned as deployed (`config.distill.keep_ratio` of its visual tokens,
              top-k by the instruction's scores): the deployed student's heads distil too,
              not only the unpruned ones
  kd_lm       softmax KD of the LM tokens from the image on
  kd_feature  feature KD of the visual tokens (student -> teacher width through a learned
              projection), weighted by the student's instruction scores
with temperature `config.distill.temperature` and feature distance
`config.distill.feature_kind` ("cosine" or "mse"). `config.distill.rows` says which rows
distil: "all" (the default), or "target": the unlabelled target rows only, so the labelled
source rows learn from their labels alone and the teacher teaches only where no label exists.
`config.distill.heads` reduces the heads' KD over their classes: "sum" (the default) or
"mean", as the heads' BCE on the labels does (`losses.distill.sigmoid_kd`).
"""
import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from absl import logging

from drivlm_jax import adapt, hf, pretrained, run as run_lib
from drivlm_jax.data import preprocess
from drivlm_jax.data import tokenizer as tokenizer_lib
from drivlm_jax.losses import distill
from drivlm_jax.model import vlm


def _same_tokenizer(teacher: str | None, student: str, student_file: str) -> bool:
  """"" is the sim's BPE (the same for every run: trained on the sim's own corpus); None is
  unknown (an HF LLaVA teacher without tokenizer files)."""
  if teacher == student:
    return True
  if not teacher or not student:
    return False
  return tokenizer_lib.load(teacher).vocab() == tokenizer_lib.load(student_file).vocab()


def teacher_images(cfg: vlm.Config, tcfg: vlm.Config, images):
  """The student's frames [..., S, S, 3], normalised for the student's tower, as the
  teacher's tower takes them: resized to its image size (bilinear, antialiased when smaller)
  and normalised by its own statistics (`preprocess.statistics`). A bigger teacher sees the
  student's frames upsampled, not the original images."""
  (mean, std), (t_mean, t_std) = (preprocess.statistics(c.vision) for c in (cfg, tcfg))
  size = tcfg.vision.image_size
  if (mean, std) == (t_mean, t_std) and images.shape[-3:-1] == (size, size):
    return images
  pixels = images.astype(jnp.float32) * jnp.asarray(std) + jnp.asarray(mean)   # 0..1
  if images.shape[-3:-1] != (size, size):
    pixels = jax.image.resize(pixels, (*pixels.shape[:-3], size, size, 3), "bilinear")
  return ((pixels - jnp.asarray(t_mean)) / jnp.asarray(t_std)).astype(images.dtype)


def load_teacher(teacher_dir: str, cfg: vlm.Config, weights: dict, config,
                 feats) -> run_lib.Run:
  """The frozen teacher: a run directory, or an HF LLaVA directory (any size). Heads KD needs
  trained heads (a run, or `drivlm.safetensors` beside the LLaVA); LM-logit KD needs the
  student's tokenizer. Heads (and their relation) and feature KD work across tokenizers."""
  if pretrained.is_llava(teacher_dir):
    tcfg, params = hf.load_vlm(teacher_dir)
    if tcfg.num_cameras == 1 and cfg.num_cameras > 1:   # a one-image LLaVA sees every view,
      tcfg = dataclasses.replace(tcfg, num_cameras=cfg.num_cameras)   # camera embeddings 0
      params = {**params, "cameras": jnp.zeros((cfg.num_cameras, tcfg.vision.hidden_size))}
    if "heads" not in params:
      on = [k for k in ("kd_heads", "kd_relation", "kd_pruned") if weights.get(k)]
      if on:
        raise ValueError(f"teacher {teacher_dir}: an HF LLaVA without DriVLM heads "
                         f"({hf.DRIVLM_PARTS}) has nothing to teach the heads; set "
                         + " ".join(f"--config.loss.{k}=0" for k in on))
      params = {**jax.jit(lambda k: vlm.init(tcfg, k))(jax.random.key(0)), **params}
    teacher = run_lib.Run(teacher_dir, None, tcfg, params, 0)
    tokenizer = teacher_dir if tokenizer_lib.has_tokenizer(teacher_dir) else None
  else:
    teacher = run_lib.load(teacher_dir)
    tokenizer = teacher.config.data.get("tokenizer", "")
  if teacher.cfg.num_cameras != cfg.num_cameras:
    raise ValueError(f"teacher {teacher_dir} sees {teacher.cfg.num_cameras} camera(s) per "
                     f"example, the student {cfg.num_cameras}: distil from a teacher trained "
                     f"on the student's cameras (model.num_cameras)")
  if weights["kd_lm"]:
    ours = config.data.get("tokenizer", "")
    same = _same_tokenizer(tokenizer, ours, feats.tokenizer)
    if not same or teacher.cfg.language.vocab_size != cfg.language.vocab_size:
      raise ValueError(
          f"teacher {teacher_dir} (tokenizer {tokenizer or 'the sim BPE'}, "
          f"{teacher.cfg.language.vocab_size}-token LM) and the student (tokenizer "
          f"{ours or 'the sim BPE'}, {cfg.language.vocab_size}-token LM) do not share one "
          f"tokenizer, which LM-logit distillation needs; set --config.loss.kd_lm=0 to "
          f"distil the heads and visual features only")
    # The teacher's LM reads the student's prompts: their image placeholders must be its own.
    theirs = (teacher.cfg.num_visual_tokens, teacher.cfg.image_token_id)
    if theirs != (cfg.num_visual_tokens, cfg.image_token_id):
      raise ValueError(
          f"teacher {teacher_dir} splices {theirs[0]} visual tokens at token {theirs[1]}, the "
          f"student's prompts hold {cfg.num_visual_tokens} at token {cfg.image_token_id}; "
          f"LM-logit distillation feeds the teacher the student's prompts, so set "
          f"--config.loss.kd_lm=0 or use a teacher with the student's image grid")
  ours, theirs = ((c.vision.family, c.vision.image_size, preprocess.statistics(c.vision))
                  for c in (cfg, teacher.cfg))
  if ours != theirs:
    logging.info("teacher %s is a %s tower at %d px (mean, std %s), the student a %s tower at "
                 "%d px (%s): the teacher sees the student's frames resized and normalised for "
                 "it", teacher_dir, *theirs, *ours)
  logging.info("teacher: %s at step %d", teacher_dir, teacher.step)
  return teacher


@adapt.register("distillation")
@dataclasses.dataclass(frozen=True)
class Distillation(adapt.Component):
  cfg: vlm.Config        # the student's
  teacher: Any           # run_lib.Run
  weights: dict          # {kd_<kind>: weight}
  temperature: float
  feature_kind: str
  rows: str = "all"     # "all" or "target"
  heads: str = "sum"    # the heads' KD over their classes: "sum" or "mean"
  keep_ratio: float = 1.0   # kd_pruned's share of the visual tokens

  param_key = "distill"
  key_index = 2
  terms = ("kd_heads", "kd_relation", "kd_pruned", "kd_lm", "kd_feature")

  @classmethod
  def from_config(cls, config, cfg, feats):
    weights = adapt.weights(config, cls.terms)
    kd = config.get("distill", {})
    if not any(w > 0 for w in weights.values()):
      return None
    if not kd.get("teacher"):   # the no_distillation ablation: one flag turns it off
      logging.warning("distillation off: config.distill.teacher is empty")
      return None
    rows = kd.get("rows", "all")
    if rows not in ("all", "target"):
      raise ValueError(f"config.distill.rows={rows!r}: 'all' or 'target'")
    heads = kd.get("heads", "sum")
    if heads not in ("sum", "mean"):
      raise ValueError(f"config.distill.heads={heads!r}: 'sum' or 'mean'")
    deployed = run_lib.deploy_keep_ratio(config)
    keep_ratio = float(kd.get("keep_ratio", deployed))
    if weights["kd_pruned"]:
      if not cfg.reweight or not 0 < keep_ratio < 1:
        raise ValueError(f"loss.kd_pruned={weights['kd_pruned']:g} distils the student pruned "
                         f"to config.distill.keep_ratio (in (0, 1), got {keep_ratio:g}) by "
                         f"its instruction scores (model.reweight, now {cfg.reweight}); or "
                         f"set --config.loss.kd_pruned=0")
      if not weights["kd_heads"]:
        raise ValueError("loss.kd_pruned repeats kd_heads and kd_relation on the pruned "
                         "student at their weights over kd_heads's: set loss.kd_heads > 0, "
                         "or --config.loss.kd_pruned=0")
      if deployed != keep_ratio:
        logging.warning("loss.kd_pruned distils the student pruned to distill.keep_ratio=%g, "
                        "but its evaluators deploy it at %g (evals.*.keep_ratio): set both",
                        keep_ratio, deployed)
    return cls(cfg, load_teacher(kd.teacher, cfg, weights, config, feats), weights,
               float(kd.get("temperature", 1.0)), kd.get("feature_kind", "cosine"), rows,
               heads, keep_ratio)

  @property
  def needs_lm(self):
    return self.weights["kd_lm"] > 0

  def init(self, key):
    """The projection of a student visual token onto the teacher's token width."""
    shape = (self.cfg.language.hidden_size, self.teacher.cfg.language.hidden_size)
    return {"projection": nn.initializers.lecun_normal()(key, shape)}

  def logical_axes(self):
    return {"projection": jax.sharding.PartitionSpec("embed", None)}

  def frozen(self):
    return self.teacher.params

  def frozen_axes(self):
    return vlm.logical_axes(self.teacher.cfg)

  def loss(self, ctx: adapt.Context) -> dict:
    tcfg, b, w, temperature = self.teacher.cfg, ctx.batch, self.weights, self.temperature
    teacher_out = vlm.apply(tcfg, ctx.frozen[self.name], teacher_images(self.cfg, tcfg,
                                                                        b["image"]),
                            b["input_ids"] if self.needs_lm else None, b["attention_mask"],
                            b["instruction_ids"], b["instruction_mask"])
    t, out = jax.lax.stop_gradient(teacher_out), ctx.out
    # [B] 0/1: the rows that distil (None: all, as plain means)
    rows = None if self.rows == "all" else (b["domain"] == 1).astype(jnp.float32)
    per_row = lambda mask: mask if rows is None else mask * rows[:, None]   # [B, N] masks
    losses = {}
    heads_kd = lambda student: sum(   # noqa: E731
        distill.sigmoid_kd(student[k], t[k], temperature, rows, self.heads)
        for k in ("action_logits", "reason_logits"))
    relation_kd = lambda student: sum(   # noqa: E731
        distill.relation_kd(student[k], t[k], b["domain"], temperature, rows)
        for k in ("action_logits", "reason_logits")) / 2
    if w["kd_heads"]:
      losses["kd_heads"] = heads_kd(out)
    if w.get("kd_relation"):   # a weights mapping without the term: off
      losses["kd_relation"] = relation_kd(out)
    if w.get("kd_pruned"):
      pruned = vlm.encode_image(self.cfg, ctx.params, b["image"], b["instruction_ids"],
                                b["instruction_mask"], keep_ratio=self.keep_ratio)
      losses["kd_pruned"] = heads_kd(pruned)
      if w.get("kd_relation"):
        losses["kd_pruned"] += w["kd_relation"] / w["kd_heads"] * relation_kd(pruned)
    if w["kd_lm"]:
      mask = per_row(b["attention_mask"] * (b["input_ids"] != self.cfg.image_token_id))
      losses["kd_lm"] = distill.softmax_kd(out["lm_logits"], t["lm_logits"], temperature, mask)
    if w["kd_feature"]:
      # Patch by patch on the student's grids (class tokens left out; `token_scores` lie on
      # the same cells), where both hold a token.
      student_tokens, valid = vlm.on_grid(self.cfg, out["visual_tokens"])
      teacher_tokens, teacher_valid = vlm.on_grid(tcfg, t["visual_tokens"])
      match = lambda x: distill.match_grid(x, tcfg.vision.grid, self.cfg.vision.grid,
                                           self.cfg.num_cameras)
      teacher_tokens = match(teacher_tokens)
      if teacher_valid is not None:
        # Resampling mixes the missing cells' zeros in: divide them back out of the tokens,
        # and a cell resampled mostly from missing ones counts less.
        teacher_valid = match(jnp.asarray(teacher_valid)[None, :, None])[0, :, 0]
        teacher_tokens = teacher_tokens / jnp.maximum(teacher_valid, 1e-6)[:, None]
        valid = teacher_valid if valid is None else valid * teacher_valid
      scores = out.get("token_scores")
      weights = None if scores is None else jax.nn.sigmoid(scores)
      if weights is None and (rows is not None or valid is not None):
        weights = jnp.ones(student_tokens.shape[:2])
      if valid is not None:
        weights = weights * valid
      losses["kd_feature"] = distill.feature_kd(
          student_tokens, teacher_tokens, ctx.params[self.param_key]["projection"],
          per_row(weights), self.feature_kind)
    return losses
