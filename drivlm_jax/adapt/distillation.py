"""Scene-aware teacher-to-student distillation (DriVLM part 4).

A frozen teacher (any run directory of `drivlm_jax.train`, named by `config.distill.teacher`;
empty: distillation is off) runs on the same batch as the student, on every row: the teacher needs no labels. Terms:
  kd_heads    sigmoid KD of the action and explanation heads
  kd_lm       softmax KD of the LM tokens from the image on
  kd_feature  feature KD of the visual tokens (student -> teacher width through a learned
              projection), weighted by the student's instruction scores
with temperature `config.distill.temperature` and feature distance
`config.distill.feature_kind` ("cosine" or "mse").
"""
import dataclasses
from typing import Any

import flax.linen as nn
import jax
from absl import logging

from drivlm_jax import adapt, run as run_lib
from drivlm_jax.losses import distill
from drivlm_jax.model import vlm


def load_teacher(teacher_dir: str, cfg: vlm.Config) -> run_lib.Run:
  """The frozen teacher run; its LM must share the student's vocabulary."""
  teacher = run_lib.load(teacher_dir)
  if teacher.cfg.language.vocab_size != cfg.language.vocab_size:
    raise ValueError(f"teacher {teacher_dir} has a {teacher.cfg.language.vocab_size}-token "
                     f"vocabulary, the student {cfg.language.vocab_size}: LM distillation "
                     f"needs one tokenizer")
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

  param_key = "distill"
  key_index = 2
  terms = ("kd_heads", "kd_lm", "kd_feature")

  @classmethod
  def from_config(cls, config, cfg, feats):
    del feats
    weights = adapt.weights(config, cls.terms)
    kd = config.get("distill", {})
    if not any(w > 0 for w in weights.values()):
      return None
    if not kd.get("teacher"):   # the no_distillation ablation: one flag turns it off
      logging.warning("distillation off: config.distill.teacher is empty")
      return None
    return cls(cfg, load_teacher(kd.teacher, cfg), weights, float(kd.get("temperature", 1.0)),
               kd.get("feature_kind", "cosine"))

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
    teacher_out = vlm.apply(tcfg, ctx.frozen[self.name], b["image"],
                            b["input_ids"] if self.needs_lm else None, b["attention_mask"],
                            b["instruction_ids"], b["instruction_mask"])
    t, out = jax.lax.stop_gradient(teacher_out), ctx.out
    losses = {}
    if w["kd_heads"]:
      losses["kd_heads"] = (
          distill.sigmoid_kd(out["action_logits"], t["action_logits"], temperature)
          + distill.sigmoid_kd(out["reason_logits"], t["reason_logits"], temperature))
    if w["kd_lm"]:
      mask = b["attention_mask"] * (b["input_ids"] != self.cfg.image_token_id)
      losses["kd_lm"] = distill.softmax_kd(out["lm_logits"], t["lm_logits"], temperature, mask)
    if w["kd_feature"]:
      teacher_tokens = distill.match_grid(t["visual_tokens"], tcfg.vision.grid,
                                          self.cfg.vision.grid)
      scores = out.get("token_scores")
      losses["kd_feature"] = distill.feature_kd(
          out["visual_tokens"], teacher_tokens, ctx.params[self.param_key]["projection"],
          None if scores is None else jax.nn.sigmoid(scores), self.feature_kind)
    return losses
