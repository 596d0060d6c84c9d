r"""Builds a TensorRT engine from an exported graph, on the target device (engines are tied
to the GPU and the TensorRT version).

  python -m export.to_tensorrt --onnx student.onnx --engine student.plan [--fp16]
      [--int8 [--calib DIR]] [--min-batch 1] [--opt-batch 1] [--max-batch 8]
      [--workspace-gb 2]

--int8 builds from a Q/DQ graph: pass one made by `export.quantize`, or --calib DIR to make
it here first (which needs onnxruntime and this package). The equivalent `trtexec` command is
printed first, so without the `tensorrt` package (anywhere but the target) this says what to
run there and exits with status 2.
"""
import argparse
import os
import sys

import onnx

from export import tensorrt_runner


def profile_shapes(onnx_path: str, batches) -> dict:
  """{input name: (min, opt, max) shapes}, the symbolic (batch) dims set to `batches`."""
  model = onnx.load(onnx_path, load_external_data=False)
  shapes = {}
  for value in model.graph.input:
    dims = value.type.tensor_type.shape.dim
    shapes[value.name] = tuple(tuple(d.dim_value if d.HasField("dim_value") else b
                                     for d in dims) for b in batches)
  return shapes


def trtexec_command(onnx_path, engine_path, shapes, fp16, int8, workspace_gb) -> str:
  fmt = lambda i: ",".join(f"{n}:{'x'.join(map(str, s[i]))}" for n, s in shapes.items()
                           if s[i])
  parts = ["trtexec", f"--onnx={onnx_path}", f"--saveEngine={engine_path}",
           f"--memPoolSize=workspace:{workspace_gb * 1024}M"]
  if any(s[0] != s[2] for s in shapes.values()):
    parts += [f"--minShapes={fmt(0)}", f"--optShapes={fmt(1)}", f"--maxShapes={fmt(2)}"]
  parts += ["--fp16"] * fp16 + ["--int8"] * int8
  return " ".join(parts)


def build(onnx_path, engine_path, shapes, fp16=False, int8=False, workspace_gb=2):
  """TensorRT Python API: parse, one optimisation profile, FP16/INT8 flags, serialize."""
  trt = tensorrt_runner.import_tensorrt()
  logger = trt.Logger(trt.Logger.WARNING)
  builder = trt.Builder(logger)
  network = builder.create_network(0)          # explicit batch (the only mode in TRT 10)
  parser = trt.OnnxParser(network, logger)
  if not parser.parse_from_file(os.path.abspath(onnx_path)):
    errors = "\n".join(str(parser.get_error(i)) for i in range(parser.num_errors))
    raise RuntimeError(f"{onnx_path}: TensorRT's ONNX parser failed:\n{errors}")
  config = builder.create_builder_config()
  config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_gb << 30)
  if fp16:
    config.set_flag(trt.BuilderFlag.FP16)
  if int8:
    config.set_flag(trt.BuilderFlag.INT8)     # scales come from the graph's Q/DQ nodes
  profile = builder.create_optimization_profile()
  for name, (lo, opt, hi) in shapes.items():
    profile.set_shape(name, lo, opt, hi)
  config.add_optimization_profile(profile)
  serialized = builder.build_serialized_network(network, config)
  if serialized is None:
    raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path}")
  with open(engine_path, "wb") as f:
    f.write(serialized)


def _has_qdq(onnx_path) -> bool:
  model = onnx.load(onnx_path, load_external_data=False)
  return any(n.op_type == "QuantizeLinear" for n in model.graph.node)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--onnx", required=True)
  parser.add_argument("--engine", required=True)
  parser.add_argument("--fp16", action="store_true")
  parser.add_argument("--int8", action="store_true", help="from a Q/DQ graph")
  parser.add_argument("--calib", help="with --int8: make the Q/DQ graph here from this run "
                      "dir or BDD-OIA/nuScenes folder (export.quantize)")
  parser.add_argument("--min-batch", type=int, default=1)
  parser.add_argument("--opt-batch", type=int, default=1)
  parser.add_argument("--max-batch", type=int, default=8)
  parser.add_argument("--workspace-gb", type=int, default=2)
  args = parser.parse_args()
  if not os.path.exists(args.onnx):
    parser.error(f"--onnx {args.onnx} not found")
  if not args.min_batch <= args.opt_batch <= args.max_batch:
    parser.error("need --min-batch <= --opt-batch <= --max-batch")
  onnx_path = args.onnx
  if args.int8 and args.calib:
    # pylint: disable-next=import-outside-toplevel
    from export import inputs as real_inputs, quantize
    onnx_path = os.path.splitext(args.onnx)[0] + ".int8.onnx"
    feats = quantize.sidecar_features(args.onnx)
    quantize.quantize(args.onnx, onnx_path, real_inputs.from_dir(
        args.calib, feats, 64, os.path.expanduser("~/.cache/drivlm_jax")))
    print(f"Q/DQ graph: {onnx_path}")
  elif args.int8 and not _has_qdq(onnx_path):
    parser.error(f"--int8: {onnx_path} has no Q/DQ nodes; make them with export.quantize or "
                 "pass --calib DIR")
  shapes = profile_shapes(onnx_path, (args.min_batch, args.opt_batch, args.max_batch))
  print("equivalent: " + trtexec_command(onnx_path, args.engine, shapes, args.fp16, args.int8,
                                         args.workspace_gb), flush=True)
  try:
    build(onnx_path, args.engine, shapes, args.fp16, args.int8, args.workspace_gb)
  except RuntimeError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print(f"wrote {args.engine}")


if __name__ == "__main__":
  main()
