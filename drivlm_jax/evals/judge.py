r"""A local LLM as DriveLM's GPT-score judge.

The challenge (`challenge/gpt_eval.py` of OpenDriveLab/DriveLM) asks gpt-3.5-turbo, with the
system message "an evaluator who rates my answer based on the correct answer", to rate each
answer against the ground truth out of 100 and output the number only. This puts the same
messages to a local HF causal LM (an instruct model with a chat template, from a local
directory) and reads the first number of its greedy reply. Scores from another model are not
the challenge's GPT scores: say which judge a figure used.

  python -m drivlm_jax.evaluate ... --drivelm --judge "python -m drivlm_jax.evals.judge --model DIR"

As a command it reads JSON lines {"question", "answer", "gt"} on stdin and writes one score
per line (`drivelm.judge_command`'s protocol). A reply without a number in 0..100 is an
error naming the item: a score is never made up.
"""
import argparse
import json
import re
import sys

SYSTEM = "an evaluator who rates my answer based on the correct answer"
INSTRUCTION = ("Rate my answer based on the correct answer out of 100, with higher scores "
               "indicating that the answer is closer to the correct answer, and you should be "
               "accurate to single digits like 62, 78, 41,etc. Output the number only")


class JudgeError(RuntimeError):
  pass


def messages(answer: str, gt: str) -> list:
  """The challenge's chat for one answer."""
  return [{"role": "system", "content": SYSTEM},
          {"role": "user", "content": f"{INSTRUCTION}This is the correct answer: {gt}"
                                      f"This is my answer: {answer}"}]


def parse_score(reply: str) -> float | None:
  """The first number of `reply` when it lies in 0..100, else None."""
  match = re.search(r"\d+(?:\.\d+)?", reply)
  if match is None or not 0 <= float(match.group()) <= 100:
    return None
  return float(match.group())


def model_judge(path: str, max_new_tokens: int = 8):
  """-> judge(items) -> scores, with the causal LM and tokenizer in directory `path`."""
  import torch
  import transformers
  tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
  model = transformers.AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
  model.eval()
  if not tokenizer.chat_template:
    raise JudgeError(f"{path}: the tokenizer has no chat template; the judge needs an "
                     f"instruct model")

  def judge(items: list) -> list:
    scores = []
    for item in items:
      ids = tokenizer.apply_chat_template(messages(item["answer"], item["gt"]),
                                          add_generation_prompt=True, return_tensors="pt",
                                          return_dict=True)
      with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
      reply = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
      score = parse_score(reply)
      if score is None:
        raise JudgeError(f"judge {path}: no score in 0..100 in its reply {reply!r} to the "
                         f"answer {item['answer']!r} (question {item.get('question', '')!r})")
      scores.append(score)
    return scores
  return judge


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", required=True, help="local HF instruct model directory")
  parser.add_argument("--max_new_tokens", type=int, default=8)
  args = parser.parse_args(argv)
  items = [json.loads(line) for line in sys.stdin if line.strip()]
  for score in model_judge(args.model, args.max_new_tokens)(items):
    print(f"{score:g}")


if __name__ == "__main__":
  main()
