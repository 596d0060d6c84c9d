"""Benchmarks as they are scored: DriveLM's challenge (language through pycocoevalcap's PTB
tokenizer and scorers, the 16 px match, the graph rule) and BDD-OIA's per-batch F1 (sklearn),
each against independent code or numbers worked out here from the definitions."""
import numpy as np
import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
from sklearn.metrics import f1_score

from drivlm_jax import metrics
from drivlm_jax.sim import labels, scene as scene_lib

HAND = [  # (answer, reference): numbers, punctuation, c-tags, contractions
    ("There is a car <c1,CAM_FRONT,1088.3,497.5> ahead.",
     "There is a black sedan <c1,CAM_FRONT,1088.3,497.5> to the front."),
    ("Yes.", "Yes."), ("No, it's not moving.", "No, it is parked (stationary)."),
    ("Turn left at 12.5 m/s; slow down!", "Decelerate, then turn left."),
    ("The ego vehicle should keep going straight...", "Keep going straight."),
    ("<c2,CAM_BACK,320.0,410.5> and <c3,CAM_FRONT_LEFT,20.1,99.9> are important",
     "The important objects are <c2,CAM_BACK,320.0,410.5>, <c3,CAM_FRONT_LEFT,20.1,99.9>."),
    # language_evaluation's CocoEvaluator (which DriveLM's evaluation.py calls) renames its
    # unknown token in the references only; texts the tokenizer empties (ROUGE-L splits on
    # " ", so two empty texts match).
    ("the _UNK is moving", "the _UNK is moving"), (".", "."), ("?", "Stop."), ("Stop.", "!"),
    # A generated line break: the tokenizer splits the text there, shifting the texts after
    # it in its run, so it must not share a run with the references (last: the texts after it
    # are compared shifted).
    ("Turn left.\rThen stop.", "Turn left, then stop."), ("Stop.", "Stop now."),
]


def _sim_pairs(n):
  """Answer/reference pairs in the sim's DriveLM wording: the answer of one scene against
  the same question's answer in the next."""
  pairs = []
  for i in range(n):
    qa = []
    for k in (i, i + 1):
      scene = scene_lib.sample_scene(np.random.default_rng([7, k]))
      actions, reasons = labels.actions_and_reasons(scene)
      qa.append([p["A"] for ps in labels.qa_pairs(scene, actions, reasons).values()
                 for p in ps])
    pairs += list(zip(qa[0], qa[1]))
  return pairs


def _pycocoevalcap(pairs):
  # As language_evaluation's CocoEvaluator (bckim92/language-evaluation) renames "_UNK" in
  # the references, then COCOEvalCap.evaluate tokenizes the references and the hypotheses,
  # each in its own run.
  gts = PTBTokenizer().tokenize({i: [{"caption": r.replace("_UNK", "_UNKNOWN")}]
                                 for i, (_, r) in enumerate(pairs)})
  res = PTBTokenizer().tokenize({i: [{"caption": a}] for i, (a, _) in enumerate(pairs)})
  bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
  return {**{f"Bleu_{n + 1}": b for n, b in enumerate(bleu)},
          "ROUGE_L": Rouge().compute_score(gts, res)[0],
          "CIDEr": Cider().compute_score(gts, res)[0]}


def test_language_scores_equal_pycocoevalcap_after_its_ptb_tokenizer():
  pairs = _sim_pairs(10)[:60] + HAND
  assert len(pairs) >= 50
  ours = metrics.coco_language([a for a, _ in pairs], [r for _, r in pairs])
  theirs = _pycocoevalcap(pairs)
  assert set(ours) == set(theirs)
  for key in theirs:
    assert ours[key] == pytest.approx(theirs[key], abs=1e-6), key


def _challenge_f1(tp, fp, fn):
  precision, recall = tp / (tp + fp + 1e-8), tp / (tp + fn + 1e-8)
  return 2 * precision * recall / (precision + recall + 1e-8)


