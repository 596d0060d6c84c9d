"""The DriveLM evaluator: every QA of each test frame answered in the challenge's order, the
prediction file in the challenge's format, and scores equal to scoring that file against the
DriveLM JSON the sim released (the challenge's own input), not the builder's copy."""
import json
import os
import random
import sys

import jax
import numpy as np
import pytest

from configs import common
from data_builders import __main__ as build_cli
from drivlm_jax import evaluate
from drivlm_jax.data import drivelm_questions, pipeline
from drivlm_jax.evals import drivelm, judge
from drivlm_jax.model import vlm
from drivlm_jax.sim import nuscenes as sim_nuscenes
from drivlm_jax.sim import tokenizer as sim_tokenizer
from tests import chat, drivelm_reference, reference


def test_drivelm_evaluator_writes_the_challenge_file_and_scores_it(tmp_path):
  released, predictions, result = _evaluate_sim(tmp_path, seed=3, size=(160, 96), frames=3,
                                                 max_new_tokens=4)
  # The first 3 frames of the split, with the test questions the challenge's scripts derive
  # from the released (untagged) file, in the challenge's order.
  frames = {p["id"].rsplit("_", 1)[0] for p in predictions}
  assert len(frames) == 3
  test = {s: {"key_frames": {f: {"QA": drivelm_reference.convert_frame(
      drivelm_reference.extract_frame(v), random.Random(drivelm_questions.frame_seed(f)))}
      for f, v in scene["key_frames"].items() if f"{s}_{f}" in frames}}
      for s, scene in released.items()}
  assert {tuple(qa["tag"]) for _, qa in drivelm.qas(test)} == {(0,), (1,), (2,), (3,)}
  # The challenge keys predictions by id (frames may come in any order).
  assert {p["id"]: p["question"] for p in predictions} == {
      i: qa["Q"] for i, qa in drivelm.qas(test)}
  assert len(predictions) == len(drivelm.qas(test))
  scores = drivelm.score(test, predictions)
  assert result["drivelm_match_F1"] == scores["match_F1"]
  np.testing.assert_allclose(result["drivelm_final_without_judge"],
                             100 * scores["final_without_judge"])
  assert set(result) == {"drivelm_accuracy", "drivelm_language", "drivelm_match_F1",
                         "drivelm_final_without_judge", "drivelm_asked", "drivelm_counted"}
  assert result["drivelm_asked"] == len(predictions)
  # 4 new tokens reach no c-tag: the graph rule drops the questions about objects.
  assert result["drivelm_counted"] == len(drivelm_reference.counted(test, predictions)) < len(
      predictions)


def _evaluate_sim(tmp_path, seed, size, frames, max_new_tokens, edit=None):
  """The evaluator on the first `frames` frames of a 1-scene sim val split whose DriveLM
  file `edit(path)` may change -> (that file, the predictions written, the result)."""
  root, data_dir = str(tmp_path / "nus"), str(tmp_path / "tfds")
  sim_nuscenes.write(root, "day", 1, seed=seed, split="val", width=size[0], height=size[1])
  if edit:
    edit(f"{root}/v1_1_val_nus.json")
  build_cli.build("nuscenes_drive", root, data_dir, config="front")
  cfg = vlm.config_from_dict(common.model_config("tiny"))
  feats = pipeline.Features(tokenizer=sim_tokenizer.write(str(tmp_path)),
                            image_size=cfg.vision.image_size,
                            num_image_tokens=cfg.num_visual_tokens, max_len=160)
  data = {("target", "test"): pipeline.SourceSpec("nuscenes_drive/front", data_dir, "val")}
  evaluator = drivelm.DriveLM(name="drivelm", every=1, role="target", batch_size=64,
                              max_new_tokens=max_new_tokens, num_frames=frames)
  result = evaluator.run(cfg, vlm.init(cfg, jax.random.key(0)), data, feats,
                         workdir=str(tmp_path / "run"))
  released = None
  if os.path.exists(f"{root}/v1_1_val_nus.json"):
    with open(f"{root}/v1_1_val_nus.json") as f:
      released = json.load(f)
  return (released, json.loads((tmp_path / "run" / "drivelm_predictions.json").read_text()),
          result)


def test_a_tagged_file_is_scored_as_it_is_and_a_split_without_qa_is_an_error(tmp_path):
  """A QA file that carries the challenge's tags (its test_eval.json form) is asked as it
  stands; a split whose frames have no DriveLM QA has nothing to score: an error."""
  def tag_the_first_qa(path):
    with open(path) as f:
      released = json.load(f)
    for scene in released.values():
      for frame in scene["key_frames"].values():
        frame["QA"]["perception"][0]["tag"] = [2]
    with open(path, "w") as f:
      json.dump(released, f)

  released, predictions, _ = _evaluate_sim(tmp_path / "tagged", 4, (96, 64), 2, 2,
                                           tag_the_first_qa)
  frames = {p["id"].rsplit("_", 1)[0] for p in predictions}
  test = {s: {"key_frames": {f: v for f, v in scene["key_frames"].items()
                             if f"{s}_{f}" in frames}} for s, scene in released.items()}
  assert len(frames) == 2   # every QA of both frames, as the file words it
  assert len(predictions) == len(drivelm.qas(test))
  assert {p["id"]: p["question"] for p in predictions} == {
      i: qa["Q"] for i, qa in drivelm.qas(test)}
  with pytest.raises(ValueError, match=r"DriveLM evaluation of the target test split: no QA "
                                       r"to score in 2 frame\(s\)"):
    _evaluate_sim(tmp_path / "none", 4, (96, 64), 2, 2, os.remove)


