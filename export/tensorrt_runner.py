"""Runs a serialized TensorRT engine on numpy inputs (TensorRT 10 named-tensor API, device
buffers from torch's CUDA allocator). Only on a machine with TensorRT and a GPU."""
import numpy as np


def import_tensorrt():
  """`tensorrt`, or a RuntimeError saying where engines are built."""
  try:
    import tensorrt  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise RuntimeError(
        "the tensorrt Python package is not installed here. TensorRT engines are tied to the "
        "GPU and the TensorRT version, so build them on the target: copy the .onnx (and its "
        ".json and tokenizer.json) to the Jetson, where JetPack 6 ships TensorRT 10.3 with "
        "its Python bindings, and run this command (or the trtexec command above) "
        "there") from e
  return tensorrt


class Engine:
  """engine(feeds: {name: array}) -> {output name: array}."""

  def __init__(self, path: str):
    import torch  # pylint: disable=import-outside-toplevel
    if not torch.cuda.is_available():
      raise RuntimeError("running a TensorRT engine needs a CUDA GPU (torch.cuda)")
    trt = import_tensorrt()
    self.torch, self.trt = torch, trt
    logger = trt.Logger(trt.Logger.WARNING)
    with open(path, "rb") as f:
      self.engine = trt.Runtime(logger).deserialize_cuda_engine(f.read())
    if self.engine is None:
      raise RuntimeError(f"{path}: TensorRT could not deserialize the engine (built with "
                         "another TensorRT version or GPU?)")
    self.context = self.engine.create_execution_context()
    names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
    is_input = lambda n: self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT
    self.inputs = [n for n in names if is_input(n)]
    self.outputs = [n for n in names if not is_input(n)]
    self.stream = torch.cuda.Stream()

  def __call__(self, feeds: dict) -> dict:
    torch, trt = self.torch, self.trt
    buffers = {}
    for name in self.inputs:
      dtype = trt.nptype(self.engine.get_tensor_dtype(name))
      buffers[name] = torch.from_numpy(np.ascontiguousarray(feeds[name], dtype)).cuda()
      self.context.set_input_shape(name, tuple(feeds[name].shape))
    for name in self.outputs:
      shape = tuple(self.context.get_tensor_shape(name))
      dtype = trt.nptype(self.engine.get_tensor_dtype(name))
      buffers[name] = torch.empty(shape, dtype=torch.from_numpy(np.zeros(0, dtype)).dtype,
                                  device="cuda")
    for name, buffer in buffers.items():
      self.context.set_tensor_address(name, buffer.data_ptr())
    if not self.context.execute_async_v3(self.stream.cuda_stream):
      raise RuntimeError("TensorRT execution failed")
    self.stream.synchronize()
    return {name: buffers[name].cpu().numpy() for name in self.outputs}
