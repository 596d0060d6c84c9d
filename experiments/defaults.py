r"""The adaptation defaults, chosen across shifts without a target label.

  python -m experiments.defaults [--workdir runs/defaults] [--shifts all] [--seeds 1]
      [--weights 0.01,0.03,0.1,0.3] [--levels image+token+instance] [--starts 0.25] [--fda 0]
      [--standardize 0] [--relation 0.3] [--pruned 1] [--deployed] [--stage teacher|student]
      [--arg method=drivlm_teacher,model=tiny_teacher] [--teacher_arg ...] [--steps N]
      [--parallel 2] [--smoke] [--report defaults]

Each candidate is a set of adversarial settings (the product of the grids): the weight of
every discriminator level that is on (`loss.da_image`, `loss.da_token`, `loss.da_instance`;
a level that is off gets 0) and the point of training where the reversal starts ramping up
(`da.start`), and optionally Fourier domain adaptation (`--fda`: its window and the share of
source rows it restyles; adapt/fourier.py) and the per-image standardisation of the input
(`--standardize 0,1`: vision.standardize), and with `--stage student` the weight of the
heads' relation distillation (`--relation`: loss.kd_relation, losses/distill.relation_kd)
and of the pruned student's (`--pruned`: loss.kd_pruned, adapt/distillation.py);
`--deployed` scores each student as deployed, pruned to its evals.target_pruned.keep_ratio
(DEV, the source criteria and the reported target mAP: eval.json's "target_pruned").
Per shift of configs/demo.py (SHIFTS) and per
seed, every candidate trains the run that the adversarial settings shape most: by default
the demo's DriVLM teacher (the larger model, adapted from scratch). Runs go to
<workdir>/<shift>/seed<s>/<candidate>. `--stage student` chooses on the deployed student
instead (the student does not simply inherit the teacher's best setting: README "The
adversarial defaults"): per shift and seed it first trains what the demo's student starts
from, at the current defaults (the teacher, `--teacher_arg`, and the CLIP stage, a quarter of
the steps; <workdir>/<shift>/seed<s>/{teacher,clip_finetune}), then every candidate is a
student (`--arg` default method=drivlm_student; <workdir>/<shift>/seed<s>/student-<candidate>)
warm-started from that CLIP stage and distilled from that teacher.

Selection (no target label read): each run is scored by Deep Embedded Validation
(experiments.select: You et al., ICML 2019: the source validation loss importance-weighted by
a domain classifier's density ratio, with the paper's control variate). DEV risks of
different shifts are not on one scale, so within each (shift, seed) the candidates are
ranked by their risk (1 = lowest), and the defaults are the candidate with the lowest mean
rank over every shift and seed (ties: the lower mean rank of the source validation loss, then
the first in grid order). This is the label-free criterion of the README's "Label-free model
selection", used across several shifts at once rather than tuned to one.

Reported beside it: the choices the label-free baselines of experiments.select would make
(source validation loss; source validation mAP), and, read only to report, each run's
target test action mAP, the candidate that target labels would have chosen (highest mean),
the chosen candidate's regret against the best per shift, and Spearman(-DEV, target mAP)
per (shift, seed). Writes <workdir>/<report>.json and <report>.md. Finished runs are reused;
interrupted ones resume, so grids searched one coordinate at a time (e.g. `--levels` at the
chosen weight, then `--starts` at the chosen levels, each with its own `--report`) share the
runs they have in common.
"""
import argparse
import itertools
import os

import jax
import numpy as np
import tqdm
from scipy import stats

from configs import common
from configs import demo as demo_config
from drivlm_jax import run as run_lib
from drivlm_jax.data import sources
from experiments import demo, jobs, select
from experiments.runs import (apply_overrides, flag_string, load_config_module, positive_int,
                              train_job)

LEVELS = select.LEVELS   # the discriminator levels, as the PAD names them


