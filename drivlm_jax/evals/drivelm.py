"""DriveLM challenge files and scoring, as OpenDriveLab/DriveLM `challenge/evaluation.py`
reads and scores them (minus its GPT calls, which a pluggable judge replaces).

Test set: {scene: {"key_frames": {frame: {"QA": {"perception"|"prediction"|"planning"|
"behavior": [{"Q", "A", "tag": [...]}]}}}}}. Predictions: [{"id": "<scene>_<frame>_<i>",
"question", "answer"}] with i the QA's index in perception + prediction + planning +
behavior order. The judge (`--judge CMD`) is a command that reads JSON lines
{"question", "answer", "gt"} on stdin and writes one score in [0, 100] per line; without
one, the scores that need it are left out and the output says so.
"""
import dataclasses
import json
import shlex
import subprocess

import jax
import numpy as np
from absl import logging

from drivlm_jax import evals, metrics, run as run_lib
from drivlm_jax.data import pipeline, tokenizer as tokenizer_lib
from drivlm_jax.evals import generation

STAGES = ("perception", "prediction", "planning", "behavior")


def qas(test: dict):
  """-> [(id, qa dict)] of every QA of the test set, frames in file order, in the
  challenge's order within a frame."""
  out = []
  for scene_id, scene in test.items():
    for frame_id, frame in scene["key_frames"].items():
      ordered = [qa for stage in STAGES for qa in frame["QA"].get(stage, [])]
      out += [(f"{scene_id}_{frame_id}_{i}", qa) for i, qa in enumerate(ordered)]
  return out


def check_scorable(test: dict, where: str):
  """A ValueError naming `where` unless some QA of `test` carries a challenge tag."""
  if not any(qa["tag"] for _, qa in qas(test)):
    frames = sum(len(scene["key_frames"]) for scene in test.values())
    raise ValueError(f"{where}: no QA to score in {frames} frame(s) (a released "
                     f"DriveLM-nuScenes file with answers, *_nus.json, or one in the "
                     f"challenge's test_eval.json form)")


def with_answers(test: dict, where: str):
  """`test` without the frames whose answers are all empty (a questions-only file such as
  the challenge's v1_1_val_nus_q_only.json: its server holds them), saying how many it left
  out; None when no frame is left."""
  kept, dropped = {}, 0
  for scene_id, scene in test.items():
    for frame_id, frame in scene["key_frames"].items():
      if any(qa["A"] for stage in frame["QA"].values() for qa in stage):
        kept.setdefault(scene_id, {"key_frames": {}})["key_frames"][frame_id] = frame
      else:
        dropped += 1
  if dropped:
    logging.warning("%s: %d frame(s) without answers (questions only) are not scored",
                    where, dropped)
  return kept or None


def write_predictions(path, test: dict, answers: dict) -> list:
  """`drivelm_predictions.json` in the challenge's format (a local or bucket path; None:
  not written) -> its rows; `answers`: {id: answer}, one for every QA of `test` (a missing
  one is an error naming it)."""
  rows = []
  for qa_id, qa in qas(test):
    if qa_id not in answers:
      raise KeyError(f"no answer for {qa_id} ({qa['Q']!r})")
    rows.append({"id": qa_id, "question": qa["Q"], "answer": answers[qa_id]})
  if path is not None:
    run_lib.write_json(run_lib.path(str(path)), rows)
  return rows


def judge_command(command: str):
  """A judge from a shell command: JSON lines {"question", "answer", "gt"} in, one score
  (0-100) per line out."""
  def judge(items: list) -> list:
    lines = "".join(json.dumps(item) + "\n" for item in items)
    done = subprocess.run(shlex.split(command), input=lines, capture_output=True, text=True,
                          check=False)
    if done.returncode:
      raise RuntimeError(f"judge {command!r} failed ({done.returncode}): {done.stderr[-500:]}")
    scores = [float(s) for s in done.stdout.split()]
    if len(scores) != len(items):
      raise RuntimeError(f"judge {command!r} gave {len(scores)} scores for {len(items)} items")
    return scores
  return judge


def score(test: dict, predictions: list, judge=None) -> dict:
  """The challenge's scores of `predictions` on `test` (`metrics.drivelm`), and with a
  `judge`, its GPT score, match = (F1 + GPT) / 2 and the final score."""
  answers = {p["id"]: p["answer"] for p in predictions}
  frames, current, judged = [], None, {"gpt": [], "match": []}
  for qa_id, qa in qas(test):
    frame = qa_id.rsplit("_", 1)[0]
    if frame != current:
      frames.append([])
      current = frame
    if qa_id not in answers:
      raise KeyError(f"predictions: no answer for {qa_id} ({qa['Q']!r})")
    frames[-1].append({"question": qa["Q"], "gt": qa["A"], "answer": answers[qa_id],
                       "tag": qa["tag"]})
  out = metrics.drivelm(frames)
  if judge is None:
    out["note"] = ("no judge: the GPT score (0.4 of the final) and the GPT half of match "
                   "(0.1) are not computed; final_without_judge is out of 0.5")
    return out
  for qa in metrics.drivelm_counted(frames):
    item = {"question": qa["question"], "answer": qa["answer"], "gt": qa["gt"]}
    if 1 in qa["tag"]:
      judged["gpt"].append(item)
    if 3 in qa["tag"]:
      judged["match"].append(item)
  mean = lambda xs: sum(xs) / len(xs) if xs else None
  out["gpt"] = mean(judge(judged["gpt"])) if judged["gpt"] else None
  gpt_match = mean(judge(judged["match"])) if judged["match"] else None
  out["match"] = (None if out["match_F1"] is None or gpt_match is None
                  else (out["match_F1"] + gpt_match) / 2)
  parts = (out["gpt"], out.get("language_score"), out["match"], out["accuracy"])
  out["final"] = (None if None in parts else
                  0.4 * parts[0] / 100 + 0.2 * parts[1] + 0.2 * parts[2] / 100 + 0.2 * parts[3])
  return out


