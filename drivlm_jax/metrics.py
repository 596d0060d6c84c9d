"""Metrics of our benchmarks.

Multi-label (BDD-OIA): per-class average precision (sklearn's `average_precision_score`:
sum over thresholds of (R_n - R_{n-1}) P_n), mAP = mean over classes with a positive;
F1_all = sample-averaged F1 (sklearn `average='samples'`), mF1 = mean per-class F1; all in
points (0-100); and BDD-OIA's own script's F1 (`official_f1`: per batch, averaged). Language
(DriveLM): corpus BLEU-1..4, ROUGE-L and CIDEr as pycocoevalcap computes them, after its
PTB tokenizer as the DriveLM challenge does (`coco_language`; `language` adds exact-match
accuracy, for the generation evaluator), and `drivelm` scores a challenge test set (accuracy, language,
16 px match, the graph rule, the judge-free part of the final score).
"""
import collections
import math
import os
import re

import numpy as np
from absl import logging


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
  bad = int(np.sum(~np.isfinite(probabilities)))
  if bad:   # sklearn refuses them too: sorted last, each NaN would be a threshold of its own
    raise ValueError(f"{prefix}: {bad} of {probabilities.size} probabilities are NaN or "
                     "infinite (a diverged model?): no mAP or F1 to give")
  aps = [average_precision(probabilities[:, c], labels[:, c]) for c in range(labels.shape[1])]
  f1_all, mf1 = f1_scores(probabilities > threshold, labels)   # BDD-OIA's test.py: > 0.5
  return {f"{prefix}_mAP": 100 * float(np.nanmean(aps)) if not np.all(np.isnan(aps)) else 0.0,
          f"{prefix}_mF1": 100 * mf1, f"{prefix}_F1_all": 100 * f1_all}


#### Language metrics (pycocoevalcap definitions)


def tokenize(text: str) -> list:
  for ch in ".,;:!?\"'()":
    text = text.replace(ch, " ")
  return text.lower().split()


def _ngrams(tokens, n):
  return collections.Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def bleu(hypotheses, references, max_n=4, tokenizer=None) -> list:
  """Corpus BLEU-1..max_n (pycocoevalcap: closest reference length, clipped counts)."""
  tokenizer = tokenizer or tokenize
  hyp_len = ref_len = 0
  matches, totals = [0] * max_n, [0] * max_n
  for hyp, refs in zip(hypotheses, references):
    h, rs = tokenizer(hyp), [tokenizer(r) for r in refs]
    hyp_len += len(h)
    ref_len += min((abs(len(r) - len(h)), len(r)) for r in rs)[1]
    for n in range(1, max_n + 1):
      counts = _ngrams(h, n)
      best = collections.Counter()
      for r in rs:
        best |= _ngrams(r, n)
      matches[n - 1] += sum(min(c, best[g]) for g, c in counts.items())
      totals[n - 1] += max(len(h) - n + 1, 0)
  # pycocoevalcap's smoothing: (correct + 1e-15) / (guess + 1e-9) per order, and a brevity
  # penalty on the ratio (hyp + 1e-15) / (ref + 1e-9).
  tiny, small = 1e-15, 1e-9
  ratio = (hyp_len + tiny) / (ref_len + small)
  brevity = math.exp(1 - 1 / ratio) if ratio < 1 else 1.0
  scores, product = [], 1.0
  for n in range(max_n):
    product *= (matches[n] + tiny) / (totals[n] + small)
    scores.append(brevity * product ** (1 / (n + 1)))
  return scores


def _lcs(a, b):
  table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
  for i, x in enumerate(a):
    for j, y in enumerate(b):
      table[i + 1][j + 1] = table[i][j] + 1 if x == y else max(table[i][j + 1], table[i + 1][j])
  return table[-1][-1]


def rouge_l(hypotheses, references, beta=1.2, tokenizer=None) -> float:
  """Mean sentence ROUGE-L F (pycocoevalcap: max precision and recall over references)."""
  tokenizer, scores = tokenizer or tokenize, []
  for hyp, refs in zip(hypotheses, references):
    h = tokenizer(hyp)
    precisions, recalls = [], []
    for r in map(tokenizer, refs):
      lcs = _lcs(h, r)
      precisions.append(lcs / max(len(h), 1))
      recalls.append(lcs / max(len(r), 1))
    p, r = max(precisions), max(recalls)
    scores.append(((1 + beta ** 2) * p * r) / (r + beta ** 2 * p) if p and r else 0.0)
  return float(np.mean(scores))


def cider(hypotheses, references, n=4, sigma=6.0, tokenizer=None) -> float:
  """CIDEr as pycocoevalcap's `Cider` computes it (TF-IDF n-gram cosine with clipping and a
  Gaussian length penalty, document frequencies from the references, x10)."""
  tokenizer = tokenizer or tokenize
  refs = [[tokenizer(r) for r in rs] for rs in references]
  hyps = [tokenizer(h) for h in hypotheses]
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


