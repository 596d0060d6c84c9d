"""Prompt/answer tokenization with HF `tokenizers` from a local `tokenizer.json`.

A sequence is `<bos> <image> x N <instruction> <answer> <eos> <pad>...` (right-padded to
`max_len`); `targets` are the next tokens and `loss_mask` covers the answer and `<eos>`.
"""
import os

import numpy as np
from tokenizers import Tokenizer

SPECIAL = ("<pad>", "<bos>", "<eos>", "<image>")


class TextTokenizer:

  def __init__(self, path: str):
    if not os.path.exists(path):
      raise FileNotFoundError(f"tokenizer {path} not found (the sim writes one: "
                              f"python -m drivlm_jax.sim ... --out DIR -> DIR/tokenizer.json)")
    self.tokenizer = Tokenizer.from_file(path)
    ids = {t: self.tokenizer.token_to_id(t) for t in SPECIAL}
    missing = [t for t, i in ids.items() if i is None]
    if missing:
      raise ValueError(f"{path}: special tokens {missing} missing from the vocabulary")
    self.pad_id, self.bos_id, self.eos_id, self.image_id = (ids[t] for t in SPECIAL)
    self.vocab_size = self.tokenizer.get_vocab_size()

  def encode(self, text: str) -> list:
    return self.tokenizer.encode(text, add_special_tokens=False).ids

  def decode(self, ids) -> str:
    return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)

  def sequence(self, instruction: str, answer: str, num_image_tokens: int, max_len: int):
    """-> dict of int32 [max_len] `input_ids`, `targets`, `attention_mask` and float32
    `loss_mask`. The answer is truncated (never the image tokens) when too long."""
    prompt = [self.bos_id] + [self.image_id] * num_image_tokens + self.encode(instruction)
    answer_ids = self.encode(answer) + [self.eos_id]
    room = max_len + 1 - len(prompt)
    if room < 2:
      raise ValueError(f"max_len {max_len} leaves no room for an answer after "
                       f"{len(prompt)} prompt tokens")
    tokens = prompt + answer_ids[:room]
    n = len(tokens) - 1
    input_ids = np.full(max_len, self.pad_id, np.int32)
    targets = np.full(max_len, self.pad_id, np.int32)
    input_ids[:n], targets[:n] = tokens[:-1], tokens[1:]
    loss_mask = np.zeros(max_len, np.float32)
    loss_mask[len(prompt) - 1:n] = 1.0
    attention_mask = (np.arange(max_len) < n).astype(np.int32)
    return {"input_ids": input_ids, "targets": targets, "loss_mask": loss_mask,
            "attention_mask": attention_mask}
