"""The DriveLM evaluator: every QA of each test frame answered in the challenge's order, the
prediction file in the challenge's format, and scores equal to scoring that file against the
DriveLM JSON the sim released (the challenge's own input), not the builder's copy."""
import json
import sys

import jax
import numpy as np
import pytest

from configs import common
from data_builders import __main__ as build_cli
from drivlm_jax.data import pipeline
from drivlm_jax.evals import drivelm, judge
from drivlm_jax.model import vlm
from drivlm_jax.sim import nuscenes as sim_nuscenes
from drivlm_jax.sim import tokenizer as sim_tokenizer
from tests import chat, reference


def test_drivelm_evaluator_writes_the_challenge_file_and_scores_it(tmp_path):
  root, data_dir = str(tmp_path / "nus"), str(tmp_path / "tfds")
  sim_nuscenes.write(root, "day", 1, seed=3, split="val", width=160, height=96)
  build_cli.build("nuscenes_drive", root, data_dir, config="front")
  cfg = vlm.config_from_dict(common.model_config("tiny"))
  params = vlm.init(cfg, jax.random.key(0))
  feats = pipeline.Features(tokenizer=sim_tokenizer.write(str(tmp_path)),
                            image_size=cfg.vision.image_size,
                            num_image_tokens=cfg.num_visual_tokens, max_len=160)
  data = {("target", "test"): pipeline.SourceSpec("nuscenes_drive/front", data_dir, "val")}
  evaluator = drivelm.DriveLM(name="drivelm", every=1, role="target", batch_size=64,
                              max_new_tokens=4, num_frames=3)
  result = evaluator.run(cfg, params, data, feats, workdir=str(tmp_path / "run"))

  predictions = json.loads((tmp_path / "run" / "drivelm_predictions.json").read_text())
  with open(f"{root}/v1_1_val_nus.json") as f:
    released = json.load(f)
  # The first 3 frames of the split, with every QA of each, in the challenge's order.
  frames = {p["id"].rsplit("_", 1)[0] for p in predictions}
  assert len(frames) == 3
  test = {s: {"key_frames": {f: v for f, v in scene["key_frames"].items()
                             if f"{s}_{f}" in frames}} for s, scene in released.items()}
  # The challenge keys predictions by id (frames may come in any order).
  assert {p["id"]: p["question"] for p in predictions} == {
      i: qa["Q"] for i, qa in drivelm.qas(test)}
  assert len(predictions) == len(drivelm.qas(test))
  scores = drivelm.score(test, predictions)
  assert result["drivelm_match_F1"] == scores["match_F1"]
  np.testing.assert_allclose(result["drivelm_final_without_judge"],
                             100 * scores["final_without_judge"])
  assert set(result) == {"drivelm_accuracy", "drivelm_language", "drivelm_match_F1",
                         "drivelm_final_without_judge"}


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