def ptb_tokenize(texts) -> list:
  """Texts as the COCO caption scorers see them: pycocoevalcap's PTBTokenizer (Stanford
  CoreNLP's PTB tokenizer, run with Java; lowercased, punctuation tokens removed). Without
  Java, or where it cannot write its input file (into its own package folder), it says so
  and falls back to `tokenize` (lowercase, .,;:!?"'() removed)."""
  import shutil
  from pycocoevalcap.tokenizer import ptbtokenizer
  missing = ("no java on PATH" if shutil.which("java") is None else
             None if os.access(os.path.dirname(ptbtokenizer.__file__), os.W_OK) else
             f"{os.path.dirname(ptbtokenizer.__file__)} is not writable")
  if missing:
    logging.warning("%s: language metrics use drivlm_jax.metrics.tokenize instead of "
                    "pycocoevalcap's PTB tokenizer (figures may differ)", missing)
    return [" ".join(tokenize(t)) for t in texts]
  PTBTokenizer = ptbtokenizer.PTBTokenizer
  tokenized = PTBTokenizer().tokenize({i: [{"caption": t}] for i, t in enumerate(texts)})
  return [tokenized[i][0] for i in range(len(texts))]


def _coco_tokens(hypotheses, references):
  """(hypotheses, references) PTB-tokenized as COCOEvalCap does it: "_UNK" in a reference
  renamed "_UNKNOWN" (language_evaluation's CocoEvaluator), then two tokenizer runs,
  references first; the PTB tokenizer splits a text at a line break (\r, \u2028), which
  shifts the texts after it in the same run, so a generated answer must never shift the
  references."""
  refs = ptb_tokenize([r.replace("_UNK", "_UNKNOWN") for r in references])
  return ptb_tokenize(list(hypotheses)), refs


# What the PTB tokenizer reads as a line break besides "\n" (which its wrapper replaces).
_LINE_BREAKS = re.compile("[\r\x0b\x0c\x1c-\x1e\x85\u2028\u2029]")


def _coco_scores(hyps, refs) -> dict:
  """pycocoevalcap's Bleu_1..4, ROUGE_L and CIDEr (fractions) of tokenized texts, one
  reference per hypothesis. Its Rouge splits on " " (an emptied text is one empty token), its
  Bleu and Cider on whitespace runs."""
  refs, split = [[r] for r in refs], str.split
  scores = {f"Bleu_{n + 1}": b for n, b in enumerate(bleu(hyps, refs, tokenizer=split))}
  return {**scores, "ROUGE_L": rouge_l(hyps, refs, tokenizer=lambda t: t.split(" ")),
          "CIDEr": cider(hyps, refs, tokenizer=split)}


def coco_language(hypotheses, references) -> dict:
  """BLEU-1..4, ROUGE-L and CIDEr as DriveLM's challenge gets them from the COCO caption
  evaluator (language_evaluation's CocoEvaluator): PTB-tokenized text, one reference per
  hypothesis; fractions (CIDEr x10), keyed as pycocoevalcap keys them."""
  return _coco_scores(*_coco_tokens(hypotheses, references))


def language(hypotheses, references) -> dict:
  """The generation evaluator's figures, in points: `coco_language`'s BLEU-1..4, ROUGE-L and
  CIDEr (the challenge's tokens and formulas; CIDEr's document frequencies come from these
  references only, so a figure over a few answers is not comparable to one over a split),
  and `accuracy`, the share of answers whose tokens equal their reference's (case and
  punctuation ignored; the challenge's accuracy, raw strings of multiple-choice answers, is
  `drivelm`'s). references: one reference string per hypothesis. Line breaks become spaces
  (in a PTB run one would shift every later text onto its neighbour's scores)."""
  hyps, refs = (ptb_tokenize([_LINE_BREAKS.sub(" ", t) for t in texts])
                for texts in (hypotheses, references))
  scores = _coco_scores(hyps, refs)
  return {**{f"BLEU-{n}": 100 * scores[f"Bleu_{n}"] for n in range(1, 5)},
          "ROUGE-L": 100 * scores["ROUGE_L"], "CIDEr": 100 * scores["CIDEr"],
          "accuracy": 100 * float(np.mean([h == r for h, r in zip(hyps, refs)]))}


#### BDD-OIA as its own evaluation script scores it


def official_f1(probabilities, labels, batch_size: int, threshold: float = 0.5) -> float:
  """F1 as BDD-OIA's `action_prediction/test.py` reports it ("Overall acc"): sigmoid > 0.5,
  sklearn's samples-F1 of each batch of `batch_size` rows in order (the last one may be
  smaller), the mean over batches, in points. It equals the dataset-level F1_all only at
  batch size 1, and only there is it the script's figure exactly: its dataset reads the rows
  through a random permutation drawn at construction (`DataLoader_together.py`), so above 1
  its batches are random and this gives the figure for batches taken in order."""
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  predictions, labels = np.asarray(probabilities) > threshold, np.asarray(labels)
  per_batch = [f1_scores(predictions[i:i + batch_size], labels[i:i + batch_size])[0]
               for i in range(0, len(labels), batch_size)]
  return 100 * float(np.mean(per_batch))


