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


LLAMA3_SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                  "<|end_header_id|>", "<|eot_id|>"]


@pytest.mark.parametrize("name,template,special,eos,bos,pad,turn", [
    # LLaMA-3 Instruct: its template writes bos, its tokenizer adds one too.
    ("llama3", chat.LLAMA3, LLAMA3_SPECIAL, "<|eot_id|>", "<|begin_of_text|>", None,
     "<|eot_id|>"),
    # The same template with the base model's eos: the answer still ends at <|eot_id|>.
    ("llama3_base_eos", chat.LLAMA3, LLAMA3_SPECIAL, "<|end_of_text|>", "<|begin_of_text|>",
     None, "<|eot_id|>"),
    # Qwen2 base: string-only template, eos <|endoftext|>, turns end with <|im_end|>.
    ("qwen2", chat.QWEN2, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], "<|endoftext|>",
     None, "<|endoftext|>", "<|im_end|>"),
    # Qwen3-style thinking block before the answer: special tokens that do not end the turn.
    ("thinking", chat.THINKING, ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>",
                                 "</think>"], "<|endoftext|>", None, "<|endoftext|>",
     "<|im_end|>"),
    # LLaVA-1.5: typed content, no end-of-turn token: the answer ends with eos (as LLaVA
    # trains "ASSISTANT: answer</s>").
    ("llava15", chat.LLAVA15, ["<s>", "</s>"], "</s>", "<s>", None, None),
])
def test_checkpoint_templates_give_transformers_tokens(tmp_path, name, template, special, eos,
                                                       bos, pad, turn):
  """The prompt and answer are what transformers makes of the template (one bos, never
  two); the answer ends at the template's end of turn, which generation stops at too."""
  fast = chat.template_tokenizer(str(tmp_path / name), template, special, eos, bos, pad)
  tok = tokenizer_lib.load(str(tmp_path / name))
  seq = tok.sequence(QUESTION, ANSWER, 1, max_len=160)
  ours = _tokens(seq)
  if template == chat.LLAVA15:   # typed content, tokenized as LlavaProcessor does
    text = lambda m, g: fast.apply_chat_template(m, tokenize=False, add_generation_prompt=g)
    ids = lambda m, g=False: fast(text(m, g))["input_ids"]
    user = [{"type": "image"}, {"type": "text", "text": QUESTION}]
    reply = [{"type": "text", "text": ANSWER}]
  else:                          # a text-only LM's template: the tokenizer's own
    ids = lambda m, g=False: list(fast.apply_chat_template(m, tokenize=True, return_dict=False,
                                                           add_generation_prompt=g))
    user, reply = f"<image>\n{QUESTION}", ANSWER
  prompt = ids([{"role": "user", "content": user}], True)
  full = ids([{"role": "user", "content": user}, {"role": "assistant", "content": reply}])
  assert ours[:len(prompt)] == prompt
  if bos:
    assert ours.count(fast.convert_tokens_to_ids(bos)) == 1
  answer = list(seq["targets"][seq["loss_mask"] > 0])
  if turn:
    end = fast.convert_tokens_to_ids(turn)
    assert ours == full[:full.index(end, len(prompt)) + 1] and answer[-1] == end
    assert end in tok.stop_ids
  else:
    assert answer[-1] == tok.eos_id == fast.eos_token_id and tok.stop_ids == (tok.eos_id,)
    assert ours[:-1] == full[:len(ours) - 1]
    assert fast.decode(answer[:-1]).strip() == ANSWER   # no trailing space learned
  assert tok.decode(tok.cut(answer + [7, 8])) == tok.decode(answer[:-1])
