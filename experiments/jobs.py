"""Training runs `workers` at a time, each started as soon as the runs it needs have finished:
how the demo fills both cores of a laptop, where one run's compiles, evaluation and input
pipeline leave a core idle about a third of the time.

Each worker is a process of its own (spawned: JAX does not survive a fork) that runs jobs one
after another, so its imports and the decoded frames of `pipeline` stay warm between runs. A
job's output (its progress bar, evaluation table, warnings) goes to its log file; the parent
shows one progress bar over every job's steps, read from their metrics.jsonl, and a line per
finished job. A SIGTERM to the parent reaches every worker: a run saves a checkpoint and
stops, as it does alone. The results do not depend on the company a run keeps: XLA's CPU
client splits work by its thread count, not by load (the demo's seven runs gave byte-identical
eval.json run one at a time and two at a time: README, "Reproducibility").
"""
import concurrent.futures
import dataclasses
import json
import multiprocessing
import os
import signal
import sys
import time
from typing import Callable

import tqdm


@dataclasses.dataclass(frozen=True)
class Job:
  name: str
  fn: Callable         # picklable (module level): fn(*args) -> result
  args: tuple = ()
  needs: tuple = ()    # names of the jobs that must finish first
  log: str = ""        # where the job's stdout and stderr go (its run directory's log.txt)
  metrics: str = ""    # its metrics.jsonl, for the progress bar
  steps: int = 0       # its training steps


def _steps_done(job: Job) -> int:
  try:
    with open(job.metrics, "rb") as f:
      f.seek(max(0, os.path.getsize(job.metrics) - 4096))
      last = f.read().splitlines()[-1]
    return min(job.steps, int(json.loads(last)["step"]))
  except (OSError, ValueError, IndexError, KeyError):
    return 0


def _call(fn, args, log):
  """In a worker: `fn(*args)` with this process's stdout and stderr (C level too) in `log`."""
  sys.stdout.flush()
  sys.stderr.flush()
  os.makedirs(os.path.dirname(log), exist_ok=True)
  with open(log, "a", buffering=1) as out:
    for fd in (1, 2):
      os.dup2(out.fileno(), fd)
    try:
      return fn(*args)
    finally:
      sys.stdout.flush()
      sys.stderr.flush()


def run(jobs: list, workers: int, initializer=None, initargs=(), describe=None) -> dict:
  """Runs every job, `workers` at a time (in list order among those whose `needs` are done);
  -> {name: result}. A failing job stops the others (SIGTERM: they save a checkpoint) and
  its error is raised here, with the end of its log. `describe(job, result)` -> the line
  printed when a job finishes."""
  names = {j.name for j in jobs}
  for job in jobs:
    missing = set(job.needs) - names
    if missing:
      raise ValueError(f"job {job.name} needs {sorted(missing)}, which are not jobs")
  pending, running, results = list(jobs), {}, {}
  start = {j.name: 0.0 for j in jobs}
  pool = concurrent.futures.ProcessPoolExecutor(
      workers, mp_context=multiprocessing.get_context("spawn"), initializer=initializer,
      initargs=initargs)
  stop = lambda *_: [os.kill(p.pid, signal.SIGTERM) for p in multiprocessing.active_children()]
  previous = signal.signal(signal.SIGTERM, stop)
  bar = tqdm.tqdm(total=sum(j.steps for j in jobs), desc=f"{len(jobs)} runs, {workers} at a "
                  "time", unit="step")
  try:
    while pending or running:
      for job in [j for j in pending if set(j.needs) <= set(results)]:
        if len(running) == workers:
          break
        pending.remove(job)
        start[job.name] = time.time()
        running[pool.submit(_call, job.fn, job.args, job.log)] = job
        bar.write(f"started {job.name}: log {job.log}")
      finished, _ = concurrent.futures.wait(running, timeout=2,
                                            return_when=concurrent.futures.FIRST_COMPLETED)
      for future in finished:
        job = running.pop(future)
        try:
          results[job.name] = future.result()
        except BaseException as e:
          tail = open(job.log, errors="replace").read()[-3000:] if os.path.exists(job.log) else ""
          bar.write(f"{job.name} failed ({type(e).__name__}: {e}); the end of {job.log}:\n{tail}")
          raise
        line = describe(job, results[job.name]) if describe else ""
        bar.write(f"finished {job.name} in {time.time() - start[job.name]:.0f} s" +
                  (f": {line}" if line else ""))
      done = sum(_steps_done(j) for j in jobs)
      if done > bar.n:
        bar.update(done - bar.n)
  except BaseException:
    stop()
    raise
  finally:
    bar.close()
    signal.signal(signal.SIGTERM, previous)
    pool.shutdown(wait=True, cancel_futures=True)
  return results
