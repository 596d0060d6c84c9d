r"""Exports a trained DriVLM student to ONNX with jax2onnx, then checks it.

  python -m export.to_onnx --workdir runs/demo/seed0/drivlm_student --out student.onnx
      [--checkpoint RUN/checkpoints/STEP] [--opset 18] [--keep-ratio 0.25]
      [--batch dynamic|N] [--image-size 224] [--lm] [--max-new-tokens 16]

Writes OUT (the student: "image" [B, S, S, 3] (V cameras: [B, V, S, S, 3]) float32 RGB
0..255, "instruction_ids" and "instruction_mask" [B, L] int32 -> "action_probs" [B, 4],
"reason_probs" [B, 21], "token_scores" [B, V * N]), OUT's .json sidecar (shapes,
preprocessing, parity figures) and the run's tokenizer.json beside it; with --lm also
OUT_prefill.onnx and OUT_decode.onnx, the LM that generates explanations on the device
(`export.generate.greedy`).

Every graph passes onnx.checker's full check and the TensorRT 10.3 operator check, and
onnxruntime must match the JAX function within --atol (1e-4) on real examples of the run's
target test split at batch 1 and 4 (or N); otherwise the export fails.
"""
import argparse
import dataclasses
import json
import logging
import os
import shutil
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import onnx
import onnxruntime as ort
from jax2onnx import to_onnx

from drivlm_jax import run as run_lib
from drivlm_jax.model import cpu_gemm, reweighting, vlm
from export import checks, generate, graphs, inputs as real_inputs, rewrite


def load(workdir: str | None = None, checkpoint: str | None = None):
  """A run's (run dir, vlm.Config for export, params, step); `checkpoint` is one
  RUN/checkpoints/STEP directory (default: the run's latest)."""
  step = None
  if checkpoint:
    checkpoint = run_lib.path(run_lib.absolute(checkpoint.rstrip("/")))
    if not checkpoint.name.isdigit():
      raise run_lib.RunError(f"--checkpoint {checkpoint}: expected RUN/checkpoints/<step>")
    step, workdir = int(checkpoint.name), str(checkpoint.parent.parent)
  if not workdir:
    raise run_lib.RunError("give --workdir RUN or --checkpoint RUN/checkpoints/STEP")
  run = run_lib.load(workdir, step)
  return workdir, graphs.for_export(run.cfg), graphs.constants(run.params), run.step


def convert(fn, specs, input_names, output_names, path: str, opset: int):
  """jax2onnx `fn` (traced at `specs`), dense Einsums rewritten as MatMul, saved to `path`
  (weights in PATH.data when the graph would pass protobuf's 2 GB limit)."""
  # jax2onnx writes Squeeze/Unsqueeze in their opset-13 form (axes as an input).
  if not 13 <= opset <= checks.MAX_OPSET:
    raise ValueError(f"--opset {opset}: the export writes opsets 13-{checks.MAX_OPSET} "
                     f"(TensorRT 10.3 parses up to {checks.MAX_OPSET})")
  logging.getLogger("onnx_ir").setLevel(logging.ERROR)   # per-value type notes, not errors
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with cpu_gemm.use("xla"):   # jax2onnx converts XLA's dots, not the MKL call
    model = to_onnx(fn, specs, model_name=os.path.splitext(os.path.basename(path))[0],
                    opset=opset, input_names=list(input_names), output_names=list(output_names))
  rewrite.einsum_to_matmul(model)
  large = sum(t.ByteSize() for t in model.graph.initializer) > 1_800_000_000
  onnx.save(model, path, save_as_external_data=large,
            location=os.path.basename(path) + ".data")


def _batch(batch):
  return jax.export.symbolic_shape("B")[0] if batch == "dynamic" else int(batch)


def _check_batches(batch):
  return (1, 4) if batch == "dynamic" else (int(batch),)


def _verify(path, fn, feeds: dict, atol, batches=(None,)):
  """Graph checks, then onnxruntime vs JAX on `feeds` cut to each of `batches` (None: as
  given) -> report dict."""
  ops = checks.check(path)
  session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
  jitted = jax.jit(fn)
  diffs = {}
  for b in batches:
    have = len(next(iter(feeds.values())))
    if b is not None and have < b:
      raise ValueError(f"need {b} check examples, got {have}")
    cut = feeds if b is None else {k: v[:b] for k, v in feeds.items()}
    diffs[b or have] = checks.parity(session, jitted, cut, atol)
  return {"path": path, "ops": dict(sorted(ops.items())), "max_abs_diff": diffs}


