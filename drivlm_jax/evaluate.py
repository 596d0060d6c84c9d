r"""Evaluates a run: `python -m drivlm_jax.evaluate --config configs/X.py[:arg] --workdir DIR
[--split test]`. Restores the latest checkpoint of DIR, runs every evaluator of
`config.evals` (see `drivlm_jax.evals`) and writes DIR/eval.json:
{split: {"source"|"target"|...: {action_mAP, action_mF1, action_F1_all (dataset level),
action_F1_official (BDD-OIA's script: per batch, averaged), reason_..., BLEU-1..4, ROUGE-L,
CIDEr, accuracy}}, "step": N} in points (0-100), and prints it as a table.

With --drivelm (nuScenes-Drive data with DriveLM QA) it also answers the DriveLM challenge's
test questions of the target test frames (`data/drivelm_questions.py`), writes
DIR/drivelm_predictions.json in the challenge's format and adds the challenge's judge-free
scores. `python -m drivlm_jax.evaluate --drivelm_test TEST.json
--drivelm_predictions PRED.json [--judge CMD] [--workdir DIR]` scores a DriveLM challenge
prediction file as the challenge does (`evals/drivelm.py`), prints the scores and, with
--workdir, adds them to its eval.json under "drivelm".
"""
if __name__ == "__main__":  # before JAX loads: the restarted process loads it once
  from drivlm_jax import host
  host.restart_with_tunables()

import dataclasses
import json

import jax
from absl import app, flags, logging

from drivlm_jax import evals, pretrained, run as run_lib
from drivlm_jax.evals import drivelm
from drivlm_jax.data import drivelm_questions, sources

from_config = evals.from_config


def run(evaluators, cfg, params, data, feats, workdir, step=None, place=None,
        merge=False) -> dict:
  """Runs `evaluators` (on every host, batches placed by `place`; see `evals.Evaluator`),
  writes workdir/eval.json, prints a table; -> {split: {domain: ...}}. Training writes
  eval.json whole; with `merge` (the evaluate CLI: `--split train`, `--drivelm` on a
  finished run) it keeps what eval.json holds of the same step that this evaluation does not
  recompute (other splits, domains, metrics, DriveLM scores) and drops an older step's."""
  result = {}
  for evaluator in evaluators:
    split, domain = evaluator.key
    result.setdefault(split, {}).setdefault(domain, {}).update(
        evaluator.run(cfg, params, data, feats, place, workdir))
  if jax.process_index() == 0:
    path = run_lib.path(workdir, "eval.json")
    saved = run_lib.read_json(path) if merge and path.exists() else {}
    kept = saved if saved.get("step") == step else {}
    for split, domains in result.items():
      for domain, values in domains.items():
        kept.setdefault(split, {}).setdefault(domain, {}).update(values)
    run_lib.write_json(path, {**kept, "step": step})
    print(format_table(result, step))
  return result


def format_table(result, step=None) -> str:
  lines = []
  for split, domains in result.items():
    names = list(dict.fromkeys(n for values in domains.values() for n in values))
    lines.append(f"eval {split}" + (f" @ step {step}" if step is not None else ""))
    lines.append(f"{'domain':13s} " + " ".join(f"{n:>13s}" for n in names))
    for domain, values in domains.items():
      lines.append(f"{domain:13s} " + " ".join(f"{values[n]:13.1f}" if n in values
                                              else f"{'-':>13s}" for n in names))
  return "\n".join(lines)


def score_drivelm(test_path, predictions_path, judge_cmd=None, workdir=None) -> dict:
  # Local or bucket paths (a bucket run writes its drivelm_predictions.json there).
  test = drivelm_questions.test_set(json.loads(run_lib.path(test_path).read_text()), test_path)
  drivelm.check_scorable(test, test_path)
  test = drivelm.with_answers(test, test_path)
  if test is None:
    raise ValueError(f"{test_path}: every answer is empty (questions only, as the challenge's "
                     f"v1_1_val_nus_q_only.json): its answers are on the challenge's server")
  predictions = json.loads(run_lib.path(predictions_path).read_text())
  judge = drivelm.judge_command(judge_cmd) if judge_cmd else None
  scores = drivelm.score(test, predictions, judge)
  print(json.dumps(scores, indent=1))
  if workdir:
    path = run_lib.path(workdir, "eval.json")
    saved = run_lib.read_json(path) if path.exists() else {}
    run_lib.write_json(path, {**saved, "drivelm": scores})
  return scores