#### The evaluator: every QA of every test frame answered, the challenge's file, its scores


@evals.register("drivelm")
@dataclasses.dataclass(frozen=True)
class DriveLM(evals.Evaluator):
  """Answers the DriveLM challenge's test questions of each frame of the split (greedy, in
  the challenge's order, from the frame's cameras as the model takes them): the tagged QAs of
  a QA file that carries the challenge's tags, else those the challenge's scripts pick from a
  released file (`drivelm_questions`, multiple choice included). Writes
  `<workdir>/drivelm_predictions.json` in the challenge's format and scores it as the
  challenge does without a judge (`score`): in points, "drivelm_accuracy",
  "drivelm_language" (its language score x 100), "drivelm_match_F1" and
  "drivelm_final_without_judge" (x 100, out of 50). A split with nothing to score is an
  error. Every host answers every QA (inputs replicated); `num_frames` > 0 takes the first
  frames only. `max_new_tokens` is the challenge baseline's budget (LLaMA-Adapter's
  `max_gen_len`): a frame's first answer must reach its c-tags (60-100 tokens into the
  challenge's own reference answers) for the graph rule to count the questions after it, so
  a shorter budget loses questions, not only words (the decode is a fixed-length scan: 256
  steps cost about 5x 48). "drivelm_asked" and "drivelm_counted" say how many QAs of the
  scored frames were asked and how many of them the graph rule scored."""
  max_new_tokens: int = 256
  num_frames: int = 0

  def run(self, cfg, params, data, feats, place=None, workdir=None) -> dict:
    del place
    tok = tokenizer_lib.load(feats.tokenizer)
    source, indices = pipeline.open_source(data[self.role, self.split])
    if self.num_frames:
      indices = indices[:self.num_frames]
    test, rows = {}, []       # rows: (qa id, image, prompt ids, instruction ids)
    for i in indices:
      example = source[int(i)]
      scene = pipeline.as_text(example["scene_token"])
      frame = pipeline.as_text(example["sample_token"])
      stages = pipeline.frame_test_questions(example, f"{self.split} frame {scene}_{frame}")
      image = pipeline.model_images(example, feats)[0]
      ordered = [qa["Q"] for stage in STAGES for qa in stages.get(stage, [])]
      for k, question in enumerate(ordered):
        prompt = tok.parts(question, "", feats.num_image_tokens)[0]
        rows.append((f"{scene}_{frame}_{k}", image, prompt,
                     tok.encode(question)[:feats.max_instruction_len]))
      test.setdefault(scene, {"key_frames": {}})["key_frames"][frame] = {"QA": stages}
    where = f"DriveLM evaluation of the {self.role} {self.split} split"
    check_scorable(test, where)
    answers = dict(zip([r[0] for r in rows], self._answer(cfg, params, tok, feats, rows)))
    out = (run_lib.path(workdir, "drivelm_predictions.json")
           if workdir is not None and jax.process_index() == 0 else None)
    predictions = write_predictions(out, test, answers)
    scorable = with_answers(test, where)
    if scorable is None:   # answers for the challenge's server only
      logging.warning("%s: %d answers written to %s, nothing to score", where,
                      len(predictions), out or "the workdir of process 0")
      return {}
    scores = score(scorable, predictions)
    points = lambda v, scale=100.0: None if v is None else scale * v
    return {k: v for k, v in {
        "drivelm_accuracy": points(scores["accuracy"]),
        "drivelm_language": points(scores.get("language_score")),
        "drivelm_match_F1": scores["match_F1"],
        "drivelm_final_without_judge": points(scores["final_without_judge"]),
        "drivelm_asked": len(qas(scorable)), "drivelm_counted": scores["counted"]["all"]}.items()
            if v is not None}

  def _answer(self, cfg, params, tok, feats, rows) -> list:
    """Greedy answers of `rows`, batch by batch, prompts left-padded to one width."""
    width = max(len(r[2]) for r in rows)
    out = []
    for start in range(0, len(rows), self.batch_size):
      chunk = rows[start:start + self.batch_size]
      ids = np.full((len(chunk), width), tok.pad_id, np.int32)
      mask = np.zeros_like(ids)
      instruction = np.full((len(chunk), feats.max_instruction_len), tok.pad_id, np.int32)
      instruction_mask = np.zeros_like(instruction)
      for j, (_, _, prompt, instr) in enumerate(chunk):
        ids[j, width - len(prompt):], mask[j, width - len(prompt):] = prompt, 1
        instruction[j, :len(instr)], instruction_mask[j, :len(instr)] = instr, 1
      tokens = np.asarray(generation.generate(
          cfg, params, np.stack([r[1] for r in chunk]), ids, max_new_tokens=self.max_new_tokens,
          instruction_ids=instruction, instruction_mask=instruction_mask,
          attention_mask=mask, eos_token_id=tok.stop_ids,
          pad_token_id=tok.pad_id))[:, width:]
      out += [tok.decode(tok.cut(t)) for t in tokens]
    return out
