"""DriveLM's challenge/extract_data.py and challenge/convert_data.py (OpenDriveLab/DriveLM),
step for step on the same dicts they mutate, as the reference our test-question picking is
checked against (one change: the multiple-choice draws take an explicit `random.Random`,
where the scripts use the unseeded module, so that both sides can draw the same); and
challenge/evaluation.py's loop that decides which QAs it scores."""
import copy
import json
import re

import numpy as np

MOVING = ["Going ahead.", "Turn right.", "Turn left.", "Stopped.", "Back up.",
          "Reverse parking.", "Drive backward."]   # rule_based1's list at DriveLM 1de72a7
BEHAVIOURS = [  # convert_data.py's rule_based2 list, in its order
    "The ego vehicle is slightly steering to the left. The ego vehicle is driving very fast.",
    "The ego vehicle is steering to the left. The ego vehicle is driving with normal speed.",
    "The ego vehicle is steering to the left. The ego vehicle is driving fast.",
    "The ego vehicle is slightly steering to the right. The ego vehicle is driving fast.",
    "The ego vehicle is going straight. The ego vehicle is driving slowly.",
    "The ego vehicle is going straight. The ego vehicle is driving with normal speed.",
    "The ego vehicle is slightly steering to the left. The ego vehicle is driving with normal "
    "speed.",
    "The ego vehicle is slightly steering to the left. The ego vehicle is driving slowly.",
    "The ego vehicle is slightly steering to the right. The ego vehicle is driving slowly.",
    "The ego vehicle is slightly steering to the right. The ego vehicle is driving very fast.",
    "The ego vehicle is steering to the right. The ego vehicle is driving fast.",
    "The ego vehicle is steering to the right. The ego vehicle is driving very fast.",
    "The ego vehicle is slightly steering to the left. The ego vehicle is driving fast.",
    "The ego vehicle is steering to the left. The ego vehicle is driving very fast.",
    "The ego vehicle is going straight. The ego vehicle is not moving.",
    "The ego vehicle is slightly steering to the right. The ego vehicle is driving with normal "
    "speed.",
    "The ego vehicle is steering to the right. The ego vehicle is driving slowly.",
    "The ego vehicle is steering to the right. The ego vehicle is driving with normal speed.",
    "The ego vehicle is going straight. The ego vehicle is driving very fast.",
    "The ego vehicle is going straight. The ego vehicle is driving fast.",
    "The ego vehicle is steering to the left. The ego vehicle is driving slowly.",
]


def extract_frame(frame):
  """extract_data.py's loop body for one key frame -> its test.json QA (shared dicts)."""
  frame = copy.deepcopy(frame)
  infos, qa = frame["key_object_infos"], frame["QA"]
  out = {"perception": [], "prediction": [], "planning": [], "behavior": []}
  classes = [infos[k]["Visual_description"].split(".")[0] for k in infos]
  locations = list(infos)
  for q in qa["perception"]:
    flag = 1
    for cl in classes:
      if cl.lower() not in q["A"].lower():
        flag = 0
    if flag == 1:
      q["tag"] = [2]
      out["perception"].append(q)
      break
  for q in qa["perception"]:
    if "What is the moving status of object".lower() in q["Q"].lower():
      q["tag"] = [0]
      out["perception"].append(q)
      break
  for q in qa["prediction"]:
    flag = 1
    for loc in locations:
      if loc.lower() not in q["A"].lower():
        flag = 0
    if flag == 1:
      q["tag"] = [3]
      out["prediction"].append(q)
      break
  for q in qa["prediction"]:
    if "yes" in q["A"].lower() or "no" in q["A"].lower():
      q["tag"] = [0]
      out["prediction"].append(q)
      break
  actions = collision = safe = False
  for q in qa["planning"]:
    if "What actions could the ego vehicle take".lower() in q["Q"].lower() and not actions:
      q["tag"] = [1]
      out["planning"].append(q)
      actions = True
    if "lead to a collision" in q["Q"].lower() and not collision:
      q["tag"] = [1]
      out["planning"].append(q)
      collision = True
    if "safe actions" in q["Q"].lower() and not safe:
      q["tag"] = [1]
      out["planning"].append(q)
      safe = True
    if actions and collision and safe:
      break
  for q in qa["behavior"]:
    q["tag"] = [0]
    out["behavior"].append(q)
  return out


def _rule_based(question, answer, rule, rng):
  rule = list(rule)
  rule.remove(answer)
  choices = rng.sample(rule, 3)
  choices.append(answer)
  rng.shuffle(choices)
  idx = choices.index(answer)
  question += (f" Please select the correct answer from the following options: A. {choices[0]} "
               f"B. {choices[1]} C. {choices[2]} D. {choices[3]}")
  return {"Q": question, "A": {0: "A", 1: "B", 2: "C", 3: "D"}[idx]}


def convert_frame(qa, rng):
  """convert_data.py's loop body on one frame's test.json QA -> it, converted. The QA comes
  through test.json, as there: an entry listed twice is two dicts, converted one by one."""
  qa = json.loads(json.dumps(qa))
  for q in qa["perception"]:
    if "What is the moving status of object".lower() in q["Q"].lower():
      q.update(_rule_based(q["Q"], q["A"], MOVING, rng))
  for q in qa["behavior"]:
    q.update(_rule_based(q["Q"], q["A"], BEHAVIOURS, rng))
  return qa


def _numbers(text):
  return np.array([float(x) for x in re.findall(r"\d+\.\d+", text)])


def _matched(answer, gt):
  """evaluation.py's match_result, the points only: each predicted point (an odd last number
  dropped) takes the nearest remaining GT point under 16 px of L1 distance."""
  pred = _numbers(answer)
  pred = pred[:len(pred) // 2 * 2].reshape(-1, 2)
  remaining = list(_numbers(gt).reshape(-1, 2))
  out = []
  for p in pred:
    if not remaining:
      break
    distances = [np.abs(p - g).sum() for g in remaining]
    k = int(np.argmin(distances))
    if distances[k] < 16:
      out.append(list(remaining.pop(k)))
  return out


def counted(test, predictions):
  """evaluation.py's main loop: the ids of the QAs it passes to `forward` (scores). Per frame,
  QAs in the order perception, prediction, planning, behavior, id `<scene>_<frame>_<i>`; the
  first always, its matched points the frame's graph; a later one only if every point of its
  question is in the graph."""
  answers = {p["id"]: p["answer"] for p in predictions}
  out = []
  for scene, data in test.items():
    for frame, value in data["key_frames"].items():
      qa = value["QA"]
      ordered = qa["perception"] + qa["prediction"] + qa["planning"] + qa["behavior"]
      for i, q in enumerate(ordered):
        idx = f"{scene}_{frame}_{i}"
        if i == 0:
          graph = _matched(answers[idx], q["A"])
        elif not all(list(p) in graph for p in _numbers(q["Q"]).reshape(-1, 2)):
          continue
        out.append(idx)
  return out
