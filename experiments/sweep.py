r"""Sweeps: a config file's `sweep(add)` lists runs; launch them here or on a cluster.

  python -m experiments.sweep configs/demo.py[:arg] --launcher local|tpu_vm|skypilot|slurm
      [--dry-run] [--workdir-root runs/sweeps] [--parallel N]
      [--tpu NAME --zone Z --project P] [--accelerators A] [--num-nodes N] [--managed]
      [--gpus-per-node G --partition P --time HH:MM:SS] [--repo-dir DIR]
      [--set KEY=VALUE ...]   (overrides for every run, e.g. data.source_dir=gs://b/src)

In the config file (as in big_vision):

  def sweep(add):
    for seed in range(3):
      add(seed=seed, **{"optimizer.learning_rate": 1e-3})

Each `add(**overrides)` is one run (dotted config keys; each must exist). Its name comes from
the overrides (stable across invocations) and its workdir is
<workdir-root>/<config name>[_<arg>]/<name> (a gs:// root works for remote launchers).

- local: runs one after another (or --parallel N at a time), skips finished runs, and
  resumes interrupted ones (the trainer resumes from the workdir). Each workdir gets a
  sweep.json (name, overrides): `python -m experiments.report "<root>/<group>/*" --out DIR`
  then averages seeds per setting. SIGTERM/Ctrl-C stop the
  sweep after its runs save a checkpoint; the same command resumes it.
- tpu_vm: `gcloud compute tpus tpu-vm ssh NAME --worker=all --command ...` per run (every host
  runs the trainer with jax.distributed).
- skypilot: a task YAML per run (<workdir>/sky.yaml; setup makes a Python 3.11 virtualenv
  with uv and installs drivlm-jax[cloud] and the accelerator's JAX in it; a TPU slice is one
  node, all its hosts run the trainer),
  launched with `sky launch --down` on a cluster of its own, named <group>-<run> (or
  `sky jobs launch` with --managed). tpu_vm and skypilot need a gs:// --workdir-root.
- slurm: an sbatch script per run (<workdir>/sbatch.sh, `srun`, one task per host), `sbatch`.
--dry-run prints, per run, a line "run NAME" and then what would be launched: the command
(local, tpu_vm), the task YAML (skypilot) or the sbatch script (slurm); no cloud CLI needed.
"""
if __name__ == "__main__":  # before JAX loads: the restarted process loads it once
  from drivlm_jax import host
  host.restart_with_tunables()

import argparse
import ast
import inspect
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time

from drivlm_jax import pretrained, run as run_lib
from experiments import launchers, runs


def parse_sets(sets) -> dict:
  """["data.source_dir=gs://b/src", "batch_size=64"] -> overrides; values are parsed as
  Python literals where they are one (numbers, True/False), else kept as strings."""
  out = {}
  for item in sets or ():
    key, sep, value = item.partition("=")
    if not sep or not key:
      raise ValueError(f"--set {item!r}: expected KEY=VALUE")
    try:
      out[key] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      out[key] = value
  return out


def collect(config_spec: str, workdir_root: str, common: dict | None = None) -> list:
  """[(name, workdir, overrides, config)] of the config file's sweep(); `common` overrides
  (--set) go to every run but not into its name."""
  module, path, arg = runs.load_config_module(config_spec)
  if not hasattr(module, "sweep"):
    raise AttributeError(f"{path} defines no sweep(add)")
  added = []
  add = lambda **overrides: added.append(overrides)
  if len(inspect.signature(module.sweep).parameters) > 1:
    module.sweep(add, arg)
  else:
    module.sweep(add)
  if not added:
    raise ValueError(f"{path}: sweep() added no runs")
  group = os.path.splitext(os.path.basename(path))[0]
  if arg:
    group += "_" + "".join(c if c.isalnum() or c in "=-." else "_" for c in arg)
  out, seen = [], {}
  for own in added:
    clash = sorted(set(common or {}) & set(own))
    if clash:
      raise ValueError(f"--set {', '.join(clash)}: {path}'s sweep() sets "
                       f"{'it' if len(clash) == 1 else 'them'} per run ({own}); change the "
                       f"sweep, or drop the --set")
    overrides = {**(common or {}), **own}
    config = runs.apply_overrides(module.get_config(arg), overrides)
    name = runs.run_name(own)
    if name in seen:
      raise ValueError(f"{path}: sweep() adds the same run twice: {own}")
    seen[name] = True
    out.append((name, os.path.join(workdir_root, group, name), overrides, config))
  return out


