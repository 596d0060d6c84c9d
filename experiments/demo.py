r"""The demo on the embedded default: the procedural world's day domain (source, labelled)
adapted to night+fog (target, unlabelled), on CPU.

  python -m experiments.demo [--workdir runs/demo] [--seeds 1] [--first_seed 0] [--steps 400]
      [--noclip] [--nobaselines] [--shift night_fog|rain_snow|camera|sensor|all] [--smoke]
      [--parallel 2]
  python -m experiments.demo --dataset nuscenes --nobaselines --workdir runs/demo_nuscenes

Per seed, runs of `python -m drivlm_jax.train --config configs/demo.py:method=M`:
  source_only      the tiny VLM on labelled source only
  dann             baseline: + one image-level domain discriminator (gradient reversal)
  entmin           baseline: + entropy minimisation on the unlabelled target
  clip_finetune    the CLIP fine-tuning stage (vision tower + CLIP text tower, contrastive
                   on image-caption pairs of both domains, a quarter of the steps); --noclip
                   skips it
  drivlm_teacher   the larger teacher (model=tiny_teacher: twice the width and depth, at
                   its width's learning rate, configs/demo.py:learning_rate),
                   adapted with unlabelled target: domain discriminators at the image, token
                   and instance level and instruction-guided token reweighting (from scratch:
                   warm-started from a stage of another model size it cannot be)
  drivlm_student   the tiny student warm-started from the CLIP stage, adapted the same way
                   (at its own adversarial weight, configs/common.DA_WEIGHT) and distilled
                   from the frozen teacher (heads, their ranking of the images, LM tokens,
                   visual tokens);
                   evaluated with every visual token and pruned to the keep ratio of its
                   evals.target_pruned, as deployed ("target_pruned")
  oracle           the tiny VLM on labelled source and labelled target rows (as many source
                   rows per step as the others, plus as many target rows: the upper bound)
Runs train two at a time (--parallel), each in a worker process of its own
(`experiments.jobs`, its output in <run>/log.txt), the teacher first; the student starts once
the teacher and the CLIP stage are done. The results are those of one run at a time, byte for
byte. Every method is evaluated on the target (and source) test split (1,000 images each). Writes
<workdir>/results.json, report.md, results.csv and plots (training curves, mAP by method,
PCA of pooled features, reweighting heat-maps), exports the first seed's student to
<workdir>/student.onnx (export.to_onnx, checked against JAX) and times it in onnxruntime and
JAX. --shift all runs every shift of configs/demo.py (SHIFTS) into <workdir>/<shift> and
writes one table per shift to <workdir>/shifts.md. Re-running resumes or reuses runs. A
gs:// workdir keeps runs and reports in the bucket; the logs, the built data, XLA's cache and
the ONNX files stay on local disk (under ~/.cache/drivlm_jax/<bucket>/<path>).

--dataset nuscenes: the sim in the nuScenes + DriveLM layout, six cameras per example
(configs/demo.py:dataset=nuscenes), day Boston -> night+rain Singapore; the report adds the
DriveLM challenge's scores per method on the target test frames (evals.target_drivelm).
"""
if __name__ == "__main__":  # before JAX loads: the restarted process loads it once
  from drivlm_jax import host
  host.restart_with_tunables()

import os
import time

import jax
import onnxruntime as ort
from absl import app, flags, logging

from configs import common, demo as demo_config
from drivlm_jax import run as run_lib, timing, visualize
from drivlm_jax.data import sources
from experiments import bench_pruning, jobs, report
from experiments.runs import log_file, train_once
from export import graphs, inputs, kernels, to_onnx

_WORKDIR = flags.DEFINE_string("workdir", "runs/demo", "Where the runs and the report go.")
_SEEDS = flags.DEFINE_integer("seeds", 1, "Training seeds per method.", lower_bound=1)
_FIRST_SEED = flags.DEFINE_integer("first_seed", 0, "The seeds are first_seed, ..., "
                                   "first_seed + seeds - 1: e.g. --first_seed 3 --seeds 2 adds "
                                   "seeds 3 and 4 to a workdir (a later --seeds 5 reuses them).")
