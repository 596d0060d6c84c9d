"""The DriveLM challenge's test questions of released (untagged) frames, against its own
scripts: tests/drivelm_reference.py runs extract_data.py and convert_data.py step for step."""
import random

import numpy as np
import pytest

from drivlm_jax.data import drivelm_questions, labels, pipeline
from drivlm_jax.sim import drivelm as sim_drivelm
from drivlm_jax.sim import labels as sim_labels
from drivlm_jax.sim import nuscenes as sim_nuscenes
from drivlm_jax.sim import scene as scene_lib
from tests import drivelm_reference as ref


def _sim_frame(seed):
  """A released frame as the sim writes it: its key objects seen by made-up cameras."""
  rng = np.random.default_rng(seed)
  scene = scene_lib.sample_scene(rng)
  actions, reasons = sim_labels.actions_and_reasons(scene)
  boxes = {i: (str(rng.choice(sorted(sim_nuscenes.CAMERAS))), [10.0 * i, 20.0, 10.0 * i + 30, 60.0])
           for i in range(len(scene.agents)) if rng.random() < 0.8}
  behaviour = ref.BEHAVIOURS[int(rng.integers(len(ref.BEHAVIOURS)))]
  return sim_drivelm.frame(scene, actions, reasons, behaviour, boxes)


def _official(frame, seed):
  return ref.convert_frame(ref.extract_frame(frame), random.Random(seed))


def _ours(frame, seed):
  return drivelm_questions.test_questions(frame["QA"], frame["key_object_infos"], seed)


def _as_reference(ours):
  stages = ("perception", "prediction", "planning", "behavior")
  return {stage: [{"Q": q["Q"], "A": q["A"], "tag": q["tag"]} for q in ours.get(stage, [])]
          for stage in stages}


def _strip(official):
  return {stage: [{"Q": q["Q"], "A": q["A"], "tag": q["tag"]} for q in qas]
          for stage, qas in official.items()}


def test_sim_frames_give_the_scripts_test_questions():
  kinds = {0: 0, 1: 0, 2: 0, 3: 0}
  for seed in range(60):
    frame = _sim_frame(seed)
    ours = _as_reference(_ours(frame, seed))
    assert ours == _strip(_official(frame, seed)), seed
    for qas in ours.values():
      for q in qas:
        kinds[q["tag"][0]] += 1
  assert all(kinds.values()), kinds   # every kind of question occurs in the sim's frames


def _qa(q, a):
  return {"Q": q, "A": a, "C": None, "con_up": None, "con_down": None, "cluster": None,
          "layer": None}


HAND = {   # the scripts' corners: a QA picked twice, a planning QA asking two things
    "key_object_infos": {
        "<c1,CAM_FRONT,100.0,200.0>": {"Category": "Vehicle", "Status": "Moving",
                                       "Visual_description": "Black sedan.", "2d_bbox": []},
        "<c2,CAM_BACK,10.0,20.0>": {"Category": "Traffic element", "Status": None,
                                    "Visual_description": "Red light. Bright.", "2d_bbox": []}},
    "QA": {
        "perception": [
            _qa("Is there a truck?", "No truck."),
            _qa("What are the important objects?", "A black sedan and a red light."),
            _qa("What is the moving status of object <c1,CAM_FRONT,100.0,200.0>?", "Turn left."),
            _qa("What is the moving status of object <c2,CAM_BACK,10.0,20.0>?", "Stopped.")],
        "prediction": [
            _qa("What should the ego vehicle notice?",
                "Firstly notice <c1,CAM_FRONT,100.0,200.0>, then <c2,CAM_BACK,10.0,20.0>."),
            _qa("Is <c1,CAM_FRONT,100.0,200.0> moving?", "Yes.")],
        "planning": [
            _qa("What are safe actions, and which lead to a collision?", "Go slowly."),
            _qa("What actions could the ego vehicle take based on <c1,CAM_FRONT,100.0,200.0>?",
                "Slow down."),
            _qa("In this scenario, what are safe actions to take?", "Stop.")],
        "behavior": [_qa("Predict the behavior of the ego vehicle.", ref.BEHAVIOURS[4])]},
}


@pytest.mark.parametrize("seed", range(3))
def test_hand_built_frame_gives_the_scripts_test_questions(seed):
  ours = _as_reference(_ours(HAND, seed))
  assert ours == _strip(_official(HAND, seed))
  # "Firstly notice" holds "no": the match question is also the yes/no one, tagged [0] twice.
  assert [q["tag"] for q in ours["prediction"]] == [[0], [0]]
  assert [q["A"] for q in ours["planning"]] == ["Go slowly.", "Go slowly.", "Slow down."]
  assert ours["perception"][1]["A"] in "ABCD" and "D. " in ours["perception"][1]["Q"]


@pytest.mark.parametrize("status", ref.MOVING)
def test_every_moving_status_of_the_scripts_list_converts_as_there(status):
  """All seven of convert_data.py's options (its later commits added "Drive backward."), each
  as the answer: the same options drawn, in the same order, as the script's."""
  frame = {"key_object_infos": HAND["key_object_infos"], "QA": {
      "perception": [_qa("What is the moving status of object <c1,CAM_FRONT,100.0,200.0>?",
                         status)],
      "prediction": [], "planning": [], "behavior": []}}
  for seed in range(4):
    assert _as_reference(_ours(frame, seed)) == _strip(_official(frame, seed))


def test_an_answer_outside_the_options_is_an_error_naming_the_frame():
  frame = {"key_object_infos": {}, "QA": {"behavior": [
      _qa("Predict the behavior of the ego vehicle.", "The ego vehicle is flying.")]}}
  with pytest.raises(ValueError, match=r"scene_frame: behavior\[0\]: answer 'The ego vehicle "
                                       r"is flying\.' is not one of the challenge's options"):
    drivelm_questions.test_questions(frame["QA"], {}, 0, "scene_frame")


def _example(stages, tags):
  """A nuScenes-Drive example's QA features as the builder stores them."""
  rows = [(stage, q, a, t) for (stage, q, a), t in zip(stages, tags)]
  return {"qa": {"type": [r[0].encode() for r in rows], "question": [r[1].encode() for r in rows],
                 "answer": [r[2].encode() for r in rows],
                 "tag": np.array([labels.drivelm_tag_mask(r[3]) for r in rows], np.int32)},
          "key_objects": b"{}", "sample_token": b"frame-1"}


def test_training_questions_of_a_tagged_file_are_its_own():
  """A file in the challenge's test_eval.json form (tags, multiple choice already made):
  the "challenge" training form takes its QAs as they stand, as the evaluator does."""
  asked = (f"Predict the behavior of the ego vehicle. {drivelm_questions.CHOICES_PROMPT} "
           + " ".join(f"{k}. {b}" for k, b in zip("ABCD", ref.BEHAVIOURS)))
  stages = [("planning", "What actions could the ego vehicle take?", "Keep going."),
            ("behavior", asked, "A")]
  tagged = _example(stages, [[1], [0]])
  want = [(q, a) for _, q, a in stages]
  assert pipeline.qa_pairs(tagged, "challenge") == want
  assert pipeline.qa_pairs(tagged, "released") == want
  assert pipeline.frame_test_questions(tagged, "w") == {
      "planning": [{"Q": stages[0][1], "A": stages[0][2], "tag": [1]}],
      "behavior": [{"Q": asked, "A": "A", "tag": [0]}]}
  with pytest.raises(ValueError, match="frame-1.*'A' is not one of the challenge's options"):
    pipeline.qa_pairs(_example(stages, [[], []]), "challenge")   # untagged: converted again
