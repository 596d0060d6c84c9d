"""DriveLM challenge files and scoring, as OpenDriveLab/DriveLM `challenge/evaluation.py`
reads and scores them (minus its GPT calls, which a pluggable judge replaces).

Test set: {scene: {"key_frames": {frame: {"QA": {"perception"|"prediction"|"planning"|
"behavior": [{"Q", "A", "tag": [...]}]}}}}}. Predictions: [{"id": "<scene>_<frame>_<i>",
"question", "answer"}] with i the QA's index in perception + prediction + planning +
behavior order. The judge (`--judge CMD`) is a command that reads JSON lines
{"question", "answer", "gt"} on stdin and writes one score in [0, 100] per line; without
one, the scores that need it are left out and the output says so.
"""
import json
import shlex
import subprocess

from drivlm_jax import metrics

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


def write_predictions(path: str, test: dict, answers: dict):
  """`drivelm_predictions.json` in the challenge's format; `answers`: {id: answer}, one for
  every QA of `test` (a missing one is an error naming it)."""
  rows = []
  for qa_id, qa in qas(test):
    if qa_id not in answers:
      raise KeyError(f"no answer for {qa_id} ({qa['Q']!r})")
    rows.append({"id": qa_id, "question": qa["Q"], "answer": answers[qa_id]})
  with open(path, "w") as f:
    json.dump(rows, f, indent=1)


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
