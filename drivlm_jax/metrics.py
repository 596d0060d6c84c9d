"""Metrics of our benchmarks.

Multi-label (BDD-OIA): per-class average precision (sklearn's `average_precision_score`:
sum over thresholds of (R_n - R_{n-1}) P_n), mAP = mean over classes with a positive;
F1_all = sample-averaged F1 (sklearn `average='samples'`), mF1 = mean per-class F1; all in
points (0-100). Language (DriveLM): corpus BLEU-1..4, ROUGE-L and CIDEr as pycocoevalcap
computes them, and exact-match accuracy.
"""
import collections
import math

import numpy as np


def average_precision(scores, labels) -> float:
  """AP of one class: scores, labels [N]. NaN when there is no positive."""
  scores, labels = np.asarray(scores, np.float64), np.asarray(labels).astype(bool)
  if not labels.any():
    return float("nan")
  order = np.argsort(-scores, kind="mergesort")
  scores, labels = scores[order], labels[order]
  # One point per distinct score (ties share a threshold), as sklearn does.
  last = np.r_[np.flatnonzero(np.diff(scores)), len(scores) - 1]
  tp = np.cumsum(labels)[last]
  precision = tp / (last + 1)
  recall = tp / labels.sum()
  return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def f1_scores(predictions, labels):
  """-> (F1_all: mean over samples, mF1: mean over classes), sklearn's zero-division = 0."""
  p, y = np.asarray(predictions).astype(bool), np.asarray(labels).astype(bool)
  tp = (p & y).sum
  def f1(tp, fp, fn):
    denom = 2 * tp + fp + fn
    return np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0)
  per_sample = f1(tp(1), (p & ~y).sum(1), (~p & y).sum(1))
  per_class = f1(tp(0), (p & ~y).sum(0), (~p & y).sum(0))
  return float(per_sample.mean()), float(per_class.mean())


def multilabel(prefix: str, probabilities, labels, threshold=0.5) -> dict:
  """{prefix_mAP, prefix_mF1, prefix_F1_all} in points."""
  probabilities, labels = np.asarray(probabilities), np.asarray(labels)
  aps = [average_precision(probabilities[:, c], labels[:, c]) for c in range(labels.shape[1])]
  f1_all, mf1 = f1_scores(probabilities >= threshold, labels)
  return {f"{prefix}_mAP": 100 * float(np.nanmean(aps)) if not np.all(np.isnan(aps)) else 0.0,
          f"{prefix}_mF1": 100 * mf1, f"{prefix}_F1_all": 100 * f1_all}


#### Language metrics (pycocoevalcap definitions; simple whitespace/punctuation tokens)


def tokenize(text: str) -> list:
  for ch in ".,;:!?\"'()":
    text = text.replace(ch, " ")
  return text.lower().split()


def _ngrams(tokens, n):
  return collections.Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def bleu(hypotheses, references, max_n=4) -> list:
  """Corpus BLEU-1..max_n (pycocoevalcap: closest reference length, clipped counts)."""
  hyp_len = ref_len = 0
  matches, totals = [0] * max_n, [0] * max_n
  for hyp, refs in zip(hypotheses, references):
    h, rs = tokenize(hyp), [tokenize(r) for r in refs]
    hyp_len += len(h)
    ref_len += min((abs(len(r) - len(h)), len(r)) for r in rs)[1]
    for n in range(1, max_n + 1):
      counts = _ngrams(h, n)
      best = collections.Counter()
      for r in rs:
        best |= _ngrams(r, n)
      matches[n - 1] += sum(min(c, best[g]) for g, c in counts.items())
      totals[n - 1] += max(len(h) - n + 1, 0)
  tiny = 1e-9
  brevity = 1.0 if hyp_len > ref_len else math.exp(1 - ref_len / max(hyp_len, tiny))
  scores, log_sum = [], 0.0
  for n in range(max_n):
    log_sum += math.log((matches[n] + tiny) / (totals[n] + tiny))
    scores.append(brevity * math.exp(log_sum / (n + 1)))
  return scores


def _lcs(a, b):
  table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
  for i, x in enumerate(a):
    for j, y in enumerate(b):
      table[i + 1][j + 1] = table[i][j] + 1 if x == y else max(table[i][j + 1], table[i + 1][j])
  return table[-1][-1]


def rouge_l(hypotheses, references, beta=1.2) -> float:
  """Mean sentence ROUGE-L F (pycocoevalcap: max precision and recall over references)."""
  scores = []
  for hyp, refs in zip(hypotheses, references):
    h = tokenize(hyp)
    precisions, recalls = [], []
    for r in map(tokenize, refs):
      lcs = _lcs(h, r)
      precisions.append(lcs / max(len(h), 1))
      recalls.append(lcs / max(len(r), 1))
    p, r = max(precisions), max(recalls)
    scores.append(((1 + beta ** 2) * p * r) / (r + beta ** 2 * p) if p and r else 0.0)
  return float(np.mean(scores))


def cider(hypotheses, references, n=4, sigma=6.0) -> float:
  """CIDEr as pycocoevalcap's `Cider` computes it (TF-IDF n-gram cosine with clipping and a
  Gaussian length penalty, document frequencies from the references, x10)."""
  refs = [[tokenize(r) for r in rs] for rs in references]
  hyps = [tokenize(h) for h in hypotheses]
  df = collections.Counter()
  for rs in refs:
    df.update({g for r in rs for k in range(1, n + 1) for g in _ngrams(r, k)})
  log_docs = np.log(float(len(refs)))

  def vector(tokens):
    vec, norm = [{} for _ in range(n)], np.zeros(n)
    for k in range(1, n + 1):
      for g, tf in _ngrams(tokens, k).items():
        vec[k - 1][g] = tf * (log_docs - np.log(max(1.0, df[g])))
        norm[k - 1] += vec[k - 1][g] ** 2
    return vec, np.sqrt(norm), len(tokens)

  scores = []
  for h, rs in zip(hyps, refs):
    vh, nh, lh = vector(h)
    total = np.zeros(n)
    for r in rs:
      vr, nr, lr = vector(r)
      for k in range(n):
        dot = sum(min(v, vr[k][g]) * vr[k][g] for g, v in vh[k].items() if g in vr[k])
        if nh[k] and nr[k]:
          total[k] += dot / (nh[k] * nr[k]) * math.exp(-((lh - lr) ** 2) / (2 * sigma ** 2))
    scores.append(np.mean(total) / len(rs) * 10.0)
  return float(np.mean(scores))


def language(hypotheses, references) -> dict:
  """DriveLM language metrics; references: one list of reference strings per hypothesis."""
  b = bleu(hypotheses, references)
  exact = np.mean([tokenize(h) in [tokenize(r) for r in rs]
                   for h, rs in zip(hypotheses, references)])
  return {**{f"BLEU-{i + 1}": 100 * s for i, s in enumerate(b)},
          "ROUGE-L": 100 * rouge_l(hypotheses, references),
          "CIDEr": 100 * cider(hypotheses, references), "accuracy": 100 * float(exact)}
