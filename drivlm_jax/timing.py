"""Wall-clock timing shared by the demo and the benchmarks: callables timed in alternation
(A B A B ...), so a machine that slows down mid-run slows every contender alike.

Pure Python + numpy (no JAX import): `export.benchmark` uses it on a device that has only
onnxruntime / TensorRT. Callers block on their own results (`jax.block_until_ready`).
"""
import statistics
import time

import numpy as np


def timed(fn) -> float:
  """Seconds one call of `fn()` takes."""
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def interleaved(fns: dict, warmup: int, iters: int, settle: int = 0) -> dict:
  """{name: [seconds per call]} of `fns` ({name: zero-arg callable}) after `warmup` calls of
  each, one timed call of each per round for `iters` rounds. With `settle` > 0, each timed
  call follows that many untimed calls of the same callable, so it does not pay for the one
  before it: onnxruntime's worker threads spin for a while after each run, and a JAX call
  timed right after one ran 13% (CLIP-B/16 student, batch 1) to 40% (the same, pruned to a
  quarter) slower than the identical executable timed after a JAX call."""
  for fn in fns.values():
    for _ in range(warmup):
      fn()
  times = {name: [] for name in fns}
  for _ in range(iters):
    for name, fn in fns.items():
      for _ in range(settle):
        fn()
      times[name].append(timed(fn))
  return times


def percentiles(seconds) -> dict:
  ms = 1e3 * np.asarray(seconds)
  p50, p90, p99 = np.percentile(ms, [50, 90, 99])
  return {"p50_ms": p50, "p90_ms": p90, "p99_ms": p99, "fps": 1e3 / p50}


def time_backends(backends: dict, warmup: int, iters: int) -> dict:
  """{name: percentiles} of `backends` ({name: zero-arg callable}), interleaved, each timed
  call after one untimed call of its own (`settle`): the latency each backend has when it
  runs alone, as deployed."""
  return {name: percentiles(t)
          for name, t in interleaved(backends, warmup, iters, settle=1).items()}


def paired(ours, peer, pairs: int, warmup: int = 0) -> dict:
  """The benchmark rule against the peer: time each first call (compile / warm-up), then
  `warmup` untimed pairs (their times reported apart), then alternate ours and the peer
  `pairs` times; medians and the median per-pair ratio."""
  first_ours, first_peer = timed(ours), timed(peer)
  settling = interleaved({"ours": ours, "peer": peer}, 0, warmup)
  times = interleaved({"ours": ours, "peer": peer}, 0, pairs)
  a, b = times["ours"], times["peer"]
  return {"ours_ms": 1e3 * statistics.median(a), "peer_ms": 1e3 * statistics.median(b),
          "ratio_peer_over_ours": statistics.median(y / x for x, y in zip(a, b)),
          "ours_first_call_s": first_ours, "peer_first_call_s": first_peer, "pairs": pairs,
          "warmup_ours_s": settling["ours"], "warmup_peer_s": settling["peer"]}
