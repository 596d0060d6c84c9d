r"""Ablations of the DriVLM student: the full method and each single-component removal.

  python -m experiments.ablate [--config configs/demo.py] [--workdir runs/demo] [--seeds 3]
      [--steps N] [--only a,b]

Each removal is one config flag (what a user passes to drivlm_jax.train):
  no_image_da      --config.loss.da_image=0
  no_token_da      --config.loss.da_token=0
  no_instance_da   --config.loss.da_instance=0
  no_reweighting   --config.model.reweight=False   (no gates, no pruning)
  no_distillation  --config.distill.teacher=       (no teacher)
  with_clip_finetuning --config.init_from=<clip_finetune run>   (the CLIP stage is off in
                   the default method; this row adds it: the student warm-starts from it,
                   as `python -m experiments.demo --clip` does)
Per seed, the teacher (method=drivlm_teacher) and, for with_clip_finetuning, the CLIP stage
(method=clip_finetune) are trained once and shared.
Runs go to <workdir>/seed<s>/<name>; the table (mean ± std over seeds, target and source
test split) to <workdir>/ablation/report.md and results.json. Finished runs are reused.
"""
import argparse
import os

from drivlm_jax import run as run_lib, train
from experiments import report
from experiments.runs import apply_overrides, flag_string, load_config_module

ABLATIONS = {
    "drivlm_student": {},        # the full method (with --workdir runs/demo: the demo's run)
    "no_image_da": {"loss.da_image": 0.0},
    "no_token_da": {"loss.da_token": 0.0},
    "no_instance_da": {"loss.da_instance": 0.0},
    "no_reweighting": {"model.reweight": False},
    "no_distillation": {"distill.teacher": ""},
    "with_clip_finetuning": {"init_from": "<clip_finetune run>"},
}
CLIP_RUN = "<clip_finetune run>"


def _train(config, workdir):
  if not run_lib.finished(workdir, config):
    train.train(config, workdir)
  return workdir


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="configs/demo.py",
                      help="a config file whose get_config takes method=, teacher=, steps=")
  parser.add_argument("--workdir", default="runs/demo",
                      help="the demo's workdir: its teachers and students are reused")
  parser.add_argument("--seeds", type=int, default=3)
  parser.add_argument("--steps", type=int, default=None)
  parser.add_argument("--only", default="", help="comma-separated subset of "
                      + ",".join(ABLATIONS))
  args = parser.parse_args()
  names = [n for n in (args.only.split(",") if args.only else ABLATIONS)]
  unknown = sorted(set(names) - set(ABLATIONS))
  if unknown:
    parser.error(f"unknown ablation(s) {unknown}; known: {sorted(ABLATIONS)}")
  get_config = load_config_module(args.config)[0].get_config
  total = args.steps or get_config().total_steps
  steps = f",steps={total}"
  cache = os.path.join(args.workdir, "data")
  runs = []
  for seed in range(args.seeds):
    root = os.path.join(args.workdir, f"seed{seed}")
    config = get_config("method=drivlm_teacher" + steps)
    config.seed, config.data.cache_dir = seed, cache
    teacher = _train(config, os.path.join(root, "drivlm_teacher"))
    for name in names:
      overrides = dict(ABLATIONS[name])
      if overrides.get("init_from") == CLIP_RUN:
        clip = get_config(f"method=clip_finetune,steps={max(1, total // 4)}")
        clip.seed, clip.data.cache_dir = seed, cache
        overrides["init_from"] = _train(clip, os.path.join(root, "clip_finetune"))
      config = get_config(f"method=drivlm_student,teacher={teacher}" + steps)
      config.seed, config.data.cache_dir = seed, cache
      apply_overrides(config, overrides)
      config.method = name
      workdir = os.path.join(root, name)
      print(f"== {name} (seed {seed}): python -m drivlm_jax.train --config "
            f"{args.config}:method=drivlm_student,teacher={teacher}{steps} --workdir {workdir} "
            f"--config.seed={seed} {flag_string(overrides)}", flush=True)
      runs.append(_train(config, workdir))
  notes = ("Each row removes one component from the DriVLM student (configs/demo.py, sim "
           "day -> night+fog): " + "; ".join(f"{n}: `{flag_string(o) or '(none)'}`"
                                             for n, o in ABLATIONS.items() if n in names))
  results = report.write(runs, os.path.join(args.workdir, "ablation"), "DriVLM ablations",
                         notes)
  print(report.markdown_table(results, "target"))


if __name__ == "__main__":
  main()
