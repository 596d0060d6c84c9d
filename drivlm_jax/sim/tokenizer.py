"""A byte-level BPE tokenizer trained on the sim's own text (no download), saved as
`tokenizer.json` next to the data; the input pipeline loads it with HF `tokenizers`."""
import os

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<image>")   # ids 0..3
VOCAB_SIZE = 512


def corpus():
  """Every sentence the sim can produce, from a sweep of scenes."""
  import numpy as np
  from drivlm_jax.sim import labels, scene as scene_lib
  from drivlm_jax.sim.nuscenes import _BEHAVIOUR
  lines = list(_BEHAVIOUR.values()) + list(labels._INSTRUCTIONS)
  for i in range(400):
    rng = np.random.default_rng([12345, i])
    scene = scene_lib.sample_scene(rng)
    actions, reasons = labels.actions_and_reasons(scene)
    lines.append(labels.explanation(actions, reasons))
    for pairs in labels.qa_pairs(scene, actions, reasons).values():
      lines += [p["Q"] + " " + p["A"] for p in pairs]
  return lines


def train(vocab_size=VOCAB_SIZE) -> Tokenizer:
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=False)
  tok.train_from_iterator(corpus(), trainer)
  return tok


def write(out: str) -> str:
  path = os.path.join(out, "tokenizer.json")
  if not os.path.exists(path):
    os.makedirs(out, exist_ok=True)
    train().save(path)
  return path
