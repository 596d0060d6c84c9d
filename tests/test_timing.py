"""Alternated timing: every callable is timed once per round, and with `settle` each timed
call follows untimed calls of the same callable, never another's."""
from drivlm_jax import timing


def test_settled_calls_follow_their_own_callable():
  log = []
  fns = {name: (lambda name=name: log.append(name)) for name in ("ort", "jax")}
  times = timing.interleaved(fns, warmup=1, iters=3, settle=1)
  assert {k: len(v) for k, v in times.items()} == {"ort": 3, "jax": 3}
  assert log == ["ort", "jax"] + ["ort", "ort", "jax", "jax"] * 3
  log.clear()
  timing.interleaved(fns, warmup=0, iters=2)
  assert log == ["ort", "jax", "ort", "jax"]
  latency = timing.time_backends(fns, warmup=0, iters=2)
  assert set(latency["ort"]) == {"p50_ms", "p90_ms", "p99_ms", "fps"}
