"""Sweeps: dry runs of every launcher, stable names, and a local sweep that resumes."""
import hashlib
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest
import yaml
from jax._src import clusters

from experiments import launchers, report, runs, sweep

ROOT = pathlib.Path(__file__).resolve().parents[1]

CONFIG = '''
from configs import demo


def get_config(arg=None):
  config = demo.get_config("method=oracle,steps=24")
  config.data.cache_dir = {cache!r}
  config.data.width, config.data.height = 128, 72
  config.data.source.update(train=48, test=16)
  config.data.target.update(train=48, test=16)
  config.batch_size = 8
  config.log_every_steps = 1
  config.checkpoint_every_steps = 1000
  config.eval_every_steps = 1000
  config.evals.source_answers.num = config.evals.target_answers.num = 0
  return config


def sweep(add):
  add(seed=0)
  add(seed=1, **{{"optimizer.learning_rate": 1e-3}})
'''


@pytest.fixture
def config_file(tmp_path):
  path = tmp_path / "tiny_sweep.py"
  path.write_text(CONFIG.format(cache=str(tmp_path / "data")))
  return str(path)


def _dry_run(config_file, launcher, root, *extra):
  result = subprocess.run(
      [sys.executable, "-m", "experiments.sweep", config_file, "--launcher", launcher,
       "--dry-run", "--workdir-root", root, *extra],
      capture_output=True, text=True, timeout=120, check=False, cwd=ROOT)
  assert result.returncode == 0, result.stderr[-3000:]
  blocks = [b.split("\n", 1) for b in result.stdout.strip().split("\n\n")]
  assert all(head.startswith("run ") for head, _ in blocks), result.stdout
  return {head[4:]: body for head, body in blocks}, result.stdout


def test_run_names_are_stable_and_come_from_the_overrides():
  a = {"seed": 1, "optimizer.learning_rate": 0.001}
  assert runs.run_name(a) == runs.run_name(dict(reversed(list(a.items()))))
  assert runs.run_name(a).startswith("learning_rate=0.001-seed=1-")
  assert runs.run_name(a) != runs.run_name({"seed": 1, "optimizer.learning_rate": 0.002})