_STEPS = flags.DEFINE_integer("steps", None, "Training steps (default: the config's).")
_CLIP = flags.DEFINE_bool("clip", True, "Run the CLIP fine-tuning stage and warm-start the "
                          "student from it (the teacher trains from scratch); --noclip skips "
                          "it.")
_BASELINES = flags.DEFINE_bool("baselines", True, "Run the DANN and entropy-minimisation "
                               "baselines; --nobaselines skips them.")
_SHIFT = flags.DEFINE_enum("shift", "night_fog", [*demo_config.SHIFTS, "all"],
                           "The domain shift (configs/demo.py SHIFTS); all: every shift, one "
                           "table each, runs in <workdir>/<shift>.")
_DATASET = flags.DEFINE_enum(
    "dataset", "bdd_oia", ["bdd_oia", "nuscenes"],
    "The sim's layout: bdd_oia (one camera, day -> night+fog) or nuscenes (six cameras with "
    "DriveLM QA, day Boston -> night+rain Singapore, scored as the DriveLM challenge).")
_PARALLEL = flags.DEFINE_integer(
    "parallel", 2, "Runs trained at a time, each in a worker process of its own "
    "(experiments.jobs; logs in <run>/log.txt); 1: one after another in this process. The "
    "results are the same either way.")
_SMOKE = flags.DEFINE_bool("smoke", False, "A quick end-to-end check, not a result: small "
                           "sim data (48 train / 16 test images per domain, 128x72) and 2 "
                           "generated answers of 8 tokens per evaluation.")


# The paired differences the report shows: (label, a, b[, a's domain, b's domain]).
PAIRS = (("student - source-only", "drivlm_student", "source_only"),
         ("student - DANN", "drivlm_student", "dann"),
         ("student - entropy min.", "drivlm_student", "entmin"),
         ("teacher - source-only", "drivlm_teacher", "source_only"),
         ("oracle - student", "oracle", "drivlm_student"),
         ("pruned student - student", "drivlm_student", "drivlm_student", "target_pruned",
          "target"))
TEACHER = "tiny_teacher"   # the teacher's preset: twice the student's width and depth
DESCRIPTIONS = {"nuscenes": "six-camera nuScenes-Drive, day Boston -> night+rain Singapore"}
DRIVELM_METRICS = ("action_mAP", "drivelm_accuracy", "drivelm_language", "drivelm_match_F1",
                   "drivelm_final_without_judge")


def smoke_config(config):
  """--smoke: small sim data and short generations (also experiments.defaults --smoke)."""
  config.data.width, config.data.height = 128, 72
  nuscenes = config.data.get("sim_layout") == "nuscenes"   # counts in scenes of ~10 frames
  for domain in (config.data.source, config.data.target):
    domain.update(dict(train=5, test=2) if nuscenes else dict(train=48, test=16))
  for evaluator in config.evals.values():
    evaluator.batch_size = 16
    if evaluator.get("type") == "generation":
      evaluator.update(num=2, max_new_tokens=8)
    if evaluator.get("type") == "drivelm":
      evaluator.update(num_frames=2, max_new_tokens=8)


def _config(method, seed, root, shift, dataset, steps, smoke, extra="", init_from=""):
  """-> (the run's `python -m drivlm_jax.train --config` arg, its config)."""
  steps = common.stage_steps(method, steps)
  arg = f"method={method},steps={steps},dataset={dataset},shift={shift}" + extra
  config = demo_config.get_config(arg)
  config.seed = seed
  config.data.cache_dir = sources.cache_root({}, root)          # one sim for every run
  config.init_from = init_from
  if smoke:
    smoke_config(config)
  return arg, config


def _run(method, seed, root, *args):
  """One run of the demo (reused when finished); -> its workdir. Plain arguments (those of
  `_config`), not flags: it also runs in `experiments.jobs`' worker processes."""
  arg, config = _config(method, seed, root, *args)
  workdir = os.path.join(root, f"seed{seed}", method)
  print(f"== {method} (seed {seed}): python -m drivlm_jax.train --config configs/demo.py:{arg} "
        f"--workdir {workdir} --config.seed={seed} "
        f"--config.data.cache_dir={config.data.cache_dir}"
        + (f" --config.init_from={config.init_from}" if config.init_from else ""), flush=True)
  return train_once(config, workdir, f"{method} (seed {seed})")


