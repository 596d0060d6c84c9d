r"""The demo on the embedded default: the procedural world's day domain (source, labelled)
adapted to night+fog (target, unlabelled), on CPU.

  python -m experiments.demo [--workdir runs/demo] [--seeds 1] [--steps 1200] [--smoke]
  python -m experiments.demo --dataset nuscenes --workdir runs/demo_nuscenes

--dataset nuscenes: the sim in the nuScenes + DriveLM layout, six cameras per example
(configs/demo.py:dataset=nuscenes), day Boston -> night+rain Singapore; the report adds the
DriveLM challenge's scores per method on the target test frames (evals.target_drivelm).

Per seed, runs of `python -m drivlm_jax.train --config configs/demo.py:method=M`:
  source_only      the tiny VLM on labelled source only
  drivlm_teacher   adapted with unlabelled target: domain discriminators at the image, token
                   and instance level and instruction-guided token reweighting
  drivlm_student   adapted the same way and distilled from the frozen teacher (heads, LM
                   tokens, visual tokens); evaluated with every visual token and pruned to
                   the keep ratio of its evals.target_pruned, as deployed ("target_pruned")
  oracle           the tiny VLM on labelled source and labelled target (the upper bound)
With --clip, the CLIP fine-tuning stage (method=clip_finetune: vision tower + CLIP text tower,
contrastive on image-caption pairs of both domains, a quarter of the steps) runs first and
the student warm-starts from it (--config.init_from); the teacher trains from scratch (warm-
started, it reached 41.1 target action mAP on seed 0, against 76.5). This is the ablation's
with_clip_finetuning row: over 3 seeds it kept the pruned student at 69.5 target mAP (53.7
without it).
Every method is evaluated on the target (and source) test split. Writes <workdir>/results.json,
report.md, results.csv and plots (training curves, mAP by method, PCA of pooled features,
reweighting heat-maps), exports the seed-0 student to <workdir>/student.onnx (export.to_onnx,
checked against JAX) and times it in onnxruntime and JAX. Re-running resumes or reuses runs.
"""
import os
import time

import jax
import onnxruntime as ort
from absl import app, flags, logging

from configs import demo as demo_config
from drivlm_jax import run as run_lib, timing, train, visualize
from experiments import bench_pruning, report
from export import graphs, inputs, to_onnx

_WORKDIR = flags.DEFINE_string("workdir", "runs/demo", "Where the runs and the report go.")
_SEEDS = flags.DEFINE_integer("seeds", 1, "Training seeds per method.")
_STEPS = flags.DEFINE_integer("steps", None, "Training steps (default: the config's).")
_CLIP = flags.DEFINE_bool("clip", False, "Run the CLIP fine-tuning stage and warm-start the "
                          "student from it (the teacher trains from scratch).")
_DATASET = flags.DEFINE_enum(
    "dataset", "bdd_oia", ["bdd_oia", "nuscenes"],
    "The sim's layout: bdd_oia (one camera, day -> night+fog) or nuscenes (six cameras with "
    "DriveLM QA, day Boston -> night+rain Singapore, scored as the DriveLM challenge).")
_SMOKE = flags.DEFINE_bool("smoke", False, "A quick end-to-end check, not a result: small "
                           "sim data (48 train / 16 test images per domain, 128x72) and 2 "
                           "generated answers of 8 tokens per evaluation.")


SHIFTS = {"bdd_oia": "day -> night+fog",
          "nuscenes": "six-camera nuScenes-Drive, day Boston -> night+rain Singapore"}
DRIVELM_METRICS = ("action_mAP", "drivelm_accuracy", "drivelm_language", "drivelm_match_F1",
                   "drivelm_final_without_judge")


def _smoke(config):
  config.data.width, config.data.height = 128, 72
  nuscenes = config.data.get("sim_layout") == "nuscenes"   # counts in scenes of ~10 frames
  for domain in (config.data.source, config.data.target):
    domain.update(train=5, test=2) if nuscenes else domain.update(train=48, test=16)
  for evaluator in config.evals.values():
    evaluator.batch_size = 16
    if evaluator.get("type") == "generation":
      evaluator.update(num=2, max_new_tokens=8)
    if evaluator.get("type") == "drivelm":
      evaluator.update(num_frames=2, max_new_tokens=8)


