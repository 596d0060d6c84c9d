"""The driving heads on one role and split: action and explanation mAP / F1 (BDD-OIA
definitions), optionally with the visual tokens pruned as the deployed student runs. Beside
the dataset-level F1_all, `<kind>_F1_official` is F1 as BDD-OIA's own test script reports
it: samples-F1 per batch of `official_batch_size` examples (its --batch_size; 1 by
default, as there), averaged over batches (`metrics.official_f1`)."""
import dataclasses
import functools

import jax
import numpy as np
from absl import logging

from drivlm_jax import evals, metrics
from drivlm_jax.model import vlm


@functools.partial(jax.jit, static_argnums=(0, 5))
def probabilities(cfg, params, images, instruction_ids, instruction_mask, keep_ratio=1.0):
  """-> (action [B, 4], reason [B, 21]) probabilities, heads on `keep_ratio` of the tokens."""
  out = vlm.encode_image(cfg, params, images, instruction_ids, instruction_mask, keep_ratio)
  return jax.nn.sigmoid(out["action_logits"]), jax.nn.sigmoid(out["reason_logits"])


@evals.register("heads")
@dataclasses.dataclass(frozen=True)
class Heads(evals.Evaluator):
  keep_ratio: float = 1.0   # < 1: the heads see only the best-scoring tokens (deployed)
  official_batch_size: int = 1   # the batch of BDD-OIA's test.py for <kind>_F1_official

  def run(self, cfg, params, data, feats, place=None, workdir=None) -> dict:
    del workdir
    keep = self.keep_ratio
    if keep < 1.0 and not cfg.reweight:
      logging.warning("evals.%s: keep_ratio=%s ignored: the model has no instruction "
                      "reweighting to prune by (model.reweight=False); evaluating every token",
                      self.name, keep)
      keep = 1.0
    if keep < 1.0:   # as deployed: the exported student computes in float32
      cfg = vlm.with_dtype(cfg, "float32")
    probs, labels = {"action": [], "reason": []}, {"action": [], "reason": []}
    for batch, valid in evals.host_batches(data[self.role, self.split], feats,
                                           self.batch_size):
      x = {k: batch[k] for k in ("image", "instruction_ids", "instruction_mask", "actions",
                                 "reasons", "action_mask", "reason_mask")}
      x["valid"] = valid.astype(np.int32)
      x = place(x) if place else x
      action, reason = probabilities(cfg, params, x["image"], x["instruction_ids"],
                                     x["instruction_mask"], keep)
      valid = evals.gather(x["valid"]) > 0
      # Labels only where the dataset has them (nuScenes-Drive has no explanations, and no
      # actions for the frames DriveLM asks about in a scene's last 3 s).
      rows = {kind: valid & (evals.gather(x[f"{kind}_mask"]) > 0)
              for kind in ("action", "reason")}
      for kind, p in (("action", action), ("reason", reason)):
        probs[kind].append(evals.gather(p)[rows[kind]])
        labels[kind].append(evals.gather(x[f"{kind}s"])[rows[kind]])
    out = {}
    for kind in ("action", "reason"):
      p, y = np.concatenate(probs[kind]), np.concatenate(labels[kind])
      if not len(y):
        continue
      out.update(metrics.multilabel(kind, p, y))
      out[f"{kind}_F1_official"] = metrics.official_f1(p, y, self.official_batch_size)
    return out
