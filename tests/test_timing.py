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


def test_paired_warmup_pairs_are_untimed_and_reported_apart():
  log = []
  ours, peer = (lambda: log.append("ours")), (lambda: log.append("peer"))
  t = timing.paired(ours, peer, pairs=3, warmup=2)
  # first calls, 2 untimed pairs, 3 timed pairs: always alternating, ours first
  assert log == ["ours", "peer"] * 6
  assert len(t["warmup_ours_s"]) == len(t["warmup_peer_s"]) == 2 and t["pairs"] == 3
