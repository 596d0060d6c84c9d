"""Metrics against sklearn and against small cases computed by hand from the definitions."""
import math
import shutil

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, f1_score

from drivlm_jax import metrics
from tests.test_benchmark_scores import _pycocoevalcap


@pytest.mark.parametrize("seed", range(5))
def test_multilabel_matches_sklearn(seed):
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, 2, (60, 21))
  labels[:, 3] = 0                      # a class without positives is left out of mAP
  scores = np.round(rng.random((60, 21)) * 0.6 + labels * 0.3, 2)   # ties on purpose
  got = metrics.multilabel("reason", scores, labels)
  present = labels.sum(0) > 0
  ap = [average_precision_score(labels[:, c], scores[:, c]) for c in np.flatnonzero(present)]
  assert got["reason_mAP"] == pytest.approx(100 * np.mean(ap), abs=1e-9)
  pred = scores > 0.5   # BDD-OIA's test.py: sigmoid > 0.5 (scores of exactly 0.5 occur here)
  assert got["reason_F1_all"] == pytest.approx(
      100 * f1_score(labels, pred, average="samples", zero_division=0), abs=1e-9)
  assert got["reason_mF1"] == pytest.approx(
      100 * f1_score(labels, pred, average="macro", zero_division=0), abs=1e-9)


def test_bleu_by_hand():
  # hyp "the cat sat on mat" vs ref "the cat sat on the mat": p1 = 5/5, p2 = 3/4,
  # p3 = 2/3 ("the cat sat", "cat sat on"), p4 = 1/2; brevity exp(1 - 6/5).
  b = metrics.bleu(["the cat sat on mat"], [["the cat sat on the mat"]])
  bp = math.exp(1 - 6 / 5)
  assert b[0] == pytest.approx(bp * 1.0)
  assert b[1] == pytest.approx(bp * math.sqrt(1.0 * 3 / 4))
  assert b[3] == pytest.approx(bp * (1.0 * 3 / 4 * 2 / 3 * 1 / 2) ** 0.25)
  assert metrics.bleu(["a b c d"], [["a b c d"]])[3] == pytest.approx(1.0)


def test_rouge_l_by_hand():
  # LCS("the cat sat", "the cat was here") = 2: P = 2/3, R = 2/4, beta = 1.2.
  p, r, b = 2 / 3, 2 / 4, 1.2
  expected = (1 + b * b) * p * r / (r + b * b * p)
  assert metrics.rouge_l(["the cat sat"], [["the cat was here"]]) == pytest.approx(expected)


def test_cider_by_hand():
  # Two images; identical hypothesis and reference give per-n cosine 1 for the n-grams that
  # exist, weighted by idf; unigram "a" appears in both references (idf 0), so for image 1
  # ("a b" vs "a b"): n=1 vector has only "b" (idf log 2), cosine 1; n=2 "a b" cosine 1;
  # n=3, n=4 empty -> 0. Score = mean(1, 1, 0, 0) * 10 = 5.
  score = metrics.cider(["a b", "a c"], [["a b"], ["a c"]])
  assert score == pytest.approx(5.0)
  assert metrics.cider(["x y", "a c"], [["a b"], ["a c"]]) == pytest.approx(2.5)


@pytest.mark.skipif(shutil.which("java") is None, reason="pycocoevalcap's PTB tokenizer")
def test_language_bundle_is_pycocoevalcaps_scores_in_points_and_exact_match():
  pairs = [("Yes.", "yes"), ("no", "No, because of a car."), ("1088.3 m away", "1088 3 m away"),
           ("It's red.", "it s red"), ("The car, ahead (left), turns.", "The car ahead turns left."),
           ("Stop\u2028now.", "Stop now.")]
  out = metrics.language([h for h, _ in pairs], [r for _, r in pairs])
  # The challenge's path (tests/test_benchmark_scores.py); the line break, which would shift
  # the texts after it in a PTB run, is a space in both.
  theirs = _pycocoevalcap([(h.replace("\u2028", " "), r) for h, r in pairs])
  assert {k: out[k] for k in ("BLEU-1", "BLEU-4", "ROUGE-L", "CIDEr")} == pytest.approx(
      {"BLEU-1": 100 * theirs["Bleu_1"], "BLEU-4": 100 * theirs["Bleu_4"],
       "ROUGE-L": 100 * theirs["ROUGE_L"], "CIDEr": 100 * theirs["CIDEr"]})
  # Case and punctuation ignored; a decimal and a contraction are PTB tokens of their own
  # ("1088.3" is not "1088 3", "it 's" not "it s").
  assert out["accuracy"] == pytest.approx(100 * 2 / 6)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_probabilities_that_are_not_numbers_are_an_error(bad):
  scores = np.full((4, 2), bad)
  with pytest.raises(ValueError, match=r"action: 8 of 8 probabilities are NaN or infinite"):
    metrics.multilabel("action", scores, np.eye(4, 2))
