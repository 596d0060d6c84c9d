"""A tiny checkpoint tokenizer with a ChatML chat template and a LLaVA processor, written as
transformers writes them (the independent reference for prompts built from a checkpoint)."""
import numpy as np
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

SPECIAL = ["<unk>", "<pad>", "<|im_start|>", "<|im_end|>", "<image>"]
TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>\n"
    "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CORPUS = ["What should the car do now?", "Stop, the light is red.",
          "Turn left, the lane is free.", "Is there a pedestrian ahead? Yes, one on the right.",
          "user assistant system"]


def tokenizer(vocab_size=160) -> transformers.PreTrainedTokenizerFast:
  tok = Tokenizer(models.BPE(unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(CORPUS * 4, trainers.BpeTrainer(
      vocab_size=vocab_size, special_tokens=SPECIAL,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  fast = transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="<|im_end|>",
      extra_special_tokens={"image_token": "<image>"})
  fast.chat_template = TEMPLATE
  return fast


def processor(image_size=32, patch_size=8, strategy="default"):
  images = transformers.CLIPImageProcessor(
      size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})
  return transformers.LlavaProcessor(
      image_processor=images, tokenizer=tokenizer(), patch_size=patch_size,
      vision_feature_select_strategy=strategy, num_additional_image_tokens=1,
      chat_template=TEMPLATE, image_token="<image>")


def reference_ids(proc, question, answer=None) -> list:
  """What LlavaProcessor + apply_chat_template make of an (image, question[, answer])."""
  messages = [{"role": "user", "content": [{"type": "image"},
                                           {"type": "text", "text": question}]}]
  if answer is not None:
    messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
  text = proc.apply_chat_template(messages, tokenize=False,
                                  add_generation_prompt=answer is None)
  image = np.zeros((proc.image_processor.crop_size["height"],) * 2 + (3,), np.uint8)
  return list(proc(text=text, images=image, return_tensors="np")["input_ids"][0])


# Checkpoints' own templates (as their tokenizer_config.json / chat_template.json write them):
# LLaMA-3 Instruct's (writes bos_token itself; its tokenizer adds bos too), llava-hf's
# LLaVA-1.5 (no end-of-turn token: "USER: <image>\n... ASSISTANT: answer "), and Qwen2's
# (string content only: a list of typed parts raises).
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | "
    "trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}"
    "{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
LLAVA15 = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role']"
    ".upper() + ': '}}{% endif %}{% for content in message['content'] | selectattr('type', "
    "'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}{% if message['role'] != 'assistant' "
    "%}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}{% else %}{% for content in message['content'] | "
    "selectattr('type', 'equalto', 'text') %}{% generation %}{{ content['text'] + ' '}}"
    "{% endgeneration %}{% endfor %}{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "{{ 'ASSISTANT:' }}{% endif %}")
QWEN2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

# Qwen3's shape of an assistant turn: an empty thinking block (special tokens) before the
# answer; the end of turn is still <|im_end|>.
THINKING = QWEN2.replace("message['content'] + '<|im_end|>'",
                         "(('<think>\\n\\n</think>\\n\\n' if message['role'] == 'assistant' "
                         "else '') + message['content']) + '<|im_end|>'")


def template_tokenizer(path, template, special, eos, bos=None, pad=None):
  """A tiny tokenizer with `template`, saved to `path`; with `bos`, it prepends bos to every
  text it tokenizes (as LLaMA-3's and LLaVA-1.5's do)."""
  from tokenizers import processors
  tok = Tokenizer(models.BPE(unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(CORPUS * 4, trainers.BpeTrainer(
      vocab_size=200, special_tokens=["<unk>", "<image>", *special],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  if bos:
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", special_tokens=[(bos, tok.token_to_id(bos))])
  fast = transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, unk_token="<unk>", bos_token=bos, eos_token=eos, pad_token=pad)
  fast.chat_template = template
  fast.save_pretrained(path)
  return fast


def clip_tokenizer(path) -> transformers.PreTrainedTokenizerFast:
  """A CLIP-style tokenizer (<|startoftext|> ... <|endoftext|>, padded with <|endoftext|>),
  saved to `path`."""
  from tokenizers import processors
  tok = Tokenizer(models.BPE(unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(CORPUS * 4, trainers.BpeTrainer(
      vocab_size=300, special_tokens=["<unk>", "<|startoftext|>", "<|endoftext|>"],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  tok.post_processor = processors.TemplateProcessing(
      single="<|startoftext|> $A <|endoftext|>",
      special_tokens=[("<|startoftext|>", 1), ("<|endoftext|>", 2)])
  fast = transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, unk_token="<unk>", bos_token="<|startoftext|>",
      eos_token="<|endoftext|>", pad_token="<|endoftext|>")
  fast.save_pretrained(path)
  return fast