def candidates(weights, level_sets, starts, fdas=((0.0, 1.0),), standardize=(False,),
               relations=None, pruned=None) -> dict:
  """The grid -> {name: overrides} in grid order (weights outermost), e.g.
  "w0.03-image+token+instance-start0.25". A level set is a "+"-joined subset of LEVELS;
  its levels get the weight, the others 0. `fdas`: (beta, fraction) pairs of Fourier domain
  adaptation (`fda.*`); one with beta > 0 adds "-fda<beta>x<fraction>" to the name (off: the
  name is as before FDA existed, so earlier runs are reused). `standardize`: per-image
  standardisation of the input off and/or on (`model.vision.standardize`; on adds "-std").
  `relations`: weights of the student's relation distillation (`loss.kd_relation`, set in
  every candidate, 0 too; above 0 adds "-rel<weight>"); None (the teacher's grids): not set.
  `pruned`: the same for the pruned student's distillation (`loss.kd_pruned`, "-pruned<w>")."""
  out = {}
  for weight, levels, start, (beta, fraction), std, relation, kd_pruned in itertools.product(
      weights, level_sets, starts, fdas, standardize, relations or (None,), pruned or (None,)):
    on = set(levels.split("+"))
    if not on or not on <= set(LEVELS):
      raise ValueError(f"level set {levels!r}: '+'-joined names of {', '.join(LEVELS)}")
    for what, value in (("relation", relation), ("pruned", kd_pruned)):
      if value is not None and not value >= 0:   # NaN too
        raise ValueError(f"{what} weight {value:g}: a number >= 0")
    if beta < 0 or not 0 < fraction <= 1:
      raise ValueError(f"fda {beta:g}x{fraction:g}: beta >= 0, fraction in (0, 1]")
    name = (f"w{weight:g}-{levels}-start{start:g}"
            + (f"-fda{beta:g}x{fraction:g}" if beta else "") + ("-std" if std else "")
            + (f"-rel{relation:g}" if relation else "")
            + (f"-pruned{kd_pruned:g}" if kd_pruned else ""))
    out[name] = {**{f"loss.da_{level}": weight if level in on else 0.0 for level in LEVELS},
                 "da.start": start,
                 **({"fda.beta": beta, "fda.fraction": fraction} if beta else {}),
                 **({"model.vision.standardize": True} if std else {}),
                 **({} if relation is None else {"loss.kd_relation": relation}),
                 **({} if kd_pruned is None else {"loss.kd_pruned": kd_pruned})}
  return out


def parse_fdas(text: str) -> list:
  """"0,0.05x0.5" -> [(0.0, 1.0), (0.05, 0.5)]: beta, or beta x fraction (default 1)."""
  pairs = []
  for item in text.split(","):
    beta, _, fraction = item.partition("x")
    try:
      pairs.append((float(beta), float(fraction or 1.0)))
    except ValueError:
      raise ValueError(f"fda {item!r}: BETA or BETAxFRACTION, e.g. 0.05x0.5") from None
  return pairs


def parse_floats(flag: str, text: str) -> list:
  """"0,0.3" -> [0.0, 0.3]."""
  try:
    return [float(v) for v in text.split(",")]
  except ValueError:
    raise ValueError(f"{flag} {text!r}: comma-separated numbers") from None


def parse_switch(flag: str, text: str) -> list:
  """"0,1" -> [False, True]."""
  values = {"0": False, "1": True}
  if not text or any(v not in values for v in text.split(",")):
    raise ValueError(f"{flag} {text!r}: comma-separated 0 and/or 1")
  return [values[v] for v in text.split(",")]


def choose(groups: dict, tiebreak: dict | None = None) -> dict:
  """The label-free choice over {"shift/seed<s>": {candidate: DEV risk}} (every group scores
  the same candidates). -> {"ranks": {candidate: {group: rank}}, "mean_rank": {candidate:
  mean}, "chosen": the lowest mean rank}. Ranks: 1 = lowest risk, ties get the mean of their
  ranks (scipy.stats.rankdata's "average"). Candidates tied on the lowest mean rank are
  told apart by `tiebreak` ({candidate: value}, lowest wins; e.g. another criterion's mean
  rank), then by grid order."""
  names = list(next(iter(groups.values())))
  ranks = {name: {} for name in names}
  for group, risks in groups.items():
    if list(risks) != names:
      raise ValueError(f"group {group} scores {list(risks)}, expected {names}")
    for name, rank in zip(names, stats.rankdata([risks[n] for n in names])):
      ranks[name][group] = float(rank)
  mean_rank = {name: float(np.mean(list(r.values()))) for name, r in ranks.items()}
  best = min(mean_rank.values())
  tied = [name for name in names if mean_rank[name] == best]
  chosen = min(tied, key=lambda name: (tiebreak or {}).get(name, 0.0))
  return {"ranks": ranks, "mean_rank": mean_rank, "chosen": chosen}