def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:   # as train: user errors are one line
    logging.set_verbosity(logging.WARNING)
  with run_lib.user_errors():
    _main()


def _main():
  if flags.FLAGS.drivelm_predictions or flags.FLAGS.drivelm_test:
    if not (flags.FLAGS.drivelm_predictions and flags.FLAGS.drivelm_test):
      raise ValueError("--drivelm_test and --drivelm_predictions go together")
    for flag in ("drivelm_test", "drivelm_predictions"):
      if not run_lib.path(flags.FLAGS[flag].value).exists():
        raise FileNotFoundError(f"--{flag} {flags.FLAGS[flag].value}: no such file")
    score_drivelm(flags.FLAGS.drivelm_test, flags.FLAGS.drivelm_predictions,
                  flags.FLAGS.judge, flags.FLAGS.workdir)
    return
  config, workdir = run_lib.flag_values()
  evaluate_run(config, workdir, flags.FLAGS.split, flags.FLAGS.drivelm)


def evaluate_run(config, workdir, split=None, with_drivelm=False) -> dict:
  """Evaluates the latest checkpoint of `workdir`, a run of `config` (a pretrained start's
  model read from its checkpoints, as train builds it; from the run's config.json when they
  are gone), and merges the results into its eval.json; `split` replaces each evaluator's
  own, `with_drivelm` adds the DriveLM challenge's QA of the target test frames. -> this
  evaluation's {split: {domain: ...}}."""
  if split not in (None, "train", "test"):
    raise ValueError(f"split {split!r}: 'train' or 'test' (a layout with val but no test "
                     f"split evaluates val as 'test')")
  try:
    config = pretrained.configure(config)
  except (OSError, ValueError) as e:   # a pretrained source moved since: the run's own record
    stored = run_lib.read_config(workdir)
    logging.warning("%s; the model (and tokenizer) as %s/config.json records them", e, workdir)
    config = config.copy_and_resolve_references()
    config.model = stored.model
    if not config.data.get("tokenizer"):
      config.data.tokenizer = stored.data.get("tokenizer", "")
  cfg = run_lib.model_config(config)
  # Before the data: a folder that is not a run gets nothing written into it.
  params, step = run_lib.load_params(workdir, cfg)
  changes = run_lib.differs_at(workdir, config)
  if changes:
    print(f"warning: evaluating {workdir} with another config than it was trained with "
          f"({changes})", flush=True)
  data = sources.prepare(config.data, workdir)
  feats = run_lib.features(config, cfg, data["tokenizer"])
  evaluators = from_config(config)
  if with_drivelm:   # DriveLM's QA of the target test frames, as the challenge scores
    evaluators.append(drivelm.DriveLM(name="drivelm", every=1, role="target",
                                      batch_size=config.evals.target.batch_size))
  if split:
    evaluators = [dataclasses.replace(e, split=split) for e in evaluators]
  return run(evaluators, cfg, params, data, feats, workdir, step, merge=True)


if __name__ == "__main__":
  run_lib.define_flags()
  flags.DEFINE_string("split", None, "Evaluate this split (default: each evaluator's own).")
  flags.DEFINE_bool("drivelm", False, "Also answer the DriveLM challenge's test questions of "
                    "the target test frames, write drivelm_predictions.json and score it "
                    "(evals/drivelm.py).")
  flags.DEFINE_string("drivelm_test", None, "A DriveLM QA file to score against: released "
                      "(its test questions derived) or in test_eval.json form.")
  flags.DEFINE_string("drivelm_predictions", None, "Predictions in the challenge's format.")
  flags.DEFINE_string("judge", None, "The GPT-score judge: a command reading JSON lines "
                      "{question, answer, gt} and writing a 0-100 score per line; a local "
                      "LLM: 'python -m drivlm_jax.evals.judge --model DIR'.")
  app.run(main, flags_parser=run_lib.parse_flags)