def worker_init(cache_dir):
  """A worker process of `experiments.jobs`, set up as `main` sets up this one."""
  logging.set_verbosity(logging.WARNING)
  jax.config.update("jax_compilation_cache_dir", cache_dir)


def _target_map(job, workdir) -> str:
  del job
  value = run_lib.read_json(run_lib.path(workdir, "eval.json"))["test"]["target"]
  return f"target action mAP {value['action_mAP']:.1f}"


def run_methods(root, shift, seeds: range) -> list:
  """Every method's run per seed under `root` (finished runs are reused), `--parallel` at a
  time: source-only, the two baselines, the CLIP stage, the larger teacher and the student
  warm-started from the CLIP stage and distilled from the teacher, the oracle; -> the run
  directories in report order (the CLIP stage is not reported)."""
  steps = _STEPS.value or demo_config.get_config(f"dataset={_DATASET.value}").total_steps
  todo, runs = [], []
  for seed in seeds:
    workdir = lambda method, seed=seed: os.path.join(root, f"seed{seed}", method)

    def job(method, extra="", init_from="", needs=(), seed=seed):
      return jobs.Job(name=f"{method} (seed {seed})", fn=_run,
                      args=(method, seed, root, shift, _DATASET.value, steps, _SMOKE.value,
                            extra, init_from),
                      needs=tuple(n.name for n in needs), log=log_file(workdir(method)),
                      metrics=str(run_lib.path(workdir(method), "metrics.jsonl")),
                      steps=common.stage_steps(method, steps))
    # The longest chain (teacher -> student) first.
    teacher = job("drivlm_teacher", f",model={TEACHER}")
    clip = [job("clip_finetune")] if _CLIP.value else []
    student = job("drivlm_student", f",teacher={workdir('drivlm_teacher')}",
                  workdir("clip_finetune") if clip else "", needs=[teacher, *clip])
    baselines = ["dann", "entmin"] if _BASELINES.value else []
    todo += [teacher, *clip, student, job("source_only"), *map(job, baselines), job("oracle")]
    runs += [workdir(m) for m in ("source_only", *baselines, "drivlm_teacher", "drivlm_student",
                                  "oracle")]
  # The sim is written (or checked) once, before runs that read it start side by side.
  _, config = _config("source_only", seeds[0], root, shift, _DATASET.value, steps, _SMOKE.value)
  sources.prepare(config.data, root)
  jobs.run(todo, _PARALLEL.value, worker_init, (jax.config.jax_compilation_cache_dir,),
           _target_map)
  return runs


def export_student(student_dir, out, batch=8) -> dict:
  """A student run, as deployed (`run.deploy_keep_ratio`), exported to ONNX by
  export.to_onnx (checked against JAX) and timed at batch 1: onnxruntime vs the JAX function
  compiled with this CPU's fastest XLA kernels (export.kernels); plus the jitted student at
  keep 1.0 vs that ratio, at `batch`."""
  exported = to_onnx.export_run(student_dir, out)
  _, cfg, params, _ = to_onnx.load(student_dir)
  keep = exported["keep_ratio"]
  one = {k: v[:1] for k, v in inputs.from_run(student_dir, 1).items()}
  session = ort.InferenceSession(out, providers=["CPUExecutionProvider"])
  fn, kernel, _ = kernels.fastest(graphs.student(cfg, params, keep), list(one.values()))
  latency = timing.time_backends(
      {"onnxruntime": lambda: session.run(None, one),
       "jax": lambda: jax.block_until_ready(fn(*one.values()))}, warmup=5, iters=50)
  jitted = bench_pruning.time_ratios(cfg, params,
                                     sorted({1.0, keep}, reverse=True), batch)
  return {"onnx": out, "keep_ratio": keep,
          "onnx_max_abs_diff": max(max(d.values()) for d in
                                   exported["student"]["max_abs_diff"].values()),
          "batch1_p50_ms": {k: v["p50_ms"] for k, v in latency.items()}, "jax_kernel": kernel,
          "jitted_batch": batch, **{f"jitted_keep_{k:g}_ms": v for k, v in jitted.items()}}


