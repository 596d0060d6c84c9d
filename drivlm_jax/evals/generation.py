"""Language metrics of the LM's greedy answers (BLEU-1..4, ROUGE-L, CIDEr as DriveLM's
challenge computes them, and exact-match accuracy: `metrics.language`) on the first `num`
examples of one role and split that have a reference answer. The slow evaluator: give it its
own `every`."""
import dataclasses

import jax
import numpy as np

from drivlm_jax import evals, metrics
from drivlm_jax.data import pipeline
from drivlm_jax.data import tokenizer as tokenizer_lib
from drivlm_jax.model import vlm

_generate = jax.jit(vlm.generate, static_argnums=0,
                    static_argnames=("max_new_tokens", "eos_token_id", "pad_token_id"))


def generate(cfg, params, images, input_ids, **kwargs):
  """`vlm.generate`, jitted, its prompts' image placeholders checked on the host first."""
  vlm.check_image_tokens(cfg, input_ids)
  return _generate(cfg, params, images, input_ids, **kwargs)


def answers(cfg, params, batch, tokenizer, n, max_new_tokens):
  """Greedy answers for the first `n` examples of `batch` that have one;
  -> (hypotheses, references)."""
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
  tokens = np.asarray(generate(cfg, params, batch["image"][rows], ids,
                                max_new_tokens=max_new_tokens,
                                instruction_ids=batch["instruction_ids"][rows],
                                instruction_mask=batch["instruction_mask"][rows],
                                attention_mask=mask, eos_token_id=tokenizer.stop_ids,
                                pad_token_id=tokenizer.pad_id))[:, width:]
  hyps = [tokenizer.decode(tokenizer.cut(t)) for t in tokens]
  refs = [tokenizer.decode(batch["targets"][i][batch["loss_mask"][i] > 0]) for i in rows]
  return hyps, refs


@evals.register("generation")
@dataclasses.dataclass(frozen=True)
class Generation(evals.Evaluator):
  num: int = 16              # examples to answer
  max_new_tokens: int = 32

  def run(self, cfg, params, data, feats, place=None, workdir=None) -> dict:
    """Every host answers the same first `num` examples (inputs replicated)."""
    del place, workdir
    tokenizer = tokenizer_lib.load(feats.tokenizer)
    hyps, refs = [], []
    if self.num > 0:
      ds = pipeline.batch_dataset(data[self.role, self.split], feats, self.batch_size,
                                  train=False, shard_index=0, shard_count=1)
      for i in range(len(ds)):   # only the batches it needs are read
        batch = ds[i]
        h, r = answers(cfg, params, batch, tokenizer, self.num - len(hyps), self.max_new_tokens)
        hyps, refs = hyps + h, refs + r
        if len(hyps) >= self.num:
          break
    return metrics.language(hyps, refs) if hyps else {}
