"""Runs as a config plus dotted-key overrides: validation, stable names, train commands.

Shared by the sweep launcher, the demo, the ablation runner and experiments.defaults.
"""
import argparse
import hashlib
import importlib.util
import json
import os
import re
import shlex

from drivlm_jax import pretrained, run as run_lib, train
from experiments import jobs

SCALARS = (bool, int, float, str)


def positive_int(text: str) -> int:
  """An argparse `type`: an integer >= 1 (seeds, hosts, runs at a time)."""
  value = int(text)
  if value < 1:
    raise argparse.ArgumentTypeError(f"{value}: at least 1")
  return value


def load_config_module(spec: str):
  """"configs/X.py[:arg]" -> (module, path, arg or None)."""
  path, _, arg = spec.partition(":")
  if not os.path.exists(path):
    raise FileNotFoundError(f"config file {path} not found")
  module_spec = importlib.util.spec_from_file_location(
      "sweep_config_" + re.sub(r"\W", "_", os.path.splitext(path)[0]), path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module, path, arg or None


def apply_overrides(config, overrides: dict):
  """Sets dotted keys on a ConfigDict; a key that does not exist is an error naming it."""
  for key, value in overrides.items():
    *parents, leaf = key.split(".")
    node = config
    for i, p in enumerate(parents):
      if p not in node:
        raise KeyError(f"override {key!r}: config has no {'.'.join(parents[:i + 1])!r}")
      node = node[p]
    if leaf not in node:
      raise KeyError(f"override {key!r}: no such config key")
    node[leaf] = value
  return config


def flag_values(overrides: dict) -> list:
  """["--config.k=v", ...] as drivlm_jax.train takes them (sorted by key)."""
  flags = []
  for key, value in sorted(overrides.items()):
    if not isinstance(value, SCALARS) and value is not None:
      raise TypeError(f"override {key}={value!r}: only scalars can be passed as flags")
    flags.append(f"--config.{key}={value}")
  return flags


def flag_string(overrides: dict) -> str:
  return " ".join(shlex.quote(f) for f in flag_values(overrides))


def run_name(overrides: dict) -> str:
  """A stable, filesystem-safe name from the overrides: readable `key=value` parts (last key
  component) and a hash of the full set, e.g. "learning_rate=0.001-seed=1-3f2a9c1e"."""
  if not overrides:
    return "default"
  readable = "-".join(f"{k.split('.')[-1]}={v}" for k, v in sorted(overrides.items()))
  readable = re.sub(r"[^A-Za-z0-9_.=+-]", "_", readable)[:80]
  digest = hashlib.sha1(json.dumps(overrides, sort_keys=True, default=str).encode())
  return f"{readable}-{digest.hexdigest()[:8]}"


def train_command(config_spec: str, workdir: str, overrides: dict,
                  python: str = "python3", extra=()) -> list:
  """argv of `python -m drivlm_jax.train` for one run."""
  return [python, "-m", "drivlm_jax.train", "--config", config_spec, "--workdir", workdir,
          *flag_values(overrides), *extra]


def train_once(config, workdir: str, name: str = "") -> str:
  """Trains `config` into `workdir` unless it is a finished run of that config (then reused;
  an interrupted one resumes); -> workdir. A run that a SIGTERM stopped (checkpoint saved)
  raises SystemExit naming it."""
  if not run_lib.finished(workdir, config, pretrained.configure):
    try:
      train.train(config, workdir)
    except train.Preempted as e:
      raise SystemExit(f"{name or workdir}: {e}") from None
  return workdir


def log_file(workdir: str) -> str:
  """A run's log.txt, written as the run goes: in its workdir, or for a workdir in a bucket
  (where a file cannot grow) in `run.local_dir(workdir)`."""
  return os.path.join(run_lib.local_dir(workdir), "log.txt")


def train_job(name: str, config, workdir: str, needs=()) -> jobs.Job:
  """`train_once(config, workdir)` as an `experiments.jobs` Job: its log in `log_file`, its
  metrics in the run's workdir, its steps the config's. A finished run that will be reused
  though trained with another config is said here, on the console (a worker's output goes
  to the run's log)."""
  if run_lib.path(workdir, "config.json").exists():
    run_lib.finished(workdir, config, pretrained.configure)
  return jobs.Job(name=name, fn=train_once, args=(config, workdir), needs=tuple(needs),
                  log=log_file(workdir), metrics=str(run_lib.path(workdir, "metrics.jsonl")),
                  steps=config.total_steps)
