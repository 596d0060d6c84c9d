"""Prompts from a checkpoint's own tokenizer and chat template equal what transformers'
LlavaProcessor + apply_chat_template produce; the loss covers exactly the answer."""
import numpy as np
import pytest

from drivlm_jax.data import tokenizer as tokenizer_lib
from tests import chat

QUESTION, ANSWER = "What should the car do now?", "Stop, the light is red."


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  path = tmp_path_factory.mktemp("llava_tokenizer")
  proc = chat.processor()
  proc.save_pretrained(path)
  return str(path), proc


def _tokens(seq):
  n = int(seq["attention_mask"].sum())
  return list(seq["input_ids"][:n]) + [int(seq["targets"][n - 1])]


def test_sequence_equals_the_llava_processor(checkpoint):
  path, proc = checkpoint
  tok = tokenizer_lib.load(path)
  assert isinstance(tok, tokenizer_lib.ChatTokenizer)
  n_image = 16    # (32 / 8)^2 patches + the class token, dropped by the "default" strategy
  seq = tok.sequence(QUESTION, ANSWER, n_image, max_len=96)
  ours = _tokens(seq)
  full = chat.reference_ids(proc, QUESTION, ANSWER)
  prompt = chat.reference_ids(proc, QUESTION)
  assert full.count(tok.image_id) == n_image
  # The sequence is the processor's, ending at the answer's end-of-turn token.
  assert ours == full[:len(ours)] and ours[-1] == tok.eos_id
  assert tok.decode(full[len(ours):]).strip() == ""
  # The loss covers exactly the answer tokens (and the end-of-turn that closes it).
  answer_targets = seq["targets"][seq["loss_mask"] > 0]
  assert list(answer_targets) == full[len(prompt):len(ours)]
  assert tok.decode(answer_targets[:-1]) == ANSWER
  assert int(np.argmax(seq["loss_mask"] > 0)) + 1 == len(prompt)
  # The prompt alone (what generation starts from) is the processor's generation prompt.
  assert tok.prompt_from_ids(tok.encode(QUESTION), n_image) == prompt


def test_errors_name_the_directory(tmp_path, checkpoint):
  with pytest.raises(FileNotFoundError, match=f"{tmp_path}: no tokenizer files"):
    tokenizer_lib.load(str(tmp_path))
  fast = chat.tokenizer()
  fast.chat_template = None
  fast.save_pretrained(tmp_path / "plain")
  with pytest.raises(ValueError, match="plain: the tokenizer has no chat template"):
    tokenizer_lib.load(str(tmp_path / "plain"))