def _mean(values):
  return float(np.mean(values)) if values else None


# Label-free criteria as risks (lower = better) of a run's select.score_run row: DEV chooses;
# the other two, the baselines of experiments.select, are reported beside it.
CRITERIA = {"DEV": lambda row: row["dev_risk"],
            "source val loss": lambda row: row["source_loss"],
            "source val mAP": lambda row: -row["source_mAP"]}


def summarise(rows: list, names: list, shifts: list) -> dict:
  """Runs' select.score_run rows (with "shift", "seed", "candidate") -> the choice and what
  target labels say of it (reported, never used to choose)."""
  missing = [row["run_dir"] for row in rows if row["oracle_target_mAP"] is None]
  if missing:   # the sim's targets are labelled: a run without the score did not finish
    raise ValueError(f"no target test action_mAP in eval.json of {', '.join(missing)}: "
                     f"re-run its evaluation (python -m drivlm_jax.evaluate)")
  oracle, risks = {}, {criterion: {} for criterion in CRITERIA}
  for row in rows:
    key = f"{row['shift']}/seed{row['seed']}"
    oracle.setdefault(key, {})[row["candidate"]] = row["oracle_target_mAP"]
    for criterion, risk in CRITERIA.items():
      risks[criterion].setdefault(key, {})[row["candidate"]] = risk(row)
  ordered = {c: {k: {n: v[n] for n in names} for k, v in groups.items()}
             for c, groups in risks.items()}
  choices = {c: choose(groups) for c, groups in ordered.items() if c != "DEV"}
  # DEV chooses; its ties go to the source validation loss's lower mean rank
  choices["DEV"] = choose(ordered["DEV"], choices["source val loss"]["mean_rank"])
  result, groups = choices["DEV"], ordered["DEV"]
  per_shift = {n: {s: _mean([oracle[k][n] for k in oracle if k.startswith(s + "/")])
                   for s in shifts} for n in names}
  mean_map = {n: _mean(list(v.values())) for n, v in per_shift.items()}
  source = {n: _mean([r["source_mAP"] for r in rows if r["candidate"] == n]) for n in names}
  chosen = result["chosen"]
  agreement = {k: select.agreement([-groups[k][n] for n in names],
                                   [oracle[k][n] for n in names], names) for k in groups}
  return {**result, "source_mAP": source, "target_mAP": per_shift, "mean_target_mAP": mean_map,
          "by_target_labels": max(names, key=mean_map.get),
          "by_criterion": {c: choice["chosen"] for c, choice in choices.items()},
          "regret": {s: max(per_shift[n][s] for n in names) - per_shift[chosen][s]
                     for s in shifts},
          "agreement": agreement}


