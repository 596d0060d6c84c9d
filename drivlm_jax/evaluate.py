r"""Evaluates a run: `python -m drivlm_jax.evaluate --config configs/X.py[:arg] --workdir DIR
[--split test]`. Restores the latest checkpoint of DIR and writes DIR/eval.json:
{split: {"source"|"target": {action_mAP, action_mF1, action_F1_all, reason_mAP, ...,
BLEU-1..4, ROUGE-L, CIDEr, accuracy}}} in points (0-100), and prints it as a table.

The heads see `config.eval.keep_ratio` of the visual tokens (default all); with
`config.eval.pruned_keep_ratio` > 0 the target split is evaluated once more as the deployed
student runs, pruned to that ratio ("target_pruned"). Generated answers use every visual token
(the LM's prompt holds them all).
"""
import functools
import json
import os

import jax
import numpy as np
from absl import app, flags, logging

from drivlm_jax import checkpoints, metrics
from drivlm_jax.data import pipeline
from drivlm_jax.data.tokenizer import TextTokenizer
from drivlm_jax.model import vlm


@functools.partial(jax.jit, static_argnums=(0, 5))
def _heads(cfg, params, images, instruction_ids, instruction_mask, keep_ratio=1.0):
  out = vlm.encode_image(cfg, params, images, instruction_ids, instruction_mask, keep_ratio)
  return jax.nn.sigmoid(out["action_logits"]), jax.nn.sigmoid(out["reason_logits"])


_generate = jax.jit(vlm.generate, static_argnums=0,
                    static_argnames=("max_new_tokens", "eos_token_id", "pad_token_id"))


def _answers(cfg, params, batch, tokenizer, n, max_new_tokens):
  """Greedy answers for the first `n` examples that have one; -> (hypotheses, references)."""
  rows = [i for i in range(len(batch["loss_mask"])) if batch["loss_mask"][i].any()][:n]
  if not rows:
    return [], []
  lengths = [int(np.argmax(batch["loss_mask"][i] > 0)) + 1 for i in rows]
  width = max(lengths)
  ids = np.full((len(rows), width), tokenizer.pad_id, np.int32)
  mask = np.zeros((len(rows), width), np.int32)
  for j, (i, n_prompt) in enumerate(zip(rows, lengths)):
    ids[j, width - n_prompt:] = batch["input_ids"][i, :n_prompt]
    mask[j, width - n_prompt:] = 1
  tokens = np.asarray(_generate(cfg, params, batch["image"][rows], ids,
                                max_new_tokens=max_new_tokens,
                                instruction_ids=batch["instruction_ids"][rows],
                                instruction_mask=batch["instruction_mask"][rows],
                                attention_mask=mask, eos_token_id=tokenizer.eos_id,
                                pad_token_id=tokenizer.pad_id))[:, width:]
  hyps = [tokenizer.decode(t[:list(t).index(tokenizer.eos_id)] if tokenizer.eos_id in t else t)
          for t in tokens]
  refs = [[tokenizer.decode(batch["targets"][i][batch["loss_mask"][i] > 0])] for i in rows]
  return hyps, refs


def evaluate_domain(config, cfg, params, spec, feats, keep_ratio=None,
                    num_generate=None) -> dict:
  tokenizer = TextTokenizer(feats.tokenizer)
  probs, labels, hyps, refs = {"action": [], "reason": []}, {"action": [], "reason": []}, [], []
  keep = config.eval.get("keep_ratio", 1.0) if keep_ratio is None else keep_ratio
  num_generate = config.eval.num_generate if num_generate is None else num_generate
  if keep < 1.0 and not cfg.reweight:
    logging.warning("eval.keep_ratio=%s ignored: the model has no instruction reweighting to "
                    "prune by (model.reweight=False); evaluating every token", keep)
    keep = 1.0
  for batch in pipeline.batches(spec, feats, config.eval.batch_size, train=False,
                                shard_index=0, shard_count=1):
    action, reason = _heads(cfg, params, batch["image"], batch["instruction_ids"],
                            batch["instruction_mask"], keep)
    probs["action"].append(np.asarray(action))
    probs["reason"].append(np.asarray(reason))
    labels["action"].append(batch["actions"])
    labels["reason"].append(batch["reasons"])
    if len(hyps) < num_generate:
      h, r = _answers(cfg, params, batch, tokenizer, num_generate - len(hyps),
                      config.eval.max_new_tokens)
      hyps, refs = hyps + h, refs + r
  out = {}
  for kind in ("action", "reason"):
    out.update(metrics.multilabel(kind, np.concatenate(probs[kind]),
                                  np.concatenate(labels[kind])))
  if hyps:
    out.update(metrics.language(hyps, refs))
  return out


def run(config, cfg, params, data, feats, workdir, step=None, split="test") -> dict:
  """Evaluates source and target `split`, writes workdir/eval.json, prints a table."""
  result = {split: {role: evaluate_domain(config, cfg, params, data[role, split], feats)
                    for role in ("source", "target")}}
  pruned = config.eval.get("pruned_keep_ratio", 0.0)
  if pruned and cfg.reweight:   # the deployed student: heads on the kept tokens only
    result[split]["target_pruned"] = evaluate_domain(config, cfg, params, data["target", split],
                                                     feats, keep_ratio=pruned, num_generate=0)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "eval.json"), "w") as f:
      json.dump({**result, "step": step}, f, indent=1)
    print(format_table(result, step))
  return result


def format_table(result, step=None) -> str:
  lines = []
  for split, domains in result.items():
    names = list(next(iter(domains.values())))
    lines.append(f"eval {split}" + (f" @ step {step}" if step is not None else ""))
    lines.append(f"{'domain':13s} " + " ".join(f"{n:>13s}" for n in names))
    for domain, values in domains.items():
      lines.append(f"{domain:13s} " + " ".join(f"{values[n]:13.1f}" if n in values
                                              else f"{'-':>13s}" for n in names))
  return "\n".join(lines)


def main(argv):
  del argv
  from drivlm_jax import train
  from drivlm_jax.data import sources
  config, workdir = flags.FLAGS.config, flags.FLAGS.workdir
  if config is None or workdir is None:
    raise app.UsageError("--config and --workdir are required")
  cfg = train.model_config(config)
  data = sources.prepare(config.data, workdir)
  feats = train.features(config, cfg, data["tokenizer"])
  try:
    params, step = checkpoints.load_params(workdir, cfg)
  except checkpoints.RunError as e:
    raise app.UsageError(str(e)) from None
  run(config, cfg, params, data, feats, workdir, step, flags.FLAGS.split)


if __name__ == "__main__":
  from drivlm_jax import train as _train
  _train.define_flags()
  flags.DEFINE_string("split", "test", "Split to evaluate.")
  app.run(main)
