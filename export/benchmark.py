r"""Latency and FPS of the exported student at batch 1: onnxruntime, the jitted JAX function
and, where present, a TensorRT engine, in one run; plus params and GFLOPs per frame (XLA's
cost analysis) to estimate throughput on a device from its peak.

  python -m export.benchmark --onnx student.onnx [--engine student.plan] [--jax RUN]
      [--iters 50] [--warmup 5] [--threads N] [--peak-tflops T] [--answer-tokens 16]
      [--out bench.json]

--jax defaults to the run recorded in the ONNX's .json sidecar (and its keep ratio) when that
run is on this machine; without it (on the device) the frames are random. The
backends are timed in alternation (one call each per round) after warm-up; p50/p90/p99 in
ms. With --peak-tflops, the FPS bound GFLOPs allow at that peak is printed too.

When the LM graphs are beside the student (`export.to_onnx --lm`: STUDENT_prefill.onnx,
STUDENT_decode.onnx), the deployed pipeline's latency is broken down as papers report it
(onnxruntime, batch 1): vision + pruning + heads (the student), LM prefill (the prompt with
the visual tokens) and one decode step; then frames/s for the heads only (an action and its
reasons per frame) and for the heads plus an N-token answer (student + prefill + (N - 1)
decode steps; the prefill gives the first token), N = --answer-tokens.
"""
import argparse
import json
import os

import numpy as np
import onnx
import onnxruntime as ort

from drivlm_jax import timing
from export import checks


def onnx_params(path: str) -> int:
  model = onnx.load(path)
  return int(sum(np.prod(t.dims) for t in model.graph.initializer))


def jax_student(run_dir: str, keep_ratio: float, feeds: dict):
  """The run's student compiled for `feeds` with this CPU's fastest XLA kernels:
  `export.kernels.fastest`'s (compiled, kernel name, {kernel name: p50 ms}), and its GFLOPs
  per frame (`export.kernels.gflops`)."""
  # JAX is imported only here and in main's --jax branch: on the device, the benchmark needs
  # onnxruntime (and TensorRT) only.
  from export import graphs, kernels, to_onnx  # pylint: disable=import-outside-toplevel
  _, cfg, params, _ = to_onnx.load(run_dir)
  student, args = graphs.student(cfg, params, keep_ratio), list(feeds.values())
  return (*kernels.fastest(student, args), kernels.gflops(student, args, 1))


def lm_latency(prefix: str, options, warmup: int, iters: int, answer_tokens: int) -> dict | None:
  """{"prefill", "decode_step"} percentiles of PREFIX_prefill.onnx / PREFIX_decode.onnx at
  batch 1 (inputs of the graphs' shapes; the decode step reads the prefill's cache), or None
  when the graphs are not there. An answer longer than the cache the graphs were exported
  with (`--max-new-tokens`) is a ValueError: its decode steps would overwrite the last slot."""
  paths = {n: f"{prefix}_{n}.onnx" for n in ("prefill", "decode")}
  if not all(os.path.exists(p) for p in paths.values()):
    return None
  prefill, decode = (checks.session(paths[n], options) for n in ("prefill", "decode"))
  rng = np.random.default_rng(0)
  shape = lambda i: [d if isinstance(d, int) else 1 for d in i.shape]
  feeds = {i.name: (rng.uniform(0, 255, shape(i)).astype(np.float32) if i.name == "image"
                    else np.ones(shape(i), np.int32)) for i in prefill.get_inputs()}
  logits, *cache = prefill.run(None, feeds)
  room = cache[0].shape[2] - feeds["input_ids"].shape[1]
  if answer_tokens > room:
    raise ValueError(f"--answer-tokens {answer_tokens}: {paths['decode']} has cache room for "
                     f"{room} new tokens (export.to_onnx --max-new-tokens); export with more")
  step = dict(zip([i.name for i in decode.get_inputs()],
                  [np.argmax(logits, -1).astype(np.int32), *cache,
                   np.asarray(feeds["input_ids"].shape[1], np.int32)]))
  return timing.time_backends({"prefill": lambda: prefill.run(None, feeds),
                               "decode_step": lambda: decode.run(None, step)}, warmup, iters)


