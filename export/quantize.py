r"""An INT8 Q/DQ graph for TensorRT, made by onnxruntime's static quantiser (symmetric,
per-channel weights) and calibrated on real frames of our pipeline. TensorRT 10 builds INT8
engines from explicit Q/DQ graphs (its implicit calibrators are deprecated since 10.1).

  python -m export.quantize --onnx student.onnx --calib DIR --out student.int8.onnx
      [--num 64] [--method minmax|percentile|entropy] [--cache-dir DIR]

DIR is a run directory (its target-domain train split) or a BDD-OIA / nuScenes folder (built
once into --cache-dir and tokenized with the tokenizer.json that export.to_onnx put beside
the ONNX). MatMul nodes get Q/DQ (the dense layers, after export's Einsum -> MatMul);
the result passes the TensorRT check, and its error against the fp32 graph on held-out
frames is printed.
"""
import argparse
import json
import os

import numpy as np
import onnxruntime as ort
from onnxruntime import quantization as q

from drivlm_jax.data import pipeline, preprocess
from export import checks, inputs as real_inputs

METHODS = {"minmax": q.CalibrationMethod.MinMax, "percentile": q.CalibrationMethod.Percentile,
           "entropy": q.CalibrationMethod.Entropy}


class Frames(q.CalibrationDataReader):
  """Calibration feeds, `batch` examples at a time."""

  def __init__(self, feeds: dict, names, batch: int = 8):
    n = len(feeds["image"])
    self.batches = iter([{k: feeds[k][i:i + batch] for k in names} for i in range(0, n, batch)])

  def get_next(self):
    return next(self.batches, None)


def quantize(onnx_path: str, out_path: str, feeds: dict, method: str = "minmax") -> None:
  """Writes the Q/DQ graph of `onnx_path` calibrated on `feeds` ({input name: array})."""
  names = [i.name for i in checks.session(onnx_path).get_inputs()]
  q.quantize_static(
      onnx_path, out_path, Frames(feeds, names), quant_format=q.QuantFormat.QDQ,
      op_types_to_quantize=["MatMul"], per_channel=True,
      activation_type=q.QuantType.QInt8, weight_type=q.QuantType.QInt8,
      calibrate_method=METHODS[method],
      # TensorRT takes symmetric quantisation only (zero points 0).
      extra_options={"ActivationSymmetric": True, "WeightSymmetric": True})


def error(fp32_path: str, int8_path: str, feeds: dict, fused: bool = False) -> dict:
  """{output: max |int8 - fp32|, output_mean: mean |int8 - fp32|} on `feeds`, plus the top
  action's agreement rate.

  By default the Q/DQ graph runs as written (no graph optimisation): each QuantizeLinear
  rounds and clips to int8 and the MatMul runs on the dequantised values, which is what an
  int8 engine with int32 accumulation (TensorRT's) computes, on any CPU. `fused=True` lets
  onnxruntime fuse Q/DQ into its own int8 CPU kernels instead; on x86 CPUs without VNNI those
  multiply u8 x s8 pairs into saturating int16 sums (onnxruntime's documented reason for
  `reduce_range`), so their error there measures the CPU kernel, not the quantisation.
  """
  options = ort.SessionOptions()
  if not fused:
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
  reference = ort.InferenceSession(fp32_path)
  runs = [reference.run(None, feeds), ort.InferenceSession(int8_path, options).run(None, feeds)]
  names = [o.name for o in reference.get_outputs()]
  out = {n: float(np.max(np.abs(a - b))) for n, a, b in zip(names, *runs)}
  out.update({f"{n}_mean": float(np.mean(np.abs(a - b))) for n, a, b in zip(names, *runs)})
  out["top_action_agreement"] = float(np.mean(runs[0][0].argmax(-1) == runs[1][0].argmax(-1)))
  return out


def sidecar_features(onnx_path: str) -> pipeline.Features:
  """The pipeline.Features that export.to_onnx recorded beside `onnx_path`."""
  path = os.path.splitext(onnx_path)[0] + ".json"
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: export the graph with export.to_onnx, which "
                            "writes it (with tokenizer.json) beside the ONNX")
  with open(path) as f:
    feats = dict(json.load(f)["features"])
  feats.pop("image", None)
  if "family" in feats:   # written before the statistics were recorded (the family's then)
    feats["statistics"] = preprocess.MEAN_STD[feats.pop("family")]
  feats["tokenizer"] = os.path.join(os.path.dirname(os.path.abspath(onnx_path)),
                                    feats["tokenizer"])
  return pipeline.Features(**feats)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--onnx", required=True)
  parser.add_argument("--calib", required=True, help="a run dir or a BDD-OIA/nuScenes folder")
  parser.add_argument("--out", required=True)
  parser.add_argument("--num", type=int, default=64, help="calibration frames")
  parser.add_argument("--method", choices=sorted(METHODS), default="minmax")
  parser.add_argument("--cache-dir", default=os.path.expanduser("~/.cache/drivlm_jax"))
  args = parser.parse_args()
  if not os.path.isfile(args.onnx):
    parser.error(f"--onnx {args.onnx}: no such file")
  if args.num < 1:
    parser.error(f"--num {args.num}: at least 1 calibration frame")
  try:   # a sidecar, calibration folder or graph we cannot use: named in one line
    feats = sidecar_features(args.onnx)
    calib = real_inputs.from_dir(args.calib, feats, args.num, args.cache_dir, split="train")
    held_out = real_inputs.from_dir(args.calib, feats, 16, args.cache_dir, split="test")
    quantize(args.onnx, args.out, calib, args.method)
  except (ValueError, OSError) as e:
    parser.error(str(e))
  ops = checks.check(args.out)
  print(f"{args.out}: {ops['QuantizeLinear']} QuantizeLinear / {ops['DequantizeLinear']} "
        f"DequantizeLinear nodes, calibrated on {len(calib['image'])} frames of {args.calib}")
  names = [i.name for i in ort.InferenceSession(args.out).get_inputs()]
  feeds = {k: held_out[k] for k in names}
  print("int8 (Q/DQ as written, as TensorRT runs it) vs fp32 on 16 held-out frames:",
        error(args.onnx, args.out, feeds))
  print("onnxruntime's fused int8 CPU kernels vs fp32 (saturate on x86 without VNNI):",
        error(args.onnx, args.out, feeds, fused=True))


if __name__ == "__main__":
  main()