def test_match_and_graph_rule_on_a_hand_built_frame():
  frame = [
      # The first QA: (105, 204) is 9 px (L1) from (100, 200): matched; (900, 900) is not.
      {"question": "What are the important objects in the current scene?",
       "gt": "A car <c1,CAM_FRONT,100.0,200.0> and a man <c2,CAM_BACK,500.0,300.0>.",
       "answer": "<c1,CAM_FRONT,105.0,204.0> and <c3,CAM_FRONT,900.0,900.0>", "tag": [3]},
      # Its question's point was matched by the first answer: counted.
      {"question": "Is <c1,CAM_FRONT,100.0,200.0> moving?", "gt": "Yes.", "answer": "Yes.",
       "tag": [0]},
      # (500, 300) was not matched: the graph rule drops this QA (it would score 0).
      {"question": "Is <c2,CAM_BACK,500.0,300.0> moving?", "gt": "Yes.", "answer": "No.",
       "tag": [0]},
      # No point in the question: counted.
      {"question": "What should the ego vehicle do?", "gt": "Keep going straight.",
       "answer": "Go straight.", "tag": [2]},
      # 30 px away: not a match.
      {"question": "Where will <c1,CAM_FRONT,100.0,200.0> go?",
       "gt": "<c1,CAM_FRONT,100.0,200.0>", "answer": "<c1,CAM_FRONT,130.0,200.0>",
       "tag": [1, 3]},
  ]
  second = [{"question": "Is it safe?", "gt": "Yes.", "answer": "Yes.", "tag": [0]}]
  matched, f1 = metrics.match(frame[0]["answer"], frame[0]["gt"])
  assert matched == [(100.0, 200.0)] and f1 == pytest.approx(_challenge_f1(1, 1, 1), abs=1e-12)
  scores = metrics.drivelm([frame, second])
  assert scores["counted"] == {"all": 5, "accuracy": 2, "language": 1, "match": 2}
  assert scores["accuracy"] == 1.0                    # 0.667 without the graph rule
  expected_match = 100 * (_challenge_f1(1, 1, 1) + _challenge_f1(0, 1, 1)) / 2
  assert scores["match_F1"] == pytest.approx(expected_match, abs=1e-9)
  assert scores["judge_pairs"] == 3                   # tag 3 twice, tag 1 once
  lang = _pycocoevalcap([("Go straight.", "Keep going straight.")])
  language = (sum(lang[f"Bleu_{n}"] for n in range(1, 5)) / 12 + lang["ROUGE_L"] / 3
              + lang["CIDEr"] / 30)
  assert scores["language_score"] == pytest.approx(language, abs=1e-6)
  assert scores["final_without_judge"] == pytest.approx(
      0.2 * language + 0.2 * 1.0 + 0.1 * expected_match / 100, abs=1e-6)
  with pytest.raises(ValueError, match="odd number of coordinates"):
    metrics.points("<c1,CAM_FRONT,100.0>")


def test_graph_rule_counts_the_qas_evaluation_py_counts():
  """Random frames: a first answer with its GT points moved by 0-40 px (some within the 16 px
  match, some not; an odd trailing number at times), later questions naming GT points: the
  QAs `metrics.drivelm_counted` scores are those evaluation.py's loop scores
  (`drivelm_reference.counted`)."""
  from drivlm_jax.evals import drivelm
  from tests import drivelm_reference
  rng = np.random.default_rng(0)
  test, answers = {}, {}
  for f in range(40):
    points = rng.uniform(0, 1600, (int(rng.integers(1, 5)), 2)).round(1)
    tag = lambda p: f"<c{int(rng.integers(1, 9))},CAM_FRONT,{p[0]:.1f},{p[1]:.1f}>"
    moved = points + rng.uniform(-20, 20, points.shape)
    first = " ".join(tag(p) for p in moved) + (" 7.5" if f % 3 == 0 else "")
    later = [{"Q": f"Is {tag(p)} moving?", "A": "Yes.", "tag": [0]} for p in points]
    later.append({"Q": "What should the ego vehicle do?", "A": "Stop.", "tag": [2]})
    qa = {"perception": [{"Q": "Important objects?", "A": " ".join(tag(p) for p in points),
                          "tag": [3]}, *later], "prediction": [], "planning": [],
          "behavior": []}
    test[f"s{f}"] = {"key_frames": {"k": {"QA": qa}}}
    for i, (qa_id, q) in enumerate(drivelm.qas({f"s{f}": test[f"s{f}"]})):
      answers[qa_id] = first if i == 0 else q["A"]
  predictions = [{"id": i, "answer": a} for i, a in answers.items()]
  frames = [[{"id": i, "question": q["Q"], "gt": q["A"], "answer": answers[i],
              "tag": q["tag"]} for i, q in drivelm.qas({s: test[s]})] for s in test]
  ours = [qa["id"] for qa in metrics.drivelm_counted(frames)]
  assert ours == drivelm_reference.counted(test, predictions)
  # Both branches ran: some QAs naming an object counted, some not.
  naming = sum(len(test[s]["key_frames"]["k"]["QA"]["perception"]) - 2 for s in test)
  assert 0 < len(ours) - 2 * len(test) < naming