def _run(method, seed, extra="", init_from=""):
  root = _WORKDIR.value
  steps = _STEPS.value or demo_config.get_config(f"dataset={_DATASET.value}").total_steps
  if method == "clip_finetune":   # a short stage: a quarter of the training steps
    steps = max(1, steps // 4)
  arg = f"method={method},steps={steps},dataset={_DATASET.value}" + extra
  config = demo_config.get_config(arg)
  config.seed = seed
  config.data.cache_dir = os.path.join(root, "data")          # one sim for every run
  config.init_from = init_from
  if _SMOKE.value:
    _smoke(config)
  workdir = os.path.join(root, f"seed{seed}", method)
  print(f"== {method} (seed {seed}): python -m drivlm_jax.train --config configs/demo.py:{arg} "
        f"--workdir {workdir} --config.seed={seed} "
        f"--config.data.cache_dir={config.data.cache_dir}"
        + (f" --config.init_from={init_from}" if init_from else ""), flush=True)
  if not run_lib.finished(workdir, config):
    train.train(config, workdir)
    if not run_lib.finished(workdir, config):   # SIGTERM: checkpoint saved
      raise SystemExit(f"{method} (seed {seed}) was interrupted; re-run the demo to resume")
  return workdir


def export_student(student_dir, out, batch=8) -> dict:
  """The seed-0 student, as deployed (`run.deploy_keep_ratio`), exported to
  ONNX by export.to_onnx (checked against JAX) and timed at batch 1: onnxruntime vs the
  jitted JAX function; plus the jitted student at keep 1.0 vs that ratio, at `batch`."""
  exported = to_onnx.export_run(student_dir, out)
  _, cfg, params, _ = to_onnx.load(student_dir)
  keep = exported["keep_ratio"]
  one = {k: v[:1] for k, v in inputs.from_run(student_dir, 1).items()}
  session = ort.InferenceSession(out, providers=["CPUExecutionProvider"])
  fn = jax.jit(graphs.student(cfg, params, keep))
  latency = timing.time_backends(
      {"onnxruntime": lambda: session.run(None, one),
       "jax": lambda: jax.block_until_ready(fn(*one.values()))}, warmup=5, iters=50)
  jitted = bench_pruning.time_ratios(cfg, params,
                                     sorted({1.0, keep}, reverse=True), batch)
  return {"onnx": out, "keep_ratio": keep,
          "onnx_max_abs_diff": max(max(d.values()) for d in
                                   exported["student"]["max_abs_diff"].values()),
          "batch1_p50_ms": {k: v["p50_ms"] for k, v in latency.items()},
          "jitted_batch": batch, **{f"jitted_keep_{k:g}_ms": v for k, v in jitted.items()}}


def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  start = time.time()
  runs = []
  for seed in range(_SEEDS.value):
    source_only = _run("source_only", seed)
    clip = _run("clip_finetune", seed) if _CLIP.value else ""
    teacher = _run("drivlm_teacher", seed)
    runs += [source_only, teacher,
             _run("drivlm_student", seed, f",teacher={teacher}", init_from=clip),
             _run("oracle", seed)]
  root = _WORKDIR.value
  student = os.path.join(root, "seed0", "drivlm_student")
  exported = export_student(student, os.path.join(root, "student.onnx"))
  shift = SHIFTS[_DATASET.value]
  keep = run_lib.deploy_keep_ratio(demo_config.get_config("method=drivlm,teacher=x"))
  notes = (f"Sim {shift}, {_SEEDS.value} seed(s); `python -m experiments.demo "
           f"--dataset {_DATASET.value} --workdir {root} --seeds {_SEEDS.value}`. The "
           f"student is evaluated with every visual token (target) and as deployed, pruned to "
           f"keep_ratio {keep} (target_pruned). "
           f"Student exported to {exported['onnx']} (keep {exported['keep_ratio']:g}; "
           f"onnxruntime vs JAX max |diff| {exported['onnx_max_abs_diff']:.1e}); batch 1 p50: "
           + ", ".join(f"{k} {v:.2f} ms" for k, v in exported["batch1_p50_ms"].items())
           + f"; jitted, batch {exported['jitted_batch']}: "
           + ", ".join(f"{k[7:]} {v:.2f}" for k, v in exported.items()
                       if k.startswith("jitted_keep")) + ".")
  results = report.write(runs, root, "DriVLM demo", notes)
  visualize.write(os.path.join(root, "seed0"), root)
  saved = run_lib.read_json(run_lib.path(root, "results.json"))
  saved["student_export"] = exported
  run_lib.write_json(run_lib.path(root, "results.json"), saved)
  run_lib.append_text(run_lib.path(root, "report.md"),
                      "\n![pooled features](pca.png)\n\n![reweighting](reweighting.png)\n")
  print(f"\nDemo ({time.time() - start:.0f} s): sim {shift}, test split, points; "
        f"mean ± std over {_SEEDS.value} seed(s)")
  print(report.markdown_table(results, "target"))
  print(report.markdown_table(results, "target_pruned"))
  if _DATASET.value == "nuscenes":
    drivelm = report.markdown_table(results, "target", DRIVELM_METRICS)
    print("DriveLM challenge scores (no LLM judge: final score without the GPT term, out of "
          "50):\n" + drivelm)
    run_lib.append_text(run_lib.path(root, "report.md"),
                        "\n## DriveLM challenge scores, target test frames\n\n" + drivelm)
  print(notes)
  print(f"Report: {root}/report.md (results.json, curves.png, target_mAP.png, pca.png, "
        f"reweighting.png)")


if __name__ == "__main__":
  app.run(main)