def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  start = time.time()
  seeds, root = range(_FIRST_SEED.value, _FIRST_SEED.value + _SEEDS.value), _WORKDIR.value
  # Programs every run compiles alike (evaluation, generation, the same step on another
  # seed) are compiled once: XLA's persistent cache, kept in the workdir (on local disk).
  jax.config.update("jax_compilation_cache_dir",
                    os.path.join(run_lib.local_dir(root), "xla_cache"))
  if _DATASET.value == "nuscenes":
    shifts = {"nuscenes": root}
  elif _SHIFT.value == "all":
    shifts = {shift: os.path.join(root, shift) for shift in demo_config.SHIFTS}
  else:
    shifts = {_SHIFT.value: root}
  tables = {}
  for shift, out in shifts.items():
    runs = run_methods(out, "night_fog" if shift == "nuscenes" else shift, seeds)
    described = DESCRIPTIONS.get(shift) or " -> ".join(demo_config.SHIFTS[shift])
    first = os.path.join(out, f"seed{seeds[0]}", "drivlm_student")
    exported = export_student(first, os.path.join(run_lib.local_dir(out), "student.onnx"))
    keep = run_lib.deploy_keep_ratio(run_lib.read_config(first))
    notes = (f"Sim {described}, {len(seeds)} seed(s) ({seeds[0]}-{seeds[-1]}); "
             f"`python -m experiments.demo --dataset {_DATASET.value}"
             + ("" if shift == "nuscenes" else f" --shift {shift}")
             + f" --workdir {root} --seeds {len(seeds)}"
             + (f" --first_seed {seeds[0]}" if seeds[0] else "")
             + "`. The student is evaluated with every visual token (target) and as deployed, "
             f"pruned to keep_ratio {keep} (target_pruned). "
             f"Student exported to {exported['onnx']} (keep {exported['keep_ratio']:g}; "
             f"onnxruntime vs JAX max |diff| {exported['onnx_max_abs_diff']:.1e}); batch 1 p50: "
             + ", ".join(f"{k} {v:.2f} ms" for k, v in exported["batch1_p50_ms"].items())
             + f" (JAX compiled with XLA's {exported['jax_kernel']} kernel policy); "
             + f"jitted, batch {exported['jitted_batch']}: "
             + ", ".join(f"{k[7:]} {v:.2f}" for k, v in exported.items()
                         if k.startswith("jitted_keep")) + ".")
    results = report.write(runs, out, f"DriVLM demo: {described}", notes)
    visualize.write(os.path.join(out, f"seed{seeds[0]}"), out)
    saved = run_lib.read_json(run_lib.path(out, "results.json"))
    saved["student_export"] = exported
    run_lib.write_json(run_lib.path(out, "results.json"), saved)
    run_lib.append_text(run_lib.path(out, "report.md"),
                        "\n![pooled features](pca.png)\n\n![reweighting](reweighting.png)\n")
    differences = report.paired_table(results, PAIRS)
    if len(seeds) > 1:
      run_lib.append_text(run_lib.path(out, "report.md"),
                          "\n## Paired differences (matched seeds)\n\n" + differences + "\n")
    print(f"\nSim {described}, test split, points; mean ± std [95% interval] over {len(seeds)} "
          f"seed(s)")
    tables[shift] = report.markdown_table(results, "target")
    print(tables[shift])
    print(report.markdown_table(results, "target_pruned"))
    if len(seeds) > 1:
      print(differences)
      tables[shift] += "\n\n" + differences
    if shift == "nuscenes":
      drivelm = report.markdown_table(results, "target", DRIVELM_METRICS)
      print("DriveLM challenge scores (no LLM judge: final score without the GPT term, out "
            "of 50):\n" + drivelm)
      run_lib.append_text(run_lib.path(out, "report.md"),
                          "\n## DriveLM challenge scores, target test frames\n\n" + drivelm)
    print(notes)
    print(f"Report: {out}/report.md (results.json, curves.png, target_mAP.png, pca.png, "
          f"reweighting.png)")
  if len(shifts) > 1:
    text = "\n\n".join(f"### {' -> '.join(demo_config.SHIFTS[k])}\n\n{v}"
                         for k, v in tables.items())
    run_lib.write_text(run_lib.path(root, "shifts.md"), text + "\n")
    print(f"\nEvery shift: {root}/shifts.md")
  print(f"Demo: {time.time() - start:.0f} s")


if __name__ == "__main__":
  app.run(main)