#### DriveLM challenge scores (OpenDriveLab/DriveLM challenge/evaluation.py)

_DECIMAL = re.compile(r"\d+\.\d+")
MATCH_PIXELS = 16.0   # an answer's point matches the nearest unmatched GT point within this L1


def points(text: str, drop_odd: bool = False) -> np.ndarray:
  """The (x, y) pairs of the decimal numbers in `text` (c-tags `<c1,CAM_BACK,1088.3,497.5>`),
  [K, 2]. An odd count is an error, or drops the last number with `drop_odd` (the
  challenge does that for answers)."""
  values = [float(v) for v in _DECIMAL.findall(text)]
  if len(values) % 2:
    if not drop_odd:
      raise ValueError(f"an odd number of coordinates in {text!r}")
    values = values[:-1]
  return np.asarray(values, np.float64).reshape(-1, 2)


def match(answer: str, reference: str) -> tuple:
  """The challenge's match: each answer point in turn takes the nearest remaining reference
  point by L1 distance when it is < 16 px (a true positive, removed), else counts as a false
  positive; unmatched reference points are false negatives -> (matched reference points,
  F1 with the challenge's 1e-8 terms)."""
  remaining = list(points(reference))
  total, matched, false_positives = len(remaining), [], 0
  for p in points(answer, drop_odd=True):
    distances = [float(np.abs(p - r).sum()) for r in remaining]
    if distances and min(distances) < MATCH_PIXELS:
      matched.append(tuple(remaining.pop(int(np.argmin(distances)))))
    else:
      false_positives += 1
  tp = len(matched)
  precision = tp / (tp + false_positives + 1e-8)
  recall = tp / (tp + (total - tp) + 1e-8)
  return matched, 2 * precision * recall / (precision + recall + 1e-8)


def drivelm_counted(frames) -> list:
  """The QAs the challenge scores (the graph rule): per frame, the first QA, whose matched
  points form the frame's graph, and each later QA whose question's points are all in it."""
  counted = []
  for qas in frames:
    graph = []
    for i, qa in enumerate(qas):
      if i == 0:
        graph = match(qa["answer"], qa["gt"])[0]
      elif not all(tuple(p) in graph for p in points(qa["question"])):
        continue
      counted.append(qa)
  return counted


def drivelm(frames, language_scores=coco_language) -> dict:
  """The challenge's scores over `frames`: per frame, its QAs in order (perception,
  prediction, planning, behavior) as dicts with "question", "answer" (predicted), "gt" and
  "tag" (a list). The first QA of a frame always counts and its matched points form the
  frame's graph; a later QA counts only if every point in its question is in that graph.
  Tag 0: exact-match accuracy; 2: language (`coco_language`, as the challenge's COCO
  evaluator);
  3: match F1 (points). Tags 1 and 3 also go to the challenge's GPT judge, which is not
  run here: "judge_pairs" counts them, and "final_without_judge" is the part of the final
  score (0.4 GPT + 0.2 language + 0.2 match + 0.2 accuracy, match = (F1 + GPT) / 2) that
  needs no judge, out of 0.5."""
  exact, hypotheses, references, f1s, judge_pairs = [], [], [], [], 0
  counted = drivelm_counted(frames)
  for qa in counted:
    tags = set(qa["tag"])
    if 0 in tags:
      exact.append(qa["answer"] == qa["gt"])
    if 2 in tags:
      hypotheses.append(qa["answer"])
      references.append(qa["gt"])
    if 3 in tags:
      f1s.append(100 * match(qa["answer"], qa["gt"])[1])
    judge_pairs += (1 in tags) + (3 in tags)
  out = {"accuracy": float(np.mean(exact)) if exact else None,
         "match_F1": float(np.mean(f1s)) if f1s else None, "judge_pairs": judge_pairs,
         "counted": {"all": len(counted), "accuracy": len(exact), "language": len(hypotheses),
                     "match": len(f1s)}}
  if hypotheses:
    scores = language_scores(hypotheses, references)
    out["language"] = scores
    out["language_score"] = (sum(scores[f"Bleu_{n}"] for n in range(1, 5)) / 4 / 3
                             + scores["ROUGE_L"] / 3 + scores["CIDEr"] / 10 / 3)
  parts = (out.get("language_score"), out["accuracy"], out["match_F1"])
  out["final_without_judge"] = (None if None in parts else
                                0.2 * parts[0] + 0.2 * parts[1] + 0.1 * parts[2] / 100)
  return out