def test_bddoia_official_f1_is_sklearns_samples_f1_averaged_over_batches():
  rng = np.random.default_rng(0)
  probs, labels_ = rng.uniform(size=(23, 4)), rng.uniform(size=(23, 4)) < 0.4
  labels_[3] = False                                   # a row with no label at all
  for batch in (1, 5, 8, 23):
    expected = np.mean([f1_score(labels_[i:i + batch], probs[i:i + batch] > 0.5,
                                 average="samples", zero_division=0)
                        for i in range(0, 23, batch)])
    assert metrics.official_f1(probs, labels_, batch) == pytest.approx(100 * expected,
                                                                      abs=1e-9)
  # Dataset level (F1_all) equals it at batch size 1 only.
  f1_all = metrics.multilabel("action", probs, labels_)["action_F1_all"]
  assert metrics.official_f1(probs, labels_, 1) == pytest.approx(f1_all, abs=1e-9)
  assert metrics.official_f1(probs, labels_, 5) != pytest.approx(f1_all, abs=1e-3)


JUDGE = ("python -c \"import sys, json; [print(100.0 if json.loads(l)['answer'] == "
         "json.loads(l)['gt'] else 25.0) for l in sys.stdin]\"")


def test_challenge_files_ids_judge_and_final_score(tmp_path):
  """A test set in DriveLM's schema, predictions written in the challenge's format, scored
  by the evaluate CLI's scorer with a judge command (100 when the answer is the GT, else
  25), against the final-score formula worked out here."""
  import json
  import subprocess
  import sys
  from drivlm_jax.evals import drivelm
  qa = lambda q, a, tag: {"Q": q, "A": a, "tag": tag}
  test = {"scene1": {"scene_description": "", "key_frames": {"frameA": {
      "key_object_infos": {"<c1,CAM_FRONT,100.0,200.0>": {"Category": "Vehicle"}},
      "QA": {"perception": [qa("What are the important objects?",
                               "A car <c1,CAM_FRONT,100.0,200.0>.", [3])],
             "prediction": [qa("Is <c1,CAM_FRONT,100.0,200.0> moving?", "Yes.", [0, 1])],
             "planning": [qa("What should the ego vehicle do?", "Keep going straight.", [2])],
             "behavior": [qa("Predict the behavior of the ego vehicle.",
                             "The ego vehicle is going straight.", [1])]}}}}}
  answers = {"scene1_frameA_0": "<c1,CAM_FRONT,101.0,201.0>", "scene1_frameA_1": "Yes.",
             "scene1_frameA_2": "Go straight.",
             "scene1_frameA_3": "The ego vehicle is slowing down."}
  (tmp_path / "test.json").write_text(json.dumps(test))
  drivelm.write_predictions(str(tmp_path / "pred.json"), test, answers)
  rows = json.loads((tmp_path / "pred.json").read_text())
  assert [r["id"] for r in rows] == [f"scene1_frameA_{i}" for i in range(4)]
  assert rows[1] == {"id": "scene1_frameA_1", "question": "Is <c1,CAM_FRONT,100.0,200.0> "
                     "moving?", "answer": "Yes."}
  with pytest.raises(KeyError, match="no answer for scene1_frameA_3"):
    drivelm.write_predictions(str(tmp_path / "x.json"), test,
                              {k: v for k, v in answers.items() if not k.endswith("3")})

  done = subprocess.run(
      [sys.executable, "-m", "drivlm_jax.evaluate", f"--drivelm_test={tmp_path / 'test.json'}",
       f"--drivelm_predictions={tmp_path / 'pred.json'}", f"--judge={JUDGE}",
       f"--workdir={tmp_path / 'run'}"], capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-2000:]
  scores = json.loads((tmp_path / "run" / "eval.json").read_text())["drivelm"]
  f1 = _challenge_f1(1, 0, 0)                       # 2 px away: matched
  gpt = (100.0 + 25.0) / 2                          # tag 1: QA 1 right, QA 3 wrong
  match_ = (100 * f1 + 25.0) / 2                    # tag 3: F1 and the judge of QA 0
  lang = _pycocoevalcap([("Go straight.", "Keep going straight.")])
  language = (sum(lang[f"Bleu_{n}"] for n in range(1, 5)) / 12 + lang["ROUGE_L"] / 3
              + lang["CIDEr"] / 30)
  assert scores["gpt"] == pytest.approx(gpt) and scores["match"] == pytest.approx(match_)
  assert scores["final"] == pytest.approx(
      0.4 * gpt / 100 + 0.2 * language + 0.2 * match_ / 100 + 0.2 * 1.0, abs=1e-6)
  no_judge = drivelm.score(test, rows)
  assert "final" not in no_judge and "no judge" in no_judge["note"]
