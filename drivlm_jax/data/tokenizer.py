"""Prompt/answer tokenization: the sim's own `tokenizer.json` (HF `tokenizers`), or a
checkpoint's own tokenizer and chat template (transformers, offline). `load` picks by path.

A sequence is `prompt answer <pad>...` (right-padded to `max_len`); `targets` are the next
tokens and `loss_mask` covers exactly the answer tokens (with the end token that closes it).
The sim's prompt is `<bos> <image> x N <instruction>` and its answer `<answer> <eos>`; a
checkpoint's is its chat template's user turn (image, then instruction) with the generation
prompt, the image placeholder expanded to the model's N visual tokens as HF's LLaVA
processor does, and the answer is the assistant's reply up to its end-of-turn token.
"""
import os

import numpy as np
from tokenizers import Tokenizer

SPECIAL = ("<pad>", "<bos>", "<eos>", "<image>")
# Tokenized (instruction, answer) sequences a tokenizer keeps (about 25 MB at max_len 384).
SEQUENCES_KEPT = 4096
# A checkpoint's image placeholder when its processor names none: LLaVA's, then Qwen2's.
IMAGE_TOKENS = ("<image>", "<|image_pad|>")


class _Tokenizer:
  """What the pipeline, evaluation and export use: pad/eos/image ids, vocab_size, encode,
  decode, and the layout of prompt + answer in `sequence`."""
  pad_id: int
  eos_id: int
  image_id: int
  vocab_size: int

  @property
  def stop_ids(self) -> tuple:
    """The ids that end an answer (generation stops at the first): eos, and a chat
    template's own end of turn (`<|im_end|>`, `<|eot_id|>`) where it has one."""
    return (self.eos_id,)

  def cut(self, ids) -> list:
    """Generated ids up to (without) the first stop id."""
    ids = [int(i) for i in ids]
    return ids[:next((i for i, t in enumerate(ids) if t in self.stop_ids), len(ids))]

  def encode(self, text: str) -> list:
    raise NotImplementedError

  def decode(self, ids) -> str:
    raise NotImplementedError

  def parts(self, instruction: str, answer: str, num_image_tokens: int) -> tuple:
    """-> (prompt ids, answer ids) of one example."""
    raise NotImplementedError

  def vocab(self) -> dict:
    """token -> id: two tokenizers with the same vocab give the LM the same ids."""
    return self.tokenizer.get_vocab()

  def prompt_from_ids(self, instruction_ids, num_image_tokens: int) -> list:
    """The prompt for the (unpadded) instruction ids, as `parts` builds it."""
    return self.parts(self.decode(instruction_ids), "", num_image_tokens)[0]

  def sequence(self, instruction: str, answer: str, num_image_tokens: int, max_len: int):
    """-> dict of int32 [max_len] `input_ids`, `targets`, `attention_mask` and float32
    `loss_mask` (read-only arrays). The answer is truncated (never the image tokens) when too
    long. Pairs repeat (BDD-OIA's answers are explanations of its labels, DriveLM's questions
    recur): the first `SEQUENCES_KEPT` are kept, so each is tokenized (a chat template
    rendered) once per process."""
    key = (instruction, answer, num_image_tokens, max_len)
    kept = self.__dict__.setdefault("_sequences", {})
    if key in kept:
      return dict(kept[key])
    out = self._sequence(instruction, answer, num_image_tokens, max_len)
    for array in out.values():
      array.flags.writeable = False
    if len(kept) < SEQUENCES_KEPT:
      kept[key] = out
    return dict(out)

  def _sequence(self, instruction, answer, num_image_tokens, max_len):
    prompt, answer_ids = self.parts(instruction, answer, num_image_tokens)
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


class TextTokenizer(_Tokenizer):
  """The sim's byte-level BPE `tokenizer.json` with `<pad> <bos> <eos> <image>`."""

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

  def parts(self, instruction, answer, num_image_tokens):
    prompt = [self.bos_id] + [self.image_id] * num_image_tokens + self.encode(instruction)
    return prompt, self.encode(answer) + [self.eos_id]

  def prompt_from_ids(self, instruction_ids, num_image_tokens):
    return [self.bos_id] + [self.image_id] * num_image_tokens + [int(i) for i in instruction_ids]