def deployed(student_ms: float, lm: dict, answer_tokens: int) -> dict:
  """The deployed pipeline's breakdown (ms) and frames/s, heads only and with an answer."""
  prefill, step = lm["prefill"]["p50_ms"], lm["decode_step"]["p50_ms"]
  answer = student_ms + prefill + (answer_tokens - 1) * step
  return {"vision_heads_ms": student_ms, "lm_prefill_ms": prefill, "decode_ms_per_token": step,
          "answer_tokens": answer_tokens, "fps_heads": 1e3 / student_ms,
          "fps_heads_and_answer": 1e3 / answer}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--onnx", required=True)
  parser.add_argument("--engine")
  parser.add_argument("--jax", help="the run dir (default: the ONNX's .json sidecar's, when "
                      "it is on this machine); --jax '' times without JAX")
  parser.add_argument("--iters", type=int, default=50)
  parser.add_argument("--warmup", type=int, default=5)
  parser.add_argument("--threads", type=int, default=os.cpu_count())
  parser.add_argument("--peak-tflops", type=float, default=None)
  parser.add_argument("--answer-tokens", type=int, default=16,
                      help="tokens of the answer in the heads + answer frames/s")
  parser.add_argument("--out", default=None, help="write the figures as JSON")
  args = parser.parse_args()
  if not os.path.isfile(args.onnx):
    parser.error(f"--onnx {args.onnx}: no such file")
  for flag, value, least in (("--answer-tokens", args.answer_tokens, 1),
                             ("--iters", args.iters, 1), ("--warmup", args.warmup, 0)):
    if value < least:
      parser.error(f"{flag} {value}: at least {least}")
  sidecar = os.path.splitext(args.onnx)[0] + ".json"
  meta = {}
  if os.path.exists(sidecar):
    with open(sidecar) as f:
      try:
        meta = json.load(f)
      except json.JSONDecodeError as e:
        parser.error(f"{sidecar} (the ONNX's sidecar): not valid JSON ({e})")
  run_dir = args.jax
  if run_dir is None and meta.get("run"):
    # On the device (a copied deploy/ folder, no JAX) the training run is not there.
    if os.path.exists(os.path.join(meta["run"], "config.json")):
      run_dir = meta["run"]
    else:
      print(f"{meta['run']} (the run in {sidecar}) is not on this machine: timing without "
            f"JAX, on random frames of the graph's shape")
  options = ort.SessionOptions()
  options.intra_op_num_threads = args.threads
  try:   # first: a graph onnxruntime cannot load or a wrong --answer-tokens fails before
    # the student is compiled and timed
    session = checks.session(args.onnx, options)
    lm = lm_latency(os.path.splitext(args.onnx)[0], options, args.warmup, args.iters,
                    args.answer_tokens)
  except ValueError as e:
    parser.error(str(e))
  names = [i.name for i in session.get_inputs()]
  if run_dir:
    from export import inputs  # pylint: disable=import-outside-toplevel
    try:
      feeds = {k: v[:1] for k, v in inputs.from_run(run_dir, 1).items() if k in names}
    except (ValueError, OSError) as e:   # not a run (RunError), its data gone
      parser.error(f"--jax {run_dir}: {e}")
  else:   # no run: random frames of the graph's shape
    rng = np.random.default_rng(0)
    shape = lambda i: [d if isinstance(d, int) else 1 for d in i.shape]
    feeds = {i.name: (rng.uniform(0, 255, shape(i)).astype(np.float32) if i.name == "image"
                      else np.ones(shape(i), np.int32)) for i in session.get_inputs()}
  backends = {"onnxruntime": lambda: session.run(None, feeds)}
  result = {"onnx": args.onnx, "params": onnx_params(args.onnx), "batch": 1,
            "device": ort.get_device()}
  if run_dir:
    fn, result["jax_kernel"], result["jax_kernels_p50_ms"], result["gflops_per_frame"] = (
        jax_student(run_dir, meta.get("keep_ratio", 1.0), feeds))
    backends["jax"] = lambda: [x.block_until_ready() for x in fn(*feeds.values())]
  if args.engine:
    from export import tensorrt_runner  # pylint: disable=import-outside-toplevel
    engine = tensorrt_runner.Engine(args.engine)
    backends["tensorrt"] = lambda: engine(feeds)
  result["latency"] = timing.time_backends(backends, args.warmup, args.iters)
  print(f"{args.onnx}: {result['params'] / 1e6:.2f} M params"
        + (f", {result['gflops_per_frame']:.3f} GFLOPs per frame" if run_dir else ""))
  print(f"{'backend':12s} {'p50 ms':>8s} {'p90 ms':>8s} {'p99 ms':>8s} {'FPS':>8s}")
  for name, r in result["latency"].items():
    print(f"{name:12s} {r['p50_ms']:8.2f} {r['p90_ms']:8.2f} {r['p99_ms']:8.2f} {r['fps']:8.1f}")
  if lm:
    result["lm_latency"] = lm
    result["deployed"] = d = deployed(result["latency"]["onnxruntime"]["p50_ms"], lm,
                                      args.answer_tokens)
    print(f"deployed (onnxruntime, batch 1, p50): vision + heads {d['vision_heads_ms']:.2f} ms, "
          f"LM prefill {d['lm_prefill_ms']:.2f} ms, decode {d['decode_ms_per_token']:.2f} "
          f"ms/token; {d['fps_heads']:.1f} frames/s heads only, "
          f"{d['fps_heads_and_answer']:.1f} frames/s with a {args.answer_tokens}-token answer")
  if args.peak_tflops and run_dir:
    bound = args.peak_tflops * 1e3 / result["gflops_per_frame"]
    print(f"at {args.peak_tflops} TFLOP/s the compute bound is {bound:.0f} FPS")
  if args.out:
    with open(args.out, "w") as f:
      json.dump(result, f, indent=1)


if __name__ == "__main__":
  main()