def test_the_challenges_questions_only_file_is_answered_not_scored(tmp_path):
  """The released val questions (v1_1_val_nus_q_only.json: the challenge's test questions,
  tagged, every answer empty) are read, answered into the challenge's file and not scored;
  nothing trains on an empty answer."""
  def questions_only(path):
    with open(path) as f:
      released = json.load(f)
    for scene in released.values():
      for frame in scene["key_frames"].values():
        for stage in frame["QA"].values():
          for qa in stage:
            qa.update(A="", tag=[2])
    os.remove(path)
    with open(path.replace("_nus.json", "_nus_q_only.json"), "w") as f:
      json.dump(released, f)

  _, predictions, result = _evaluate_sim(tmp_path, 4, (96, 64), 2, 2, questions_only)
  assert result == {} and len({p["id"].rsplit("_", 1)[0] for p in predictions}) == 2
  spec = pipeline.SourceSpec("nuscenes_drive/front", str(tmp_path / "tfds"), "val")
  source = pipeline.open_source(spec)[0]
  assert len(source[0]["qa"]["question"]) and not pipeline.qa_pairs(source[0], "released")
  # A frame with neither answers nor actions (a scene's last 3 s) gives the LM nothing to
  # learn; the others learn the explanation of their actions, as frames without QA do.
  feats = pipeline.Features(tokenizer=sim_tokenizer.write(str(tmp_path)), image_size=32,
                            num_image_tokens=4, max_len=160)
  batch = pipeline.batch_dataset(spec, feats, 64, train=False, shard_index=0,
                                 shard_count=1)[0]
  has = np.array([bool(source[i]["has_actions"]) for i in range(len(source))])
  assert has.any() and not has.all()
  np.testing.assert_array_equal(batch["loss_mask"].any(axis=1), has)


def _judge_dir(path, allowed: str):
  """A tiny random instruct LM whose generation config lets it write only `allowed`."""
  tok = chat.tokenizer()
  model = reference.causal_lm(vocab=len(tok))
  keep = tok.convert_tokens_to_ids(allowed)
  model.generation_config.suppress_tokens = [i for i in range(len(tok)) if i != keep]
  model.save_pretrained(path)
  tok.save_pretrained(path)
  return str(path)


def test_a_local_model_judges_through_the_command_protocol(tmp_path):
  """DriveLM's gpt_eval messages put to a local LM, run as `--judge` runs it: a reply of
  "77" scores 77; a reply without a number is an error naming the answer, never a score."""
  items = [{"question": "Q1", "answer": "Turn left.", "gt": "Turn left now."},
           {"question": "Q2", "answer": "Stop.", "gt": "Keep going."}]
  command = f"{sys.executable} -m drivlm_jax.evals.judge --max_new_tokens 2 --model "
  sevens = drivelm.judge_command(command + _judge_dir(tmp_path / "sevens", "7"))
  assert sevens(items) == [77.0, 77.0]
  words = drivelm.judge_command(command + _judge_dir(tmp_path / "words", "x"))
  with pytest.raises(RuntimeError, match="no score in 0..100.*'Turn left.'"):
    words(items)
  # The challenge's user message: its instruction, then the ground truth, then the answer.
  chat_ = judge.messages("Stop.", "Keep going.")
  assert chat_[0] == {"role": "system",
                      "content": "an evaluator who rates my answer based on the correct answer"}
  assert chat_[1]["content"].startswith("Rate my answer based on the correct answer out of 100")
  assert chat_[1]["content"].endswith(
      "Output the number onlyThis is the correct answer: Keep going.This is my answer: Stop.")


def test_frames_without_answers_are_left_out_of_the_scores(tmp_path, caplog):
  """A test set mixing answered frames with questions-only ones scores the answered frames
  only (ids unchanged); a questions-only file given to the scorer is an error."""
  qa = lambda answer: {"Q": "Is it moving?", "A": answer, "tag": [0]}
  test = {"s": {"key_frames": {"f1": {"QA": {"perception": [qa("Yes.")]}},
                               "f2": {"QA": {"perception": [qa("")]}}}}}
  kept = drivelm.with_answers(test, "mixed")
  assert list(kept["s"]["key_frames"]) == ["f1"] and "1 frame(s) without answers" in caplog.text
  predictions = [{"id": "s_f1_0", "question": "Is it moving?", "answer": "Yes."},
                 {"id": "s_f2_0", "question": "Is it moving?", "answer": "No."}]
  assert drivelm.score(kept, predictions)["accuracy"] == 1.0
  path = tmp_path / "q_only.json"
  path.write_text(json.dumps({"s": {"key_frames": {"f2": test["s"]["key_frames"]["f2"]}}}))
  (tmp_path / "p.json").write_text(json.dumps(predictions[1:]))
  with pytest.raises(ValueError, match=r"q_only.json: every answer is empty"):
    evaluate.score_drivelm(str(path), str(tmp_path / "p.json"))