def markdown(summary: dict, overrides: dict, shifts: list) -> str:
  lines = ["| candidate | overrides | mean DEV rank | source val mAP | "
           + " | ".join(f"target mAP {s}" for s in shifts) + " | mean target mAP |",
           "|" + "---|" * (5 + len(shifts))]
  for name, flags in overrides.items():
    mark = " (chosen)" if name == summary["chosen"] else ""
    lines.append(f"| {name}{mark} | `{flag_string(flags)}` | {summary['mean_rank'][name]:.2f} | "
                 f"{summary['source_mAP'][name]:.1f} | "
                 + " | ".join(f"{summary['target_mAP'][name][s]:.1f}" for s in shifts)
                 + f" | {summary['mean_target_mAP'][name]:.1f} |")
  lines += ["", "Source val mAP: the mean over shifts and seeds of the source validation "
            "action mAP (source labels), which DEV's risk weighs; target mAP: the mean over "
            "seeds, read only for this report.",
            f"Chosen without target labels (lowest mean DEV rank): {summary['chosen']}.",
            f"Target labels would choose (highest mean target mAP): "
            f"{summary['by_target_labels']}.",
            "The other label-free criteria of experiments.select (lowest mean rank) would "
            "choose: " + "; ".join(
                f"{c}: {n} ({summary['mean_target_mAP'][n]:.1f} mean target mAP)"
                for c, n in summary["by_criterion"].items() if c != "DEV") + ".",
            "Regret of the choice per shift (target mAP points): "
            + ", ".join(f"{s} {v:.1f}" for s, v in summary["regret"].items()) + ".",
            "Spearman(-DEV risk, target mAP) per shift and seed: "
            + ", ".join(f"{g} {'-' if a['spearman'] is None else format(a['spearman'], '.2f')}"
                        for g, a in summary["agreement"].items()) + "."]
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", default="runs/defaults")
  parser.add_argument("--shifts", default="all",
                      help="comma-separated shifts of configs/demo.py, or all: "
                      + ",".join(demo_config.SHIFTS))
  parser.add_argument("--seeds", type=positive_int, default=1)
  parser.add_argument("--weights", default="0.01,0.03,0.1,0.3",
                      help="adversarial weight of each level that is on")
  parser.add_argument("--levels", default="image+token+instance",
                      help="comma-separated level sets, each '+'-joined")
  parser.add_argument("--starts", default="0.25",
                      help="da.start: fraction of training before the reversal ramps up")
  parser.add_argument("--fda", default="0",
                      help="Fourier domain adaptation settings, comma-separated BETA or "
                      "BETAxFRACTION (0: off; configs/demo.py fda=, fda_fraction=)")
  parser.add_argument("--standardize", default="0",
                      help="per-image standardisation of the input, comma-separated 0 (off) "
                      "and/or 1 (on) (configs/demo.py standardize=)")
  parser.add_argument("--relation", default=None,
                      help="--stage student: weights of the heads' relation distillation, "
                      f"comma-separated (loss.kd_relation; 0: off; default "
                      f"{common.KD_RELATION:g}, the student's)")
  parser.add_argument("--pruned", default=None,
                      help="--stage student: weights of the pruned student's distillation, "
                      f"comma-separated (loss.kd_pruned; 0: off; default "
                      f"{common.KD_PRUNED:g}, the student's)")
  parser.add_argument("--deployed", action="store_true",
                      help="--stage student: score each student pruned as deployed")
  parser.add_argument("--stage", default="teacher", choices=("teacher", "student"),
                      help="the run the candidates train: the teacher from scratch, or the "
                      "student from a teacher and a CLIP stage trained first per shift and seed")
  parser.add_argument("--arg", default="",
                      help="configs/demo.py args of every candidate's run, a method with "
                      "discriminators (default: method=drivlm_teacher,model=tiny_teacher; "
                      "--stage student: method=drivlm_student)")
  parser.add_argument("--teacher_arg", default="",
                      help="--stage student: configs/demo.py args of the teacher (default: "
                      "method=drivlm_teacher,model=tiny_teacher)")
  parser.add_argument("--steps", type=int, default=None)
  parser.add_argument("--max_examples", type=int, default=512,
                      help="examples per split that DEV reads (experiments.select)")
  parser.add_argument("--parallel", type=int, default=2,
                      help="runs trained at a time (experiments.jobs; logs in <run>/log.txt)")
  parser.add_argument("--report", default="defaults",
                      help="the report's name: <workdir>/<report>.json and .md")
  parser.add_argument("--smoke", action="store_true",
                      help="small sim data (experiments.demo --smoke): a check, not a result")
  args = parser.parse_args()
  shifts = list(demo_config.SHIFTS) if args.shifts == "all" else args.shifts.split(",")
  unknown = sorted(set(shifts) - set(demo_config.SHIFTS))
  if unknown:
    parser.error(f"unknown shift(s) {unknown}; known: {', '.join(demo_config.SHIFTS)}")
  try:
    overrides = candidates(parse_floats("--weights", args.weights), args.levels.split(","),
                           parse_floats("--starts", args.starts), parse_fdas(args.fda),
                           parse_switch("--standardize", args.standardize),
                           None if args.stage == "teacher" else parse_floats(
                               "--relation", args.relation or f"{common.KD_RELATION:g}"),
                           None if args.stage == "teacher" else parse_floats(
                               "--pruned", args.pruned or f"{common.KD_PRUNED:g}"))
  except ValueError as e:
    parser.error(str(e))
  for flag, given in (("--relation", args.relation is not None),
                      ("--pruned", args.pruned is not None), ("--deployed", args.deployed)):
    if given and args.stage == "teacher":
      parser.error(f"{flag} with --stage teacher: the teacher distils from nothing and is "
                   f"not pruned")
  get_config = load_config_module("configs/demo.py")[0].get_config
  student = args.stage == "student"
  teacher_arg = f"method=drivlm_teacher,model={demo.TEACHER}"
  arg = args.arg or ("method=drivlm_student" if student else teacher_arg)
  keys = lambda text: [item.partition("=")[0] for item in filter(None, text.split(","))]
  if "steps" in keys(arg) + keys(args.teacher_arg):
    parser.error("steps= in --arg/--teacher_arg: pass --steps (every run's; the CLIP stage "
                 "trains a quarter)")
  if args.teacher_arg and not student:
    parser.error("--teacher_arg is read with --stage student only")
  if student and any("model.vision.standardize" in o for o in overrides.values()):
    parser.error("--standardize 1 with --stage student: the student's teacher and CLIP stage "
                 "are trained once, without it; compare it with --stage teacher")
  # --arg's keys other than the run's own (e.g. dataset=, fda=) shape its teacher and CLIP
  # stage too, as in the demo.
  shared = ",".join(item for item in filter(None, arg.split(","))
                    if item.partition("=")[0] not in ("method", "model", "teacher", "init"))
  total = args.steps or get_config(shared).total_steps

  def job(name, run_arg, shift, seed, flags=None, init_from="", needs=()):
    config = apply_overrides(get_config(f"{run_arg},shift={shift}"), flags or {})
    config.seed, config.data.cache_dir = seed, sources.cache_root({}, os.path.join(
        args.workdir, shift))
    config.init_from = init_from or config.init_from
    if args.smoke:
      demo.smoke_config(config)
    workdir = os.path.join(args.workdir, shift, f"seed{seed}", name)
    print(f"== {shift} seed {seed} {name}: python -m drivlm_jax.train --config "
          f"configs/demo.py:{run_arg},shift={shift} --workdir {workdir} --config.seed={seed} "
          + (f"--config.init_from={init_from} " if init_from else "")
          + flag_string(flags or {}), flush=True)
    return train_job(f"{shift} seed {seed} {name}", config, workdir, needs)

  todo, runs = [], []
  for shift in shifts:
    for seed in range(args.seeds):
      init_from, extra, needs, prefix = "", "", (), ""
      if student:   # what the demo's student starts from, at the current defaults
        teacher = job("teacher", ",".join(filter(None, [
            shared, args.teacher_arg or teacher_arg, f"steps={total}"])), shift, seed)
        clip = job("clip_finetune", ",".join(filter(None, [
            shared, "method=clip_finetune",
            f"steps={common.stage_steps('clip_finetune', total)}"])), shift, seed)
        todo += [teacher, clip]
        needs, prefix = (teacher.name, clip.name), "student-"
        init_from, extra = clip.args[1], f",teacher={teacher.args[1]}"
      for name, flags in overrides.items():
        todo.append(job(prefix + name, f"{arg}{extra},steps={total}", shift, seed, flags,
                        init_from, needs))
        runs.append({"shift": shift, "seed": seed, "candidate": name,
                     "run_dir": todo[-1].args[1]})
    # each shift's sim, once, before its runs start
    sources.prepare(todo[-1].args[0].data, os.path.join(args.workdir, shift))
  # Programs the runs share compile once (a local folder, for a gs:// workdir too).
  cache = os.path.join(run_lib.local_dir(args.workdir), "xla_cache")
  jax.config.update("jax_compilation_cache_dir", cache)
  jobs.run(todo, args.parallel, demo.worker_init, (cache,))
  notes, rows = [], []
  for run in tqdm.tqdm(runs, desc="DEV per run"):
    rows.append({**run, **select.score_run(run["run_dir"], args.max_examples, notes,
                                            args.deployed)})
  summary = summarise(rows, list(overrides), shifts)
  text = markdown(summary, overrides, shifts) + "".join(f"\n- {note}" for note in notes)
  run_lib.write_json(run_lib.path(args.workdir, f"{args.report}.json"),
                     {**summary, "candidates": overrides, "runs": rows, "notes": notes})
  run_lib.write_text(run_lib.path(args.workdir, f"{args.report}.md"), text + "\n")
  print(text)
  print(f"wrote {args.workdir}/{args.report}.json and .md")


if __name__ == "__main__":
  main()