def test_dry_run_of_every_launcher(config_file, tmp_path, monkeypatch):
  root = "gs://bucket/sweeps"
  names = [runs.run_name({"seed": 0}),
           runs.run_name({"seed": 1, "optimizer.learning_rate": 1e-3})]
  workdirs = [f"{root}/tiny_sweep/{n}" for n in names]

  local, first = _dry_run(config_file, "local", root)
  assert list(local) == names
  assert local[names[1]] == (f"python3 -m drivlm_jax.train --config {config_file} --workdir "
                             f"{workdirs[1]} --config.optimizer.learning_rate=0.001 "
                             f"--config.seed=1")
  _, again = _dry_run(config_file, "local", root)
  assert again == first                                       # stable across invocations
  # --set reaches every run's command, not its name.
  shared, _ = _dry_run(config_file, "local", root, "--set", "data.max_len=64")
  assert list(shared) == names
  assert all("--config.data.max_len=64 " in c for c in shared.values())

  tpu, _ = _dry_run(config_file, "tpu_vm", root, "--tpu", "v4-32", "--zone", "us-central2-b")
  assert tpu[names[0]].startswith(
      "gcloud compute tpus tpu-vm ssh v4-32 --zone=us-central2-b --worker=all '--command=cd "
      "~/drivlm-jax && python3 -m drivlm_jax.train ")
  assert f"--workdir {workdirs[0]} --config.seed=0 --config.multihost=true'" in tpu[names[0]]

  sky, _ = _dry_run(config_file, "skypilot", root, "--accelerators", "H100:8",
                    "--num-nodes", "2")
  task = yaml.safe_load(sky[names[1]])
  assert task["num_nodes"] == 2 and task["resources"] == {"accelerators": "H100:8"}
  # Named by sweep group and run: another sweep's run with the same overrides is another.
  assert task["name"].startswith("tiny-sweep-learning-rate-0-001-seed-1-")
  assert task["name"].endswith("-" + hashlib.sha1(workdirs[1].encode()).hexdigest()[:8])
  assert len(task["name"]) <= 63
  assert launchers.sky_run_name(workdirs[1].replace("bucket", "other")) != task["name"]
  # SkyPilot runs setup as it is: stop at the first error. Its nodes' Python is 3.8-3.10:
  # a 3.11 virtualenv, drivlm-jax[cloud] (gs:// workdirs) and the GPU build of the installed
  # jax in it (setup.py's jaxlib is the CPU one); run activates it.
  setup = task["setup"].strip().splitlines()
  assert setup[0] == "set -euo pipefail"
  assert "uv venv --allow-existing --python 3.11 ~/.venvs/drivlm" in setup
  assert setup[-2:] == ['uv pip install -e ".[cloud]"', 'uv pip install "jax[cuda12]==$(python '
                        '-c \'import jax; print(jax.__version__)\')"']
  assert "source ~/.venvs/drivlm/bin/activate" in task["run"].splitlines()
  # A TPU slice is one node whose hosts all run the trainer: JAX finds them itself.
  tpu, _ = _dry_run(config_file, "skypilot", root, "--accelerators", "tpu-v4-32")
  tpu_task = yaml.safe_load(tpu[names[0]])
  assert tpu_task["num_nodes"] == 1 and '"jax[tpu]==' in tpu_task["setup"]
  assert "JAX_" not in tpu_task["run"]
  assert tpu_task["run"].strip().endswith("--config.seed=0 --config.multihost=true")
  result = subprocess.run(
      [sys.executable, "-m", "experiments.sweep", config_file, "--launcher", "skypilot",
       "--dry-run", "--workdir-root", root, "--accelerators", "tpu-v4-32", "--num-nodes", "2"],
      capture_output=True, text=True, timeout=120, check=False, cwd=ROOT)
  assert result.returncode == 2 and "2 separate TPU slices (multislice)" in result.stderr
  # A value with a newline comes back whole from the YAML.
  odd, _ = _dry_run(config_file, "skypilot", root, "--set", "data.tokenizer=a\nb: c")
  assert "'--config.data.tokenizer=a\nb: c'" in yaml.safe_load(odd[names[0]])["run"]
  result = subprocess.run(
      [sys.executable, "-m", "experiments.sweep", config_file, "--launcher", "skypilot",
       "--dry-run", "--workdir-root", str(tmp_path)], capture_output=True, text=True,
      timeout=120, check=False, cwd=ROOT)
  assert result.returncode == 2 and "needs --workdir-root in a bucket" in result.stderr
  run_lines = task["run"].strip().splitlines()
  assert run_lines[2].startswith("export JAX_COORDINATOR_ADDRESS=")
  assert run_lines[-1] == (f"python3 -m drivlm_jax.train --config {config_file} --workdir "
                           f"{workdirs[1]} --config.optimizer.learning_rate=0.001 "
                           f"--config.seed=1 --config.multihost=true")

  slurm, _ = _dry_run(config_file, "slurm", root, "--num-nodes", "4", "--gpus-per-node", "8",
                      "--partition", "gpu")
  script = slurm[names[0]].splitlines()
  assert script[0] == "#!/bin/bash"
  for line in ("#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
               "#SBATCH --partition=gpu", f"#SBATCH --job-name={names[0]}",
               "#SBATCH --output=slurm-%x-%j.out"):   # a local log for a bucket run
    assert line in script
  assert script[-1] == (f"srun python3 -m drivlm_jax.train --config {config_file} --workdir "
                        f"{workdirs[0]} --config.seed=0 --config.multihost=true")
  # JAX's own Slurm detection gives each task the GPU of its SLURM_LOCALID: the node's 8
  # tasks use its 8 GPUs (with one task per node, 7 would stay idle).
  gpus = set()
  for local in range(8):
    env = {"SLURM_JOB_ID": "77", "SLURM_STEP_NODELIST": "gpu[01-04]", "SLURM_NTASKS": "32",
           "SLURM_PROCID": str(8 + local), "SLURM_LOCALID": str(local)}
    for key, value in env.items():
      monkeypatch.setenv(key, value)
    _, processes, _, devices = clusters.ClusterEnv.auto_detect_unset_distributed_params(
        None, None, None, None, "slurm", None)
    assert processes == 32
    gpus.update(devices)
  assert gpus == set(range(8))