class ChatTokenizer(_Tokenizer):
  """A checkpoint directory's own tokenizer and chat template, read offline with
  transformers (`AutoProcessor` when the directory has a processor, else `AutoTokenizer`).
  The image placeholder is the processor's `image_token` (`<image>` without one)."""

  def __init__(self, path: str):
    import transformers
    processor = None
    if any(os.path.exists(os.path.join(path, f)) for f in ("processor_config.json",
                                                          "preprocessor_config.json")):
      processor = transformers.AutoProcessor.from_pretrained(path, local_files_only=True)
    self.tokenizer = (processor.tokenizer if processor is not None
                      else transformers.AutoTokenizer.from_pretrained(path, local_files_only=True))
    self.template = getattr(processor, "chat_template", None) or self.tokenizer.chat_template
    if not self.template:
      raise ValueError(f"{path}: the tokenizer has no chat template (chat_template.jinja, "
                       f"chat_template.json or tokenizer_config.json 'chat_template')")
    vocab = self.tokenizer.get_vocab()
    candidates = [getattr(processor, "image_token", None)] + list(IMAGE_TOKENS)
    self.image_token = next((t for t in candidates if t in vocab), None)
    if self.image_token is None:
      raise ValueError(f"{path}: no image token in the tokenizer's vocabulary (tried "
                       f"{[t for t in candidates if t]}); add one (tokenizer.add_tokens) and "
                       f"resize the LM's embeddings")
    self.image_id = vocab[self.image_token]
    self.eos_id = self.tokenizer.eos_token_id
    if self.eos_id is None:
      raise ValueError(f"{path}: the tokenizer has no eos_token (the end of an answer)")
    pad = self.tokenizer.pad_token_id
    self.pad_id = self.eos_id if pad is None else pad
    self.vocab_size = len(self.tokenizer)
    self.path = path
    # A prompt depends on the instruction only, and instructions repeat (DriveLM's questions,
    # the default instruction): each is rendered once (a dict: grain workers pickle this).
    self._prompts = {}
    special = set(self.tokenizer.all_special_ids) | {
        i for i, t in self.tokenizer.added_tokens_decoder.items() if t.special}
    # The template's end of turn: the first special token after an answer's text (none in
    # LLaVA-1.5's "ASSISTANT: answer", where the answer ends with eos as LLaVA trains it).
    # The text starts where two answers' renderings part (a special token before it, e.g. a
    # thinking block or an assistant header, is not the end of the turn).
    one, two = (self._render("x", a, 1) for a in ("Stop.", "Turn left, the lane is free."))
    start = next((i for i, (a, b) in enumerate(zip(one, two)) if a != b), len(one))
    turn = next((t for t in one[start:] if t in special), self.eos_id)
    self._stop_ids = tuple(dict.fromkeys((self.eos_id, turn)))

  @property
  def stop_ids(self) -> tuple:
    return self._stop_ids

  def encode(self, text: str) -> list:
    return self.tokenizer.encode(text, add_special_tokens=False)

  def decode(self, ids) -> str:
    return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)

  def _render(self, instruction, answer, num_image_tokens) -> list:
    # Multimodal templates (LLaVA's) take typed content; text-only ones (an LM's own, e.g.
    # Qwen2's, which raises on a list) take a string, where the image goes first as LLaVA-1.5
    # puts it: "<image>\n{instruction}".
    import jinja2
    counts = []
    for user, reply in (([{"type": "image"}, {"type": "text", "text": instruction}],
                         [{"type": "text", "text": answer}]),
                        (f"{self.image_token}\n{instruction}", answer)):
      messages = [{"role": "user", "content": user}]
      if answer is not None:
        messages.append({"role": "assistant", "content": reply})
      try:
        text = self.tokenizer.apply_chat_template(messages, chat_template=self.template,
                                                  tokenize=False,
                                                  add_generation_prompt=answer is None)
      except (TypeError, jinja2.TemplateError) as e:
        counts.append(f"{type(e).__name__}: {e}")
        continue
      counts.append(text.count(self.image_token))
      if counts[-1] == 1:
        break
    else:
      raise ValueError(f"{self.path}: the chat template does not write one image token "
                       f"{self.image_token!r} for one image (typed content, then a string: "
                       f"{counts})")
    # As the LLaVA processor: the placeholder becomes one token per visual token, and the
    # text is tokenized with the tokenizer's own special tokens unless the template wrote
    # the bos itself (transformers' ProcessorMixin.apply_chat_template: no second bos).
    bos = self.tokenizer.bos_token
    return self.tokenizer(text.replace(self.image_token, self.image_token * num_image_tokens),
                          add_special_tokens=not (bos and text.startswith(bos)))["input_ids"]

  def parts(self, instruction, answer, num_image_tokens):
    key = (instruction, num_image_tokens)
    if key not in self._prompts:
      self._prompts[key] = self._render(instruction, None, num_image_tokens)
    prompt = list(self._prompts[key])
    if not answer:
      return prompt, [self.eos_id]
    full = self._render(instruction, answer, num_image_tokens)
    if full[:len(prompt)] != prompt:
      raise ValueError(f"{self.path}: the chat template's answer does not extend its "
                       f"generation prompt; cannot tell the answer tokens apart")
    reply = full[len(prompt):]
    # The answer ends at its end of turn (what the template writes after it, a newline, is
    # not learned); a template without one (LLaVA-1.5) gets eos after the answer's text.
    end = next((i for i, t in enumerate(reply) if t in self.stop_ids), None)
    if end is not None:
      return prompt, reply[:end + 1]
    while reply and not self.tokenizer.decode(reply[-1:]).strip():
      reply = reply[:-1]
    return prompt, reply + [self.eos_id]


def has_tokenizer(directory: str) -> bool:
  return any(os.path.exists(os.path.join(directory, f)) for f in (
      "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json"))


def load(path: str) -> _Tokenizer:
  """A checkpoint directory -> its `ChatTokenizer`; a `tokenizer.json` file -> the sim's
  `TextTokenizer`."""
  if os.path.isdir(path):
    if not has_tokenizer(path):
      raise FileNotFoundError(f"{path}: no tokenizer files (tokenizer.json, "
                              f"tokenizer_config.json, ...) in the directory")
    return ChatTokenizer(path)
  return TextTokenizer(path)
