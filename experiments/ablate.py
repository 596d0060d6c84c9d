r"""Ablations of the DriVLM student: the full method, each single-component removal, variants.

  python -m experiments.ablate [--config configs/demo.py] [--workdir runs/demo] [--seeds 3]
      [--steps N] [--only a,b] [--arg shift=camera] [--parallel 2]

The full method is the demo's: the student warm-started from the CLIP stage
(--config.init_from=<clip_finetune run>) and distilled from the larger teacher
(method=drivlm_teacher,model=tiny_teacher). Each removal is one config flag on it (what a
user passes to drivlm_jax.train):
  no_clip_finetuning  --config.init_from=     (a fresh student)
  no_image_da      --config.loss.da_image=0
  no_token_da      --config.loss.da_token=0
  no_instance_da   --config.loss.da_instance=0
  no_da            all three levels 0                (no discriminator at all)
  no_reweighting   --config.model.reweight=False   (no gates, no pruning: with
                   --config.loss.kd_pruned=0, the pruned student's distillation)
  no_distillation  --config.distill.teacher=       (no teacher)
  no_relation_kd   --config.loss.kd_relation=0     (the heads' KD without their ranking term)
  no_pruned_kd     --config.loss.kd_pruned=0       (the pruned student's heads not distilled)
and variants:
  kd_target_rows   --config.distill.rows=target    (the teacher teaches the unlabelled target
                                                   rows only; source rows learn from labels)
  kd_heads_mean    --config.distill.heads=mean     (the heads' KD averaged over their classes,
                                                   as their BCE is, not summed)
The baselines source_only, dann and entmin (methods of their own) are rows too. Per seed,
the teacher and the CLIP stage (method=clip_finetune, a quarter of the steps;
configs/common.py:stage_steps) are trained once and shared. The report gives each row's
paired per-seed difference against the full method (drivlm_student) with its 95% interval.
Runs go to <workdir>/seed<s>/<name>; the table (mean ± std over seeds, target and source
test split) to <workdir>/ablation/report.md and results.json. Finished runs are reused. A
gs:// workdir keeps all of that in the bucket; the runs' logs and the built data stay on
local disk (under ~/.cache/drivlm_jax/<bucket>/<path>).
"""
if __name__ == "__main__":  # before JAX loads: the restarted process loads it once
  from drivlm_jax import host
  host.restart_with_tunables()

import argparse
import os

from configs import common
from drivlm_jax import run as run_lib
from drivlm_jax.data import sources
from experiments import jobs, report
from experiments.runs import (apply_overrides, flag_string, load_config_module, positive_int,
                              train_job)