def export_student(cfg, params, path, *, keep_ratio, feeds, opset=18, batch="dynamic",
                   atol=1e-4) -> dict:
  """The student graph at `keep_ratio`, checked on `feeds` (real inputs by name)."""
  in_names, out_names = graphs.student_io(cfg)
  b = _batch(batch)
  length = feeds["instruction_ids"].shape[1]
  specs = [jax.ShapeDtypeStruct((b, *graphs.image_shape(cfg)), jnp.float32)]
  specs += [jax.ShapeDtypeStruct((b, length), jnp.int32)] * (len(in_names) - 1)
  fn = graphs.student(cfg, params, keep_ratio)
  convert(fn, specs, in_names, out_names, path, opset)
  return _verify(path, fn, {k: feeds[k] for k in in_names}, atol, _check_batches(batch))


def export_lm(cfg, params, prefix, *, feeds, tokenizer, max_new_tokens=16, opset=18,
              batch="dynamic", atol=1e-4) -> dict:
  """PREFIX_prefill.onnx and PREFIX_decode.onnx (prompts of the `feeds`' instructions),
  each checked for parity with JAX, then checked to generate `vlm.generate`'s greedy
  tokens."""
  _check_max_new_tokens(max_new_tokens)
  b, lm = _batch(batch), cfg.language
  ids, mask = real_inputs.prompts(tokenizer, cfg.num_visual_tokens, feeds["instruction_ids"],
                                  feeds["instruction_mask"])
  feeds = {**feeds, "input_ids": ids, "attention_mask": mask}
  prompt = {k: feeds[k] for k in graphs.PREFILL_INPUTS}
  t, length, slots = ids.shape[1], feeds["instruction_ids"].shape[1], ids.shape[1] + max_new_tokens
  i32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)
  kv = jax.ShapeDtypeStruct((lm.num_layers, b, slots, lm.num_kv_heads, lm.dim_per_head),
                            jnp.float32)
  paths = {n: f"{prefix}_{n}.onnx" for n in ("prefill", "decode")}

  prefill = graphs.prefill(cfg, params, max_new_tokens)
  convert(prefill, [jax.ShapeDtypeStruct((b, *graphs.image_shape(cfg)), jnp.float32),
                    i32(b, length), i32(b, length), i32(b, t), i32(b, t)],
          graphs.PREFILL_INPUTS, graphs.LM_OUTPUTS, paths["prefill"], opset)
  report = {"prefill": _verify(paths["prefill"], prefill, prompt, atol, _check_batches(batch))}

  # The decode step is checked on the cache the prefill of the largest check batch leaves.
  decode = graphs.decode(cfg, params)
  convert(decode, [i32(b), kv, kv, jax.ShapeDtypeStruct((b, slots), jnp.bool_), i32(b), i32()],
          graphs.DECODE_INPUTS, graphs.LM_OUTPUTS, paths["decode"], opset)
  n = _check_batches(batch)[-1]
  prompt = {k: v[:n] for k, v in prompt.items()}
  _, *cache = jax.jit(prefill)(*prompt.values())
  step = [feeds["input_ids"][:n, -1], *map(np.asarray, cache), np.asarray(t, np.int32)]
  report["decode"] = _verify(paths["decode"], decode, dict(zip(graphs.DECODE_INPUTS, step)),
                             atol)

  sessions = [ort.InferenceSession(paths[k], providers=["CPUExecutionProvider"])
              for k in ("prefill", "decode")]
  onnx_tokens = generate.greedy(*sessions, prompt, max_new_tokens)
  jax_tokens = np.asarray(vlm.generate(
      cfg, params, graphs.normalize(cfg, prompt["image"]), prompt["input_ids"], max_new_tokens,
      instruction_ids=prompt["instruction_ids"], instruction_mask=prompt["instruction_mask"],
      attention_mask=prompt["attention_mask"]))[:, t:]
  if not np.array_equal(onnx_tokens, jax_tokens):
    raise checks.GraphError(f"greedy tokens differ: onnxruntime {onnx_tokens.tolist()} vs "
                            f"JAX {jax_tokens.tolist()}")
  report["greedy_tokens_match"] = list(onnx_tokens.shape)
  report["max_new_tokens"] = max_new_tokens
  return report


def _check_max_new_tokens(n: int):
  if n < 1:
    raise ValueError(f"--max-new-tokens {n}: the LM graphs generate at least 1 token")


