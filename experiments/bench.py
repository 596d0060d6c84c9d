r"""Every benchmark in one command, each side by side with its peer, into one table.

  python -m experiments.bench [--out bench.json] [--run runs/demo/seed0/drivlm_student]
      [--pairs 3] [--skip model,train,loop,input,export]

- model: jitted forward vs HF transformers + torch (CLIP ViT-B/16-224 tower; Qwen2-0.5B
  prefill of 256 tokens), batch 1 and 8 (experiments.bench_model);
- train: AdamW training step vs torch (demo VLM vs transformers LLaVA; ViT-B/16 + head),
  and the host overlapped with the step vs in lockstep (experiments.bench_train);
- loop: the demo's own trainer vs its bare jitted step, in a process of its own
  (experiments.bench_train --cases demo_loop);
- input: sim + TFDS build + grain pipeline, against what the training step consumes
  (experiments.bench_input);
- export: the exported student in onnxruntime vs the jitted JAX function at batch 1, keep
  ratio 1.0 and 0.25 (random-weight ViT-B/16 student, plus the demo student given --run or
  when runs/demo/seed0/drivlm_student exists) (experiments.bench_export).
Each part runs in its own process (same rules: alternated pairs, medians, torch at its best)
and writes its JSON; bench.json gathers them with the table printed at the end. Made for the
CPU: on a GPU the model and train parts time both sides there (`experiments.peer`; run them
alone with GPU-sized batches: docs/benchmarks.md, "On a GPU"), while input and export stay
host-side comparisons.
"""
if __name__ == "__main__":  # before JAX loads: the restarted process loads it once
  from drivlm_jax import host
  host.restart_with_tunables()

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from experiments import machine

PARTS = ("model", "train", "loop", "input", "export")
DEMO_STUDENT = "runs/demo/seed0/drivlm_student"


def _commands(tmp, pairs, run):
  out = lambda part: os.path.join(tmp, f"{part}.json")
  export = ["--vit-b16"] + (["--run", run] if run else [])
  return {
      "model": ["experiments.bench_model", "--pairs", str(pairs), "--out", out("model")],
      "train": ["experiments.bench_train", "--pairs", str(pairs), "--cases",
                "vlm_tiny,vit_b16,vit_b16_bf16,loop", "--out", out("train")],
      # The demo's trainer in a process of its own, as a run is (not after the ViT-B/16
      # cases' GBs of buffers in the same process).
      "loop": ["experiments.bench_train", "--cases", "demo_loop", "--out", out("loop")],
      "input": ["experiments.bench_input", "--images", "500", "--out", out("input")],
      "export": ["experiments.bench_export", *export, "--iters", "20", "--out", out("export")],
  }


def rows(results: dict) -> list:
  """(part, case, ours, peer, unit, ours/peer speed ratio) rows of the summary table."""
  table = []
  for r in results.get("model", {}).get("rows", []):
    table.append(("model", f"{r['case']}, batch {r['batch']}", r["ours_ms"], r["peer_ms"],
                  "ms (torch)", r["ratio_peer_over_ours"]))
  for r in results.get("train", {}).get("rows", []) + results.get("loop", {}).get("rows", []):
    if r["case"] == "loop":
      table.append(("train loop", f"host overlapped vs in lockstep, batch {r['batch']}",
                    r["overlapped_steps_per_s"], r["lockstep_steps_per_s"],
                    "steps/s (lockstep)", r["ratio_overlapped_over_lockstep"]))
    elif r["case"] == "demo_loop":
      table.append(("train loop", f"the demo's trainer vs its bare step, batch {r['batch']}",
                    r["loop_examples_per_s"], r["step_examples_per_s"],
                    "examples/s (bare step)", r["ratio_loop_over_step"]))
    else:
      table.append(("train step", f"{r['case']}, batch {r['batch']}", r["ours_examples_per_s"],
                    r["peer_examples_per_s"], "examples/s (torch)", r["ratio_ours_over_peer"]))
  if "input" in results:
    i = results["input"]
    supply = max(i["pipeline_workers0_examples_per_s"], i["pipeline_workers2_examples_per_s"])
    table.append(("input", "grain pipeline vs demo train step", supply,
                  i["train_step_examples_per_s"], "examples/s (step consumes)",
                  supply / i["train_step_examples_per_s"]))
  for r in results.get("export", {}).get("rows", []):
    o, j = r["latency"]["jax"]["p50_ms"], r["latency"]["onnxruntime"]["p50_ms"]
    table.append(("exported student", f"{r['student']}, keep {r['keep_ratio']:g}, batch 1, "
                  f"{r['gflops_per_frame']:.2f} GFLOPs", o, j, "ms (onnxruntime)", j / o))
  return table


def markdown(table) -> str:
  lines = ["| part | case | ours | peer | unit (peer) | speed ours / peer |",
           "|---|---|---|---|---|---|"]
  lines += [f"| {p} | {c} | {a:.3g} | {b:.3g} | {u} | {r:.2f} |" for p, c, a, b, u, r in table]
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="bench.json")
  parser.add_argument("--run", default=None, help=f"a demo student (default {DEMO_STUDENT} "
                      "when it exists)")
  parser.add_argument("--pairs", type=int, default=3)
  parser.add_argument("--skip", default="", help="comma-separated parts: " + ",".join(PARTS))
  args = parser.parse_args()
  run = args.run or (DEMO_STUDENT if os.path.exists(DEMO_STUDENT) else None)
  skip = set(filter(None, args.skip.split(",")))
  if skip - set(PARTS):
    parser.error(f"--skip {sorted(skip - set(PARTS))}: known parts {PARTS}")
  results, seconds, failed = {}, {}, []
  with tempfile.TemporaryDirectory() as tmp:
    for part, command in _commands(tmp, args.pairs, run).items():
      if part in skip:
        continue
      print(f"== {part}: python -m {' '.join(command)}", flush=True)
      start = time.perf_counter()
      status = subprocess.run([sys.executable, "-m", *command], check=False).returncode
      seconds[part] = time.perf_counter() - start
      if status:
        failed.append(part)
        continue
      with open(os.path.join(tmp, f"{part}.json")) as f:
        results[part] = json.load(f)
  table = rows(results)
  parts = [r["machine"] for r in results.values() if "machine" in r]
  where = {**machine.describe(matmuls=False),   # the parts loaded JAX; this process does not
           **{key: next(filter(None, (m.get(key) for m in parts)), None)
              for key in ("accelerator", "jax_float32_matmuls")}}
  with open(args.out, "w") as f:
    json.dump({"machine": where, "parts": results, "seconds": seconds, "summary": table}, f,
              indent=1)
  print(f"machine: {machine.line(where)}")
  print(markdown(table))
  print(f"wall time per part (s): { {k: round(v) for k, v in seconds.items()} }")
  if failed:
    print(f"error: failed parts: {failed}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  main()
