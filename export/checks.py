"""Checks on an exported graph: ONNX validity, what TensorRT 10.3 (JetPack 6) can parse, and
parity of onnxruntime with the JAX function it came from."""
import collections

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as ort_errors

MAX_OPSET = 20   # TensorRT 10.x parses ONNX opsets 9-20

# ONNX operators (default domain) that the TensorRT 10.x ONNX parser supports, from the
# onnx-tensorrt operator matrix (docs/operators.md, 10.x). Anything else, e.g. the opset-23
# RMSNormalization, RotaryEmbedding or Attention, or an operator of another domain, fails to
# parse on a JetPack 6 device.
TENSORRT_OPS = frozenset("""
Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization
BlackmanWindow Cast CastLike Ceil Celu Clip Concat Constant ConstantOfShape Conv ConvTranspose
Cos Cosh CumSum DepthToSpace DequantizeLinear Div Dropout Einsum Elu Equal Erf Exp Expand
EyeLike Flatten Floor GRU Gather GatherElements GatherND Gelu Gemm GlobalAveragePool
GlobalLpPool GlobalMaxPool Greater GreaterOrEqual GridSample GroupNormalization HammingWindow
HannWindow HardSigmoid HardSwish Hardmax Identity If ImageScaler InstanceNormalization IsInf
IsNaN LayerNormalization LeakyRelu Less LessOrEqual Log LogSoftmax Loop LpNormalization LpPool
LRN LSTM MatMul Max MaxPool Mean MeanVarianceNormalization Min Mish Mod Mul Neg
NonMaxSuppression NonZero Not OneHot Or Pad ParametricSoftplus Pow PRelu QuantizeLinear RNN
RandomNormal RandomNormalLike RandomUniform RandomUniformLike Range Reciprocal ReduceL1
ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum
ReduceSumSquare Relu Reshape Resize ReverseSequence RoiAlign Round ScaledTanh Scan Scatter
ScatterElements ScatterND Selu Shape Shrink Sigmoid Sign Sin Sinh Size Slice Softmax Softplus
Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh ThresholdedRelu Tile TopK Transpose
Trilu Unsqueeze Upsample Where Xor
""".split())

# (op, input index) that TensorRT needs as a build-time constant.
CONSTANT_INPUTS = {("TopK", 1), ("Slice", 3), ("Squeeze", 1), ("Unsqueeze", 1), ("CumSum", 1)}


class GraphError(ValueError):
  """The exported graph is invalid, unparseable by TensorRT, or differs from JAX."""


def op_counts(model: onnx.ModelProto) -> collections.Counter:
  """{op_type: count} over the graph and its subgraphs."""
  counts = collections.Counter()

  def visit(graph):
    for node in graph.node:
      standard = node.domain in ("", "ai.onnx")
      counts[node.op_type if standard else f"{node.domain}::{node.op_type}"] += 1
      for attr in node.attribute:
        for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
          visit(sub)
  visit(model.graph)
  return counts


def tensorrt_problems(model: onnx.ModelProto) -> list:
  """Why TensorRT 10.3 would not parse `model` (empty when it would, as far as the
  operator matrix tells)."""
  problems = []
  opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
  if opset > MAX_OPSET:
    problems.append(f"opset {opset} > {MAX_OPSET} (TensorRT 10.3 parses opsets 9-{MAX_OPSET})")
  unsupported = {op: n for op, n in op_counts(model).items() if op not in TENSORRT_OPS}
  if unsupported:
    problems.append("operators TensorRT 10.3 cannot parse: " + ", ".join(
        f"{op} (x{n})" for op, n in sorted(unsupported.items())))
  constants = {t.name for t in model.graph.initializer}
  constants |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
  for node in model.graph.node:
    for i, name in enumerate(node.input):
      if (node.op_type, i) in CONSTANT_INPUTS and name and name not in constants:
        problems.append(f"{node.op_type} node {node.name!r}: input {i} ({name}) must be a "
                        f"constant for TensorRT")
    if node.op_type == "Einsum":
      eq = next(onnx.helper.get_attribute_value(a) for a in node.attribute
                if a.name == "equation")
      if b"..." in eq:
        problems.append(f"Einsum node {node.name!r}: ellipsis in {eq.decode()!r}")
    if node.op_type in ("QuantizeLinear", "DequantizeLinear") and len(node.input) > 2:
      zero = next((t for t in model.graph.initializer if t.name == node.input[2]), None)
      if zero is not None and np.any(onnx.numpy_helper.to_array(zero)):
        problems.append(f"{node.op_type} node {node.name!r}: non-zero zero point (TensorRT "
                        "takes symmetric quantisation only)")
  return problems


def check(path: str) -> collections.Counter:
  """onnx.checker's full check (with shape inference) and the TensorRT check; raises
  GraphError naming every problem. Returns the op counts."""
  try:
    onnx.checker.check_model(path, full_check=True)
  except onnx.checker.ValidationError as e:
    raise GraphError(f"{path}: onnx.checker: {e}") from e
  model = onnx.load(path, load_external_data=False)
  problems = tensorrt_problems(model)
  if problems:
    raise GraphError(f"{path}: " + "; ".join(problems))
  return op_counts(model)


def session(path: str, options=None) -> ort.InferenceSession:
  """An onnxruntime CPU session of `path`; a file onnxruntime cannot load (empty, cut, not
  ONNX) is a ValueError naming it."""
  try:
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
  except (ort_errors.Fail, ort_errors.InvalidArgument, ort_errors.InvalidGraph,
          ort_errors.InvalidProtobuf, ort_errors.NoSuchFile, ort_errors.NotImplemented,
          ort_errors.RuntimeException) as e:
    raise ValueError(f"{path}: onnxruntime cannot load it ({e})") from e


def parity(session, fn, inputs: dict, atol: float) -> dict:
  """Runs `session` (onnxruntime) and the JAX `fn` on `inputs` ({name: array}, in the
  graph's input order); -> {output name: max |onnx - jax|}. Raises GraphError above `atol`
  (or on a shape mismatch)."""
  names = [o.name for o in session.get_outputs()]
  got = session.run(names, inputs)
  want = fn(*inputs.values())
  diffs = {}
  for name, a, b in zip(names, got, want):
    b = np.asarray(b)
    if a.shape != b.shape:
      raise GraphError(f"output {name}: onnxruntime shape {a.shape} != JAX {b.shape}")
    diffs[name] = float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)), initial=0.0))
  bad = {k: v for k, v in diffs.items() if v > atol}
  if bad:
    raise GraphError(f"onnxruntime differs from JAX beyond {atol}: {bad}")
  return diffs