def export_run(workdir, out, *, checkpoint=None, keep_ratio=None, opset=18,
               batch="dynamic", lm=False, max_new_tokens=16, atol=1e-4,
               image_size=None) -> dict:
  """Everything `python -m export.to_onnx` does: the student (and with `lm` the LM graphs)
  of a run, checked on its target test frames, with the .json sidecar and tokenizer.json
  beside `out`. Returns the sidecar's report."""
  if batch != "dynamic" and not (str(batch).isdigit() and int(batch) > 0):
    raise ValueError(f"batch {batch!r}: 'dynamic' or a positive integer")
  if keep_ratio is not None:
    reweighting.check_keep_ratio(keep_ratio)
  if lm:
    _check_max_new_tokens(max_new_tokens)
  if run_lib.is_remote(out):
    raise ValueError(f"--out {out}: the ONNX files are written to a local folder; copy them "
                     f"to the bucket after (gcloud storage cp -r DIR {os.path.dirname(out)})")
  workdir, cfg, params, step = load(workdir, checkpoint)
  if image_size not in (None, cfg.vision.image_size):
    raise ValueError(f"image size {image_size}: the model was trained at "
                     f"{cfg.vision.image_size} (its position embeddings fix the resolution)")
  keep = (run_lib.deploy_keep_ratio(run_lib.read_config(workdir)) if keep_ratio is None
          else keep_ratio)
  if keep < 1.0 and not cfg.reweight:
    raise ValueError(f"keep ratio {keep}: {workdir} has no reweighting (model.reweight), so "
                     "it cannot prune")
  _, data, feats = real_inputs.run_features(workdir)
  feeds = real_inputs.take(data["target", "test"], feats, max(_check_batches(batch)))
  report = {"run": run_lib.absolute(workdir), "step": step, "keep_ratio": keep,
            "opset": opset, "batch": batch,
            "student": export_student(cfg, params, out, keep_ratio=keep, feeds=feeds,
                                      opset=opset, batch=batch, atol=atol)}
  if lm:
    report["lm"] = export_lm(cfg, params, os.path.splitext(out)[0], feeds=feeds,
                             tokenizer=feats.tokenizer, max_new_tokens=max_new_tokens,
                             opset=opset, batch=batch, atol=atol)
  out_dir = os.path.dirname(os.path.abspath(out))
  if os.path.isdir(feats.tokenizer):   # a checkpoint's own tokenizer: its whole directory
    tokenizer = "tokenizer"
    shutil.copytree(feats.tokenizer, os.path.join(out_dir, tokenizer), dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
  else:
    tokenizer = "tokenizer.json"
    shutil.copyfile(feats.tokenizer, os.path.join(out_dir, tokenizer))
  report["features"] = {**dataclasses.asdict(feats), "tokenizer": tokenizer,
                        "image": "RGB float32 0..255, resized as `resize` says; the graph "
                                 "normalises"}
  with open(os.path.splitext(out)[0] + ".json", "w") as f:
    json.dump(report, f, indent=1, default=str)
  return report


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", help="a run directory of drivlm_jax.train")
  parser.add_argument("--checkpoint", help="RUN/checkpoints/STEP (default: the latest)")
  parser.add_argument("--out", required=True, help="the student's .onnx path")
  parser.add_argument("--opset", type=int, default=18)
  parser.add_argument("--keep-ratio", type=float, default=None,
                      help="visual tokens kept (default: the smallest keep_ratio of the "
                      "run's heads evaluators, else 1.0)")
  parser.add_argument("--batch", default="dynamic", help="'dynamic' or a fixed batch size")
  parser.add_argument("--image-size", type=int, default=None,
                      help="must equal the model's (its position embeddings fix it)")
  parser.add_argument("--lm", action="store_true", help="also export the LM prefill/decode")
  parser.add_argument("--max-new-tokens", type=int, default=16)
  parser.add_argument("--atol", type=float, default=1e-4)
  args = parser.parse_args()
  start = time.perf_counter()
  try:
    report = export_run(args.workdir, args.out, checkpoint=args.checkpoint,
                        keep_ratio=args.keep_ratio, opset=args.opset, batch=args.batch,
                        lm=args.lm, max_new_tokens=args.max_new_tokens, atol=args.atol,
                        image_size=args.image_size)
  except (ValueError, run_lib.RunError) as e:    # GraphError is a ValueError
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  workdir, step, keep = report["run"], report["step"], report["keep_ratio"]
  print(f"exported {workdir} step {step} at keep_ratio {keep} in "
        f"{time.perf_counter() - start:.0f} s")
  for name, part in [("student", report["student"])] + [
      (f"lm {k}", v) for k, v in report.get("lm", {}).items() if isinstance(v, dict)]:
    diffs = {b: max(d.values()) for b, d in part["max_abs_diff"].items()}
    print(f"  {name:12s} {part['path']}: {sum(part['ops'].values())} nodes, "
          f"{len(part['ops'])} op types, onnxruntime vs JAX max |diff| by batch {diffs}")
  if "lm" in report:
    print(f"  greedy tokens of onnxruntime == JAX for {report['lm']['greedy_tokens_match']}")


if __name__ == "__main__":
  main()
