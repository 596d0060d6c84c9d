"""Einsum -> MatMul on exported graphs.

jax2onnx writes every dense layer as an `Einsum` (e.g. "abc,cde->abde"). TensorRT runs
MatMul through its tuned GEMM kernels, and onnxruntime's quantiser only quantises MatMul/Gemm,
so each Einsum that multiplies activations [*P, *C] by a constant weight [*C, *F] into
[*P, *F] becomes Reshape -> MatMul with the weight as [prod C, prod F] -> Reshape.
"""
import numpy as np
import onnx
from onnx import helper, numpy_helper


def _split(equation: str):
  inputs, output = equation.replace(" ", "").split("->")
  x, w = inputs.split(",")
  return x, w, output


def _matmul_form(equation: str):
  """(prefix, contracted, features) letters when `equation` is a plain dense layer, else
  None."""
  if "." in equation:
    return None
  x, w, y = _split(equation)
  for k in range(1, min(len(x), len(w)) + 1):
    contracted = x[-k:]
    if w[:k] == contracted and y == x[:-k] + w[k:] and x[:-k] and w[k:]:
      if len(set(x + w[k:])) == len(x + w[k:]):
        return x[:-k], contracted, w[k:]
  return None


def einsum_to_matmul(model: onnx.ModelProto) -> int:
  """Rewrites `model` in place; returns how many Einsums became MatMuls."""
  graph = model.graph
  inits = {t.name: t for t in graph.initializer}
  nodes, count = [], 0
  for node in graph.node:
    eq = next((a.s.decode() for a in node.attribute if a.name == "equation"), "")
    form = _matmul_form(eq) if node.op_type == "Einsum" else None
    if form is None or len(node.input) != 2 or node.input[1] not in inits:
      nodes.append(node)
      continue
    prefix, contracted, features = form
    weight = numpy_helper.to_array(inits[node.input[1]])
    f_dims = weight.shape[len(contracted):]
    name = f"{node.name or node.output[0]}_matmul"
    w2 = numpy_helper.from_array(
        weight.reshape(int(np.prod(weight.shape[:len(contracted)])), -1), f"{name}_weight")
    graph.initializer.append(w2)
    x = node.input[0]
    if len(contracted) > 1:
      shape = numpy_helper.from_array(np.array([0] * len(prefix) + [-1], np.int64),
                                      f"{name}_in_shape")
      graph.initializer.append(shape)
      nodes.append(helper.make_node("Reshape", [x, shape.name], [f"{name}_in"],
                                    name=f"{name}_in"))
      x = f"{name}_in"
    out = node.output[0] if len(features) == 1 else f"{name}_out"
    nodes.append(helper.make_node("MatMul", [x, w2.name], [out], name=name))
    if len(features) > 1:
      shape = numpy_helper.from_array(np.array([0] * len(prefix) + list(f_dims), np.int64),
                                      f"{name}_out_shape")
      graph.initializer.append(shape)
      nodes.append(helper.make_node("Reshape", [out, shape.name], [node.output[0]],
                                    name=f"{name}_reshape"))
    count += 1
  del graph.node[:]
  graph.node.extend(nodes)
  used = {i for n in graph.node for i in n.input}
  keep = [t for t in graph.initializer if t.name in used]
  del graph.initializer[:]
  graph.initializer.extend(keep)
  return count