@pytest.mark.parametrize("flag", ["--num-nodes", "--parallel"])
def test_a_count_below_one_is_refused(config_file, flag, capsys):
  with pytest.raises(SystemExit) as stop:
    sweep.main([config_file, flag, "0", "--dry-run"])
  assert stop.value.code == 2 and f"argument {flag}: 0: at least 1" in capsys.readouterr().err


def test_a_sweep_with_an_unknown_key_is_an_error(tmp_path):
  path = tmp_path / "bad.py"
  path.write_text("from configs.demo import get_config\n\n\ndef sweep(add):\n"
                  "  add(**{'optimizer.learnign_rate': 1e-3})\n")
  with pytest.raises(KeyError, match="optimizer.learnign_rate"):
    sweep.collect(str(path), str(tmp_path))


def test_a_set_of_a_swept_key_is_an_error(config_file, tmp_path):
  """`--set seed=7` on a sweep that sets the seed per run would be dropped silently."""
  with pytest.raises(ValueError, match="--set seed: .* sets it per run"):
    sweep.collect(config_file, str(tmp_path), {"seed": 7})


def test_cluster_runs_carry_their_sweep_json(config_file, tmp_path, monkeypatch):
  """Runs launched on a cluster group by setting in experiments.report as local ones do:
  each workdir has its sweep.json before the job starts (`sbatch` here a script that
  accepts the job)."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  (bin_dir / "sbatch").write_text("#!/bin/sh\nexit 0\n")
  (bin_dir / "sbatch").chmod(0o755)
  monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
  monkeypatch.chdir(tmp_path)
  planned = sweep.collect(config_file, str(tmp_path / "runs"))
  assert sweep.execute("slurm", planned, config_file, launchers.Cluster()) == 0
  for name, workdir, overrides, _ in planned:
    assert json.loads((pathlib.Path(workdir) / "sweep.json").read_text()) == {
        "name": name, "overrides": overrides}
    assert (pathlib.Path(workdir) / "sbatch.sh").exists()


def _sweep(config_file, root):
  return subprocess.Popen(
      [sys.executable, "-m", "experiments.sweep", config_file, "--workdir-root", root],
      cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
      env={**os.environ, "JAX_NUM_CPU_DEVICES": "1"})


def test_local_sweep_resumes_after_an_interruption(config_file, tmp_path):
  root = str(tmp_path / "runs")
  first, second = [os.path.join(root, "tiny_sweep", n) for n in (
      runs.run_name({"seed": 0}), runs.run_name({"seed": 1, "optimizer.learning_rate": 1e-3}))]
  proc = _sweep(config_file, root)
  metrics = pathlib.Path(first) / "metrics.jsonl"
  deadline = time.time() + 600
  while time.time() < deadline and proc.poll() is None:
    if metrics.exists() and len(metrics.read_text().splitlines()) >= 5:
      proc.send_signal(signal.SIGTERM)
      break
    time.sleep(0.01)
  out = proc.communicate(timeout=600)[0]
  assert proc.returncode == 128 + signal.SIGTERM, out
  assert "sweep interrupted" in out and "stopped by SIGTERM (checkpoint saved" in out
  stopped_at = max(json.loads(line)["step"] for line in metrics.read_text().splitlines())
  assert 5 <= stopped_at < 24, out
  assert os.listdir(os.path.join(first, "checkpoints")) == [str(stopped_at)]
  assert not os.path.exists(second)

  proc = _sweep(config_file, root)
  out = proc.communicate(timeout=900)[0]
  assert proc.returncode == 0, out
  assert f"run {os.path.basename(first)}: resuming" in out
  assert f"run {os.path.basename(second)}: starting" in out
  for workdir in (first, second):
    assert json.loads(pathlib.Path(workdir, "eval.json").read_text())["step"] == 24
  steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
  assert sorted(set(steps)) == list(range(1, 25))

  proc = _sweep(config_file, root)
  out = proc.communicate(timeout=300)[0]
  assert proc.returncode == 0 and out.count("finished, skipped") == 2, out
  assert "warning" not in out            # the runs were trained with the sweep's configs

  # The report keeps the two settings apart (seeds of one setting would be averaged).
  results = report.collect([first, second])
  assert sorted(results["methods"]) == ["oracle", "oracle (optimizer.learning_rate=0.001)"]