CLIP_RUN = "<clip_finetune run>"
_FULL = {"init_from": CLIP_RUN}   # the full method warm-starts from the CLIP stage
ABLATIONS = {
    "drivlm_student": _FULL,     # the full method (with --workdir runs/demo: the demo's run)
    "no_clip_finetuning": {},
    "no_image_da": {**_FULL, "loss.da_image": 0.0},
    "no_token_da": {**_FULL, "loss.da_token": 0.0},
    "no_instance_da": {**_FULL, "loss.da_instance": 0.0},
    "no_da": {**_FULL, "loss.da_image": 0.0, "loss.da_token": 0.0, "loss.da_instance": 0.0},
    "no_reweighting": {**_FULL, "model.reweight": False, "loss.kd_pruned": 0.0},
    "no_distillation": {**_FULL, "distill.teacher": ""},
    "no_relation_kd": {**_FULL, "loss.kd_relation": 0.0},
    "no_pruned_kd": {**_FULL, "loss.kd_pruned": 0.0},
    "kd_target_rows": {**_FULL, "distill.rows": "target"},
    "kd_heads_mean": {**_FULL, "distill.heads": "mean"},
}
BASELINES = ("source_only", "dann", "entmin")


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="configs/demo.py",
                      help="a config file whose get_config takes method=, teacher=, steps=")
  parser.add_argument("--workdir", default="runs/demo",
                      help="the demo's workdir: its teachers and students are reused")
  parser.add_argument("--seeds", type=positive_int, default=3)
  parser.add_argument("--steps", type=int, default=None)
  parser.add_argument("--only", default="", help="comma-separated subset of "
                      + ",".join((*ABLATIONS, *BASELINES)))
  parser.add_argument("--parallel", type=int, default=2,
                      help="runs trained at a time, each in a worker process of its own "
                      "(experiments.jobs; logs in <run>/log.txt); 1: one after another here")
  parser.add_argument("--arg", default="", help="more config args for every run, e.g. "
                      "shift=camera (configs/demo.py)")
  args = parser.parse_args()
  names = [n for n in (args.only.split(",") if args.only else (*ABLATIONS, *BASELINES))]
  unknown = sorted(set(names) - set(ABLATIONS) - set(BASELINES))
  if unknown:
    parser.error(f"unknown row(s) {unknown}; known: {sorted((*ABLATIONS, *BASELINES))}")
  get_config = load_config_module(args.config)[0].get_config
  total = args.steps or get_config().total_steps
  extra = f",{args.arg}" if args.arg else ""
  steps = f",steps={total}" + extra
  cache = sources.cache_root({}, args.workdir)   # local: <workdir>/data or ~/.cache/...
  todo, runs = [], []

  def job(name, seed, config, needs=()):
    config.seed, config.data.cache_dir = seed, cache
    workdir = os.path.join(args.workdir, f"seed{seed}", name)
    return train_job(f"{name} (seed {seed})", config, workdir, [n.name for n in needs])
  for seed in range(args.seeds):
    teacher = job("drivlm_teacher", seed, get_config(
        "method=drivlm_teacher,model=tiny_teacher"
        + f",steps={common.stage_steps('drivlm_teacher', total)}" + extra))
    clip = job("clip_finetune", seed, get_config(
        "method=clip_finetune" + f",steps={common.stage_steps('clip_finetune', total)}" + extra))
    if any(n in ABLATIONS for n in names):   # the baselines need neither
      todo.append(teacher)
    if any(ABLATIONS[n].get("init_from") == CLIP_RUN for n in names if n in ABLATIONS):
      todo.append(clip)
    for name in (n for n in names if n in ABLATIONS):
      overrides = dict(ABLATIONS[name])
      needs = [teacher]
      if overrides.get("init_from") == CLIP_RUN:
        overrides["init_from"], needs = clip.args[1], [teacher, clip]
      teacher_dir = teacher.args[1]
      config = get_config(f"method=drivlm_student,teacher={teacher_dir}" + steps)
      apply_overrides(config, overrides)
      config.method = name
      todo.append(job(name, seed, config, needs))
      print(f"== {name} (seed {seed}): python -m drivlm_jax.train --config "
            f"{args.config}:method=drivlm_student,teacher={teacher_dir}{steps} --workdir "
            f"{todo[-1].args[1]} --config.seed={seed} {flag_string(overrides)}", flush=True)
    for name in (n for n in names if n in BASELINES):
      todo.append(job(name, seed, get_config(f"method={name}" + steps)))
    runs += [os.path.join(args.workdir, f"seed{seed}", n)
             for n in (*(n for n in names if n in BASELINES),
                       *(n for n in names if n in ABLATIONS))]
  sources.prepare(teacher.args[0].data, args.workdir)   # the sim, once, before any run
  jobs.run(todo, args.parallel)
  notes = ("Each row removes one component from the DriVLM student or changes it "
           f"({args.config}, {args.arg or 'its default shift'}): "
           + "; ".join(f"{n}: `{flag_string(o) or '(none)'}`"
                       for n, o in ABLATIONS.items() if n in names))
  out = os.path.join(args.workdir, "ablation")
  results = report.write(runs, out, "DriVLM ablations", notes)
  differences = report.paired_table(
      results, [(f"{n} - drivlm_student", n, "drivlm_student") for n in names
                if n != "drivlm_student"])
  run_lib.append_text(run_lib.path(out, "report.md"),
                      "\n## Paired differences against the full method\n\n" + differences
                      + "\n")
  print(report.markdown_table(results, "target"))
  print(differences)


if __name__ == "__main__":
  main()
