"""Two hosts: two processes joined by `jax.distributed.initialize` on 127.0.0.1 (CPU, 2
devices each) train and evaluate as one 4-device process does, and a SIGTERM to one of them
makes both save the same step and exit."""
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from drivlm_jax import run as run_lib
from tests.test_train import read_metrics

ROOT = pathlib.Path(__file__).resolve().parents[1]
STEPS = 12
KEYS = ("loss", "loss_action", "loss_reason", "loss_lm", "grad_norm")


def _port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _launch(workdir, cache, hosts):
  """The train CLI on `hosts` processes (4 CPU devices in all) -> the Popen objects."""
  port, procs = _port(), []
  for index in range(hosts):
    env = {**os.environ, "JAX_NUM_CPU_DEVICES": str(4 // hosts)}
    if hosts > 1:
      env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(hosts),
                 JAX_PROCESS_ID=str(index))
    args = [sys.executable, "-m", "drivlm_jax.train", "--config",
            f"{ROOT}/configs/demo.py:steps={STEPS}", "--workdir", str(workdir),
            f"--config.multihost={'true' if hosts > 1 else 'false'}",
            f"--config.data.cache_dir={cache}", "--config.data.width=128",
            "--config.data.height=72", "--config.data.source.train=48",
            "--config.data.target.train=48", "--config.data.source.test=16",
            "--config.data.target.test=16", "--config.data.target_fraction=0.25",
            "--config.batch_size=8", "--config.log_every_steps=1",
            "--config.checkpoint_every_steps=1000", "--config.eval_every_steps=1000",
            # target: 16 examples in one batch of 40, so host 1 of 2 has none of them
            "--config.evals.source.batch_size=8", "--config.evals.target.batch_size=40",
            "--config.evals.source_answers.num=0", "--config.evals.target_answers.num=0"]
    procs.append(subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True))
  return procs


def _wait(procs, status=0):
  """Every process exits with `status`; else the failure shows each host's output."""
  codes = [p.wait(timeout=900) for p in procs]
  if codes != [status] * len(procs):
    logs = "\n".join(f"--- host {i}: exit {c}\n{p.stdout.read()[-4000:]}"
                     for i, (p, c) in enumerate(zip(procs, codes)))
    pytest.fail(f"exits {codes}, expected {status} each\n{logs}")


def test_two_hosts_train_evaluate_and_stop_as_one(tmp_path):
  """1 process x 4 devices vs 2 processes x 2 devices: the same per-step losses and eval.json;
  a SIGTERM to host 1 only makes both save one step and exit 143 (stopped, not finished),
  and re-running both resumes to the end."""
  cache = tmp_path / "cache"
  _wait(_launch(tmp_path / "one", cache, 1))      # also builds the shared sim cache
  workdir = tmp_path / "two"
  procs = _launch(workdir, cache, 2)
  deadline = time.time() + 900
  while time.time() < deadline and procs[1].poll() is None:
    metrics = workdir / "metrics.jsonl"
    if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
      procs[1].send_signal(signal.SIGTERM)      # host 1 only
      break
    time.sleep(0.02)
  _wait(procs, 128 + signal.SIGTERM)
  stopped = max(read_metrics(workdir))
  assert 2 <= stopped < STEPS, f"not preempted mid-run (stopped at {stopped})"
  assert sorted(os.listdir(workdir / "checkpoints")) == [str(stopped)]   # one step, both hosts
  _wait(_launch(workdir, cache, 2))

  one, two = read_metrics(tmp_path / "one"), read_metrics(workdir)
  assert sorted(one) == sorted(two) == list(range(1, STEPS + 1))
  for step in one:
    for key in KEYS:
      assert two[step][key] == pytest.approx(one[step][key], rel=1e-5, abs=1e-6), (step, key)
  a = json.loads((tmp_path / "one" / "eval.json").read_text())
  b = json.loads((workdir / "eval.json").read_text())
  assert a.keys() == b.keys() and a["test"].keys() == b["test"].keys()
  for domain, values in a["test"].items():
    assert values.keys() == b["test"][domain].keys()
    for k, v in values.items():
      assert b["test"][domain][k] == pytest.approx(v, abs=1e-4), (domain, k)


def test_a_reader_never_sees_a_partly_written_run_file(tmp_path):
  """Host 0 rewrites config.json while another host reads it (`check_resume`): the reader
  gets the old text or the new one whole, never an empty or cut one."""
  file = run_lib.path(tmp_path, "config.json")
  texts = [json.dumps({"total_steps": n, "pad": "x" * 400_000}) for n in (1, 2)]
  run_lib.write_text(file, texts[0])
  done = threading.Event()

  def rewrite():
    for i in range(60):
      run_lib.write_text(file, texts[i % 2])
    done.set()

  writer = threading.Thread(target=rewrite)
  writer.start()
  reads = 0
  while not done.is_set():
    assert file.read_text() in texts
    reads += 1
  writer.join()
  assert reads > 1 and os.listdir(tmp_path) == ["config.json"]   # no temporary file left
