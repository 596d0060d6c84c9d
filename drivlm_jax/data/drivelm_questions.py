"""The DriveLM challenge's test questions of one frame of the released QA files, which carry
no tags: picked and tagged as OpenDriveLab/DriveLM's `challenge/extract_data.py` does, two
kinds made multiple choice as its `challenge/convert_data.py` does (the two scripts that turn
`v1_1_*_nus.json` into the `test_eval.json` that `challenge/evaluation.py` scores).

Picked, in this order (tags: 0 accuracy, 1 GPT judge, 2 language, 3 match):
- perception: the first QA whose answer names every key object's class (the first sentence of
  its Visual_description) [2]; the first "What is the moving status of object" QA [0];
- prediction: the first QA whose answer holds every key object's c-tag [3]; the first QA whose
  answer contains "yes" or "no" (substrings, as there) [0];
- planning: the first QA asking each of "What actions could the ego vehicle take", "lead to a
  collision" and "safe actions" [1];
- behavior: every QA [0].
A QA picked twice is listed twice, both times with the tag given last (the scripts append
one shared dict twice), and converted twice. The moving-status and behavior questions become
multiple choice: the answer and three other options of the scripts' fixed lists, shuffled,
answered "A".."D". The scripts draw those unseeded; here they come from
`random.Random(seed)`.
"""
import hashlib
import random

MOVING_QUESTION = "what is the moving status of object"
CHOICES_PROMPT = "Please select the correct answer from the following options:"
# convert_data.py's rule_based1 list, in its order ("Drive backward." since its commit
# bb7fefc, 2024-03-18, "Fix convert part").
MOVING = ("Going ahead.", "Turn right.", "Turn left.", "Stopped.", "Back up.",
          "Reverse parking.", "Drive backward.")
# convert_data.py's 21 behaviours, in its order (its draws depend on the order).
BEHAVIOURS = tuple(
    f"The ego vehicle is {steer}. The ego vehicle is {speed}." for steer, speed in (
        ("slightly steering to the left", "driving very fast"),
        ("steering to the left", "driving with normal speed"),
        ("steering to the left", "driving fast"),
        ("slightly steering to the right", "driving fast"),
        ("going straight", "driving slowly"),
        ("going straight", "driving with normal speed"),
        ("slightly steering to the left", "driving with normal speed"),
        ("slightly steering to the left", "driving slowly"),
        ("slightly steering to the right", "driving slowly"),
        ("slightly steering to the right", "driving very fast"),
        ("steering to the right", "driving fast"),
        ("steering to the right", "driving very fast"),
        ("slightly steering to the left", "driving fast"),
        ("steering to the left", "driving very fast"),
        ("going straight", "not moving"),
        ("slightly steering to the right", "driving with normal speed"),
        ("steering to the right", "driving slowly"),
        ("steering to the right", "driving with normal speed"),
        ("going straight", "driving very fast"),
        ("going straight", "driving fast"),
        ("steering to the left", "driving slowly")))
_PLANNING = ("what actions could the ego vehicle take", "lead to a collision", "safe actions")


def frame_seed(frame_token: str) -> int:
  """The seed of a frame's multiple-choice draws: fixed by its token, whatever the order or
  number of frames evaluated."""
  return int(hashlib.sha256(frame_token.encode()).hexdigest()[:8], 16)


def multiple_choice(question: str, answer: str, options, rng: random.Random, where: str):
  """(question with four options appended, the answer's letter), as convert_data.py's
  rule_based1/2 make them; an answer outside `options` is an error (the script fails too)."""
  others = [o for o in options if o != answer]
  if len(others) == len(options):
    raise ValueError(f"{where}: answer {answer!r} is not one of the challenge's options "
                     f"{list(options)}")
  choices = rng.sample(others, 3) + [answer]
  rng.shuffle(choices)
  listed = " ".join(f"{letter}. {c}" for letter, c in zip("ABCD", choices))
  return f"{question} {CHOICES_PROMPT} {listed}", "ABCD"[choices.index(answer)]


def test_questions(qa: dict, key_objects: dict, seed: int, where: str = "frame") -> dict:
  """{stage: [{"Q", "A"}]} of one released frame and its key_object_infos -> the challenge's
  test QAs {stage: [{"Q", "A", "tag"}]} (module docstring)."""
  classes = [info["Visual_description"].split(".")[0].lower() for info in key_objects.values()]
  locations = [tag.lower() for tag in key_objects]
  picked, tags = [], {}

  def pick(stage, index, tag):
    picked.append((stage, index))
    tags[stage, index] = [tag]

  def first(stage, test):
    return next((i for i, q in enumerate(qa.get(stage, [])) if test(q)), None)

  for stage, test, tag in (
      ("perception", lambda q: all(c in q["A"].lower() for c in classes), 2),
      ("perception", lambda q: MOVING_QUESTION in q["Q"].lower(), 0),
      ("prediction", lambda q: all(t in q["A"].lower() for t in locations), 3),
      ("prediction", lambda q: "yes" in q["A"].lower() or "no" in q["A"].lower(), 0)):
    index = first(stage, test)
    if index is not None:
      pick(stage, index, tag)
  asked = set()
  for i, q in enumerate(qa.get("planning", [])):
    for phrase in _PLANNING:
      if phrase in q["Q"].lower() and phrase not in asked:
        pick("planning", i, 1)
        asked.add(phrase)
    if len(asked) == len(_PLANNING):
      break
  for i in range(len(qa.get("behavior", []))):
    pick("behavior", i, 0)

  # Converted entry by entry, perception's before behavior's, as convert_data.py draws them
  # (an entry listed twice is two entries of its test.json, each drawn on its own).
  rng, out = random.Random(seed), {}
  for stage in ("perception", "prediction", "planning", "behavior"):
    for index in [i for s, i in picked if s == stage]:
      question, answer = qa[stage][index]["Q"], qa[stage][index]["A"]
      options = (BEHAVIOURS if stage == "behavior" else
                 MOVING if stage == "perception" and MOVING_QUESTION in question.lower()
                 else None)
      if options is not None:
        question, answer = multiple_choice(question, answer, options, rng,
                                           f"{where}: {stage}[{index}]")
      out.setdefault(stage, []).append({"Q": question, "A": answer, "tag": tags[stage, index]})
  return out


def frame_questions(qa: dict, key_objects: dict, frame_token: str, where: str) -> dict:
  """A frame's test QAs: its QAs as they stand where any carries a tag (a file in the
  challenge's test_eval.json form), else `test_questions` seeded by the frame's token."""
  if any(q.get("tag") for qas in qa.values() for q in qas):
    return qa
  return test_questions(qa, key_objects, frame_seed(frame_token), where)


def test_set(qa_file: dict, where: str) -> dict:
  """A DriveLM QA file (released, or in test_eval.json form) -> the challenge's test set
  {scene: {"key_frames": {frame: {"QA": {stage: [{"Q", "A", "tag"}]}}}}}."""
  return {scene: {"key_frames": {frame: {"QA": frame_questions(
      data.get("QA", {}), data.get("key_object_infos", {}), frame, f"{where}: {scene}/{frame}")}
      for frame, data in content.get("key_frames", {}).items()}}
      for scene, content in qa_file.items()}