def describe(launcher, name, spec, workdir, overrides, cluster) -> str:
  """What --dry-run prints for one run (after its `run NAME` line)."""
  quote = lambda argv: " ".join(shlex.quote(a) for a in argv)
  if launcher == "local":
    return quote(launchers.local_command(spec, workdir, overrides, "python3"))
  if launcher == "tpu_vm":
    return quote(launchers.tpu_vm_command(spec, workdir, overrides, cluster))
  if launcher == "skypilot":
    return launchers.skypilot_yaml(spec, workdir, overrides, cluster).rstrip()
  return launchers.slurm_script(name, spec, workdir, overrides, cluster).rstrip()


def _write_sweep_json(workdir, name, overrides):
  """The run's sweep.json, which experiments.report groups seeds of one setting by."""
  run_lib.write_json(run_lib.path(workdir, "sweep.json"), {"name": name, "overrides": overrides})


def _report_stopped(name, out):
  print(f"run {name}: stopped by SIGTERM (checkpoint saved; the same command resumes it)",
        file=out, flush=True)


def _local_log(workdir, name):
  """The run's output log: in its workdir, or under ./sweeps/<name> when that is a bucket."""
  folder = os.path.join("sweeps", name) if run_lib.is_remote(workdir) else workdir
  os.makedirs(folder, exist_ok=True)
  return open(os.path.join(folder, "sweep.log"), "a")


def run_local(spec, planned, parallel: int) -> int:
  """Runs the unfinished runs, `parallel` at a time -> exit status."""
  todo = []
  for name, workdir, overrides, config in planned:
    if run_lib.finished(workdir, config, pretrained.configure):
      print(f"run {name}: finished, skipped", flush=True)
    else:
      todo.append((name, workdir, overrides))
  procs, failed, stopped = {}, [], []

  def stop(signum, _):
    stopped.append(signum)
    for proc in procs.values():
      proc.send_signal(signal.SIGTERM)     # the trainer saves a checkpoint and exits

  previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
  try:
    while (todo and not stopped) or procs:
      while todo and not stopped and len(procs) < parallel:
        name, workdir, overrides = todo.pop(0)
        _write_sweep_json(workdir, name, overrides)
        resumed = run_lib.path(workdir, "checkpoints").exists()
        print(f"run {name}: {'resuming' if resumed else 'starting'} in {workdir}", flush=True)
        log = None if parallel == 1 else _local_log(workdir, name)
        procs[name] = subprocess.Popen(
            launchers.local_command(spec, workdir, overrides, sys.executable), stdout=log,
            stderr=subprocess.STDOUT if log else None, start_new_session=True)
      time.sleep(0.2)
      for name, proc in list(procs.items()):
        if proc.poll() is not None:
          del procs[name]
          if proc.returncode == run_lib.PREEMPTED_EXIT:
            failed.append(name)
            _report_stopped(name, sys.stdout)
          elif proc.returncode:
            failed.append(name)
            print(f"run {name}: failed (exit {proc.returncode})", flush=True)
          else:
            print(f"run {name}: done", flush=True)
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)
  if stopped:
    print("sweep interrupted: the same command resumes it", flush=True)
    return 128 + stopped[0]
  return 1 if failed else 0


