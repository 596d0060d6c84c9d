"""experiments.jobs: runs start after the runs they need, side by side in worker processes,
their output goes to their logs, and a failure stops the run with the failing job's log."""
import json
import os
import signal
import threading
import time

import pytest

from experiments import jobs


def _job(path, seconds, fail=False):
  """Writes start and end times to `path`; prints (to its log) and fails if asked."""
  start = time.time()
  open(path + ".started", "w").close()
  print(f"job output {os.path.basename(path)}", flush=True)
  time.sleep(seconds)
  if fail:
    raise ValueError(f"{os.path.basename(path)} failed on purpose")
  with open(path, "w") as f:
    json.dump({"start": start, "end": time.time(), "pid": os.getpid()}, f)
  return os.path.basename(path)


def _make(tmp_path, name, seconds, needs=(), fail=False):
  return jobs.Job(name=name, fn=_job, args=(str(tmp_path / f"{name}.json"), seconds, fail),
                  needs=needs, log=str(tmp_path / name / "log.txt"))


def test_jobs_run_side_by_side_after_what_they_need(tmp_path):
  todo = [_make(tmp_path, "teacher", 4.0), _make(tmp_path, "clip", 0.2),
          _make(tmp_path, "student", 0.2, needs=("teacher", "clip")),
          _make(tmp_path, "source_only", 0.2)]
  results = jobs.run(todo, workers=2)
  assert results == {j.name: f"{j.name}.json" for j in todo}
  times = {j.name: json.loads((tmp_path / f"{j.name}.json").read_text()) for j in todo}
  assert times["student"]["start"] >= max(times["teacher"]["end"], times["clip"]["end"])
  # Two at a time: clip and source-only ran while the teacher did, in another process.
  assert times["clip"]["start"] < times["teacher"]["end"]
  assert times["source_only"]["end"] < times["teacher"]["end"]
  assert times["clip"]["pid"] != times["teacher"]["pid"]
  assert len({t["pid"] for t in times.values()}) == 2 and os.getpid() not in {
      t["pid"] for t in times.values()}
  for job in todo:
    assert f"job output {job.name}.json" in open(job.log).read()


def test_a_failing_job_raises_with_its_log_and_its_dependents_never_start(tmp_path, capsys):
  todo = [_make(tmp_path, "teacher", 0.1, fail=True),
          _make(tmp_path, "student", 0.1, needs=("teacher",))]
  with pytest.raises(ValueError, match="teacher.json failed on purpose"):
    jobs.run(todo, workers=2)
  assert not (tmp_path / "student.json").exists()
  shown = "".join(capsys.readouterr())
  assert "teacher failed" in shown and "job output teacher.json" in shown


def test_a_job_needing_an_unknown_job_is_an_error_naming_both():
  with pytest.raises(ValueError, match="student needs \\['teacher'\\]"):
    jobs.run([jobs.Job(name="student", fn=_job, needs=("teacher",))], workers=2)


def test_a_sigterm_lets_running_jobs_end_and_starts_no_other(tmp_path):
  # A job that is not a training run ends as it would have; the one that needs it never starts.
  todo = [_make(tmp_path, "teacher", 3.0), _make(tmp_path, "student", 0.1, needs=("teacher",))]

  def sigterm_once_the_teacher_runs():
    while not (tmp_path / "teacher.json.started").exists():
      time.sleep(0.05)
    os.kill(os.getpid(), signal.SIGTERM)
  threading.Thread(target=sigterm_once_the_teacher_runs, daemon=True).start()
  with pytest.raises(SystemExit, match="before student started"):
    jobs.run(todo, workers=2)
  assert (tmp_path / "teacher.json").exists() and not (tmp_path / "student.json").exists()
