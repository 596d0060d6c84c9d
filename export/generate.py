"""Greedy explanations from the exported LM graphs (prefill + decode step) with onnxruntime:
the loop a device runs, and the reference the export is checked with."""
import numpy as np


def greedy(prefill, decode, feeds: dict, max_new_tokens: int) -> np.ndarray:
  """prefill/decode: onnxruntime sessions of `export.graphs.prefill`/`decode`; feeds: the
  prefill inputs by name. -> [B, max_new_tokens] int32 new tokens (no stop at EOS)."""
  logits, *cache = prefill.run(None, feeds)
  index = feeds["input_ids"].shape[1]
  tokens = [np.argmax(logits, -1).astype(np.int32)]
  names = [i.name for i in decode.get_inputs()]
  for step in range(max_new_tokens - 1):
    values = [tokens[-1], *cache, np.asarray(index + step, np.int32)]
    logits, *cache = decode.run(None, dict(zip(names, values)))
    tokens.append(np.argmax(logits, -1).astype(np.int32))
  return np.stack(tokens, axis=1)