def execute(launcher, planned, spec, cluster) -> int:
  """Launches on a cluster through its CLI (gcloud, sky, sbatch) -> exit status."""
  cli = {"tpu_vm": "gcloud", "skypilot": "sky", "slurm": "sbatch"}[launcher]
  if shutil.which(cli) is None:
    print(f"error: `{cli}` is not installed or not on PATH (--launcher {launcher}); "
          "--dry-run shows what would run", file=sys.stderr)
    return 2
  for name, workdir, overrides, _ in planned:
    print(f"run {name}", flush=True)
    _write_sweep_json(workdir, name, overrides)
    if launcher == "tpu_vm":
      argv = launchers.tpu_vm_command(spec, workdir, overrides, cluster)
    else:
      local_dir = workdir if "://" not in workdir else os.path.join("sweeps", name)
      os.makedirs(local_dir, exist_ok=True)
      if launcher == "skypilot":
        path = os.path.join(local_dir, "sky.yaml")
        text = launchers.skypilot_yaml(spec, workdir, overrides, cluster)
        sky = launchers.sky_run_name(workdir)
        # A cluster of its own per run, taken down when the run ends (results: the bucket).
        argv = (["sky", "jobs", "launch", "-y", "-n", sky, path] if cluster.managed
                else ["sky", "launch", "-y", "--down", "-c", sky, path])
      else:
        path = os.path.join(local_dir, "sbatch.sh")
        text = launchers.slurm_script(name, spec, workdir, overrides, cluster)
        argv = ["sbatch", path]
      with open(path, "w") as f:
        f.write(text)
    status = subprocess.run(argv, check=False).returncode
    if launcher == "tpu_vm" and status == run_lib.PREEMPTED_EXIT:   # the run, over ssh
      _report_stopped(name, sys.stderr)
      return status
    if status:
      print(f"error: launching {name} failed: {shlex.join(argv)}", file=sys.stderr)
      return 1
  return 0


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("config", help="configs/X.py[:arg] with a sweep(add) function")
  parser.add_argument("--launcher", choices=launchers.LAUNCHERS, default="local")
  parser.add_argument("--dry-run", action="store_true")
  parser.add_argument("--workdir-root", default="runs/sweeps")
  parser.add_argument("--parallel", type=runs.positive_int, default=1,
                      help="local: runs at a time")
  parser.add_argument("--set", action="append", metavar="KEY=VALUE",
                      help="a config override for every run (e.g. data.source_dir=DIR)")
  defaults = launchers.Cluster()
  for field in ("tpu", "zone", "project", "repo_dir", "accelerators", "num_nodes",
                "gpus_per_node", "partition", "time"):
    value = getattr(defaults, field)
    kind = runs.positive_int if field == "num_nodes" else type(value)
    parser.add_argument("--" + field.replace("_", "-"), type=kind, default=value)
  parser.add_argument("--managed", action="store_true", help="skypilot: managed jobs")
  args = parser.parse_args(argv)
  cluster = launchers.Cluster(**{f: getattr(args, f) for f in (
      "tpu", "zone", "project", "repo_dir", "accelerators", "num_nodes", "gpus_per_node",
      "partition", "time", "managed")})
  if args.launcher in launchers.REMOTE_ROOT and not run_lib.is_remote(args.workdir_root):
    parser.error(f"--launcher {args.launcher} needs --workdir-root in a bucket (gs://...): "
                 f"its hosts keep nothing, {args.workdir_root} would be on their disks")
  try:
    planned = collect(args.config, args.workdir_root, parse_sets(args.set))
    if args.launcher == "skypilot":   # every task's YAML can be written
      for _, workdir, overrides, _ in planned:
        launchers.skypilot_yaml(args.config, workdir, overrides, cluster)
  except (AttributeError, FileNotFoundError, KeyError, TypeError, ValueError) as e:
    parser.error(str(e))
  if args.dry_run:
    for name, workdir, overrides, _ in planned:
      print(f"run {name}")
      print(describe(args.launcher, name, args.config, workdir, overrides, cluster))
      print()
    return 0
  if args.launcher == "local":
    return run_local(args.config, planned, max(1, args.parallel))
  return execute(args.launcher, planned, args.config, cluster)


if __name__ == "__main__":
  sys.exit(main())
