"""Training runs `workers` at a time, each started as soon as the runs it needs have finished:
how the demo fills both cores of a laptop, where one run's compiles, evaluation and input
pipeline leave a core idle about a third of the time.

Each worker is a process of its own (spawned: JAX does not survive a fork) that runs jobs one
after another, so its imports and the decoded frames of `pipeline` stay warm between runs. A
job's output (its progress bar, evaluation table, warnings) goes to its log file; the parent
shows one progress bar over every job's steps, read from their metrics.jsonl, and a line per
finished job. A SIGTERM or Ctrl-C to the parent reaches every worker as a SIGTERM: a run saves
a checkpoint and stops, as it does alone, and no other run starts. The results do not depend
on the company a run keeps: XLA's CPU client splits work by its thread count, not by load (the
demo's seven runs gave byte-identical eval.json run one at a time and two at a time: README,
"Reproducibility").
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
from etils import epath

from drivlm_jax import host


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
  """The last step in the job's metrics.jsonl (a local file or one in a bucket), 0 if none."""
  try:
    with epath.Path(job.metrics).open("rb") as f:
      f.seek(max(0, f.seek(0, os.SEEK_END) - 4096))
      last = f.read().splitlines()[-1]
    return min(job.steps, int(json.loads(last)["step"]))
  except (OSError, ValueError, IndexError, KeyError):
    return 0


_STOPPED = []   # in a worker: a SIGTERM came between runs


def _start_worker(initializer, initargs):
  """A worker ignores Ctrl-C (the parent turns it into a SIGTERM, so that runs checkpoint) and,
  between runs, notes a SIGTERM instead of dying with it: a worker killed outright can leave the
  pool's queues locked. A running `train` takes SIGTERM itself (it checkpoints and stops)."""
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  signal.signal(signal.SIGTERM, lambda *_: _STOPPED.append(True))
  host.dispatch_inline_where_kept()   # spawned, it skipped its entry point's restart
  if initializer:
    initializer(*initargs)


def _call(fn, args, log):
  """In a worker: `fn(*args)` with this process's stdout and stderr (C level too) in `log`."""
  if _STOPPED:
    raise SystemExit("stopped (SIGTERM) before it started")
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
  printed when a job finishes. `workers` 1: one after another in this process, output here."""
  names = {j.name for j in jobs}
  for job in jobs:
    missing = set(job.needs) - names
    if missing:
      raise ValueError(f"job {job.name} needs {sorted(missing)}, which are not jobs")
  pending, running, results = list(jobs), {}, {}
  if workers <= 1:
    while pending:
      job = next(j for j in pending if set(j.needs) <= set(results))
      pending.remove(job)
      results[job.name] = job.fn(*job.args)
    return results
  start = {j.name: 0.0 for j in jobs}
  pool = concurrent.futures.ProcessPoolExecutor(
      workers, mp_context=multiprocessing.get_context("spawn"), initializer=_start_worker,
      initargs=(initializer, initargs))
  stopping = []

  def stop(*_):
    """Once: the workers' runs save a checkpoint and stop; no other run starts."""
    if not stopping:
      stopping.append(True)
      for process in multiprocessing.active_children():
        os.kill(process.pid, signal.SIGTERM)
  previous = signal.signal(signal.SIGTERM, stop)
  bar = tqdm.tqdm(total=sum(j.steps for j in jobs), desc=f"{len(jobs)} runs, {workers} at a "
                  "time", unit="step")
  try:
    while pending or running:
      for job in [j for j in pending if set(j.needs) <= set(results)]:
        if len(running) == workers or stopping:
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
        except SystemExit as e:   # stopped (SIGTERM): it says so itself
          bar.write(f"{job.name}: {e}")
          raise
        except BaseException as e:
          tail = open(job.log, errors="replace").read()[-3000:] if os.path.exists(job.log) else ""
          bar.write(f"{job.name} failed ({type(e).__name__}: {e}); the end of {job.log}:\n{tail}")
          raise
        line = describe(job, results[job.name]) if describe else ""
        bar.write(f"finished {job.name} in {time.time() - start[job.name]:.0f} s" +
                  (f": {line}" if line else ""))
      if stopping and pending and not running:
        raise SystemExit(f"stopped (SIGTERM) before {', '.join(j.name for j in pending)} "
                         "started; the same command runs them")
      done = (sum(j.steps for j in jobs if j.name in results)
              + sum(_steps_done(j) for j in running.values()))
      if done > bar.n:
        bar.update(done - bar.n)
  except BaseException as e:
    if running:
      bar.write(f"stopping ({type(e).__name__}): {', '.join(j.name for j in running.values())} "
                "save a checkpoint; the same command resumes them")
    stop()
    raise
  finally:
    bar.close()
    signal.signal(signal.SIGTERM, previous)
    pool.shutdown(wait=True, cancel_futures=True)
  return results
