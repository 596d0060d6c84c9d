"""What launches one run where: the exact command (local, tpu_vm), SkyPilot task YAML or
sbatch script. Pure text; `experiments.sweep` prints it (--dry-run) or executes it."""
import dataclasses
import hashlib
import re
import shlex

from experiments import runs

LAUNCHERS = ("local", "tpu_vm", "skypilot", "slurm")
# A SkyPilot node's own Python is 3.8-3.10 (its GPU images: conda py310; TPU VMs: Ubuntu's),
# and jax 0.10 needs 3.11: setup makes a uv virtualenv of its own, which run activates.
VENV = "~/.venvs/drivlm"
# Launchers whose hosts keep nothing: each TPU VM host writes its own disk, a SkyPilot
# cluster's disk goes with it. Their runs' root must be a bucket.
REMOTE_ROOT = ("tpu_vm", "skypilot")


def is_tpu(accelerators: str) -> bool:
  return accelerators.lower().startswith("tpu")


def accelerator_setup(accelerators: str) -> str:
  """The JAX build for the accelerator (setup.py's jaxlib is the CPU one), at the installed
  jax's version: "jax[tpu]" for TPUs, "jax[cuda12]" for GPUs."""
  extra = "tpu" if is_tpu(accelerators) else "cuda12"
  return (f'uv pip install "jax[{extra}]==$(python -c \'import jax; print(jax.__version__)\')"')


def skypilot_setup(accelerators: str) -> list:
  """SkyPilot's setup lines: stop at the first failure (SkyPilot runs them as they are), uv
  (SkyPilot's own, else installed), a Python 3.11 virtualenv, drivlm-jax with the [cloud]
  extra (run directories in a bucket) and the accelerator's JAX."""
  return ["set -euo pipefail", 'export PATH="$HOME/.local/bin:$PATH"',
          "command -v uv > /dev/null || curl -LsSf https://astral.sh/uv/install.sh | sh",
          f"uv venv --allow-existing --python 3.11 {VENV}", f"source {VENV}/bin/activate",
          'uv pip install -e ".[cloud]"', accelerator_setup(accelerators)]


def check_skypilot(cluster: "Cluster"):
  """A ValueError for what SkyPilot would launch and JAX could not join: TPU slices on
  several nodes are separate slices (multislice, which needs MEGASCALE_* set up)."""
  if is_tpu(cluster.accelerators) and cluster.num_nodes > 1:
    raise ValueError(f"--num-nodes {cluster.num_nodes} with --accelerators "
                     f"{cluster.accelerators}: that is {cluster.num_nodes} separate TPU slices "
                     "(multislice), which runs here do not set up; one slice runs on all its "
                     "hosts, so ask for a bigger slice (e.g. tpu-v4-32) on one node")


@dataclasses.dataclass(frozen=True)
class Cluster:
  """Where remote launchers run (flags of experiments.sweep)."""
  tpu: str = "drivlm-tpu"              # tpu_vm: TPU VM name
  zone: str = "us-central2-b"
  project: str = ""
  repo_dir: str = "~/drivlm-jax"       # the checkout on the remote hosts
  accelerators: str = "tpu-v4-8"       # skypilot: e.g. tpu-v4-8, A100:8, H100:8
  num_nodes: int = 1                   # skypilot, slurm: hosts per run
  gpus_per_node: int = 0               # slurm (0: no --gpus-per-node)
  partition: str = ""                  # slurm
  time: str = "24:00:00"               # slurm
  managed: bool = False                # skypilot: `sky jobs launch` (managed, recovers)


def sky_name(name: str) -> str:
  """SkyPilot cluster/job names: lowercase letters, digits and dashes, <= 63 chars (the
  end kept: a run name's hash)."""
  safe = re.sub(r"-+", "-", re.sub(r"[^a-z0-9]", "-", name.lower())).strip("-")[-61:]
  safe = safe.lstrip("-")
  return safe if safe[:1].isalpha() else "r-" + safe


def local_command(config_spec, workdir, overrides, python) -> list:
  return runs.train_command(config_spec, workdir, overrides, python=python)


def tpu_vm_command(config_spec, workdir, overrides, cluster: Cluster) -> list:
  """gcloud ... ssh --worker=all: every host of the TPU VM runs the same command; each
  initialises jax.distributed (config.multihost) and reads its own data shard."""
  remote = " ".join(shlex.quote(a) for a in runs.train_command(
      config_spec, workdir, overrides, extra=["--config.multihost=true"]))
  command = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", cluster.tpu,
             f"--zone={cluster.zone}", "--worker=all",
             f"--command=cd {cluster.repo_dir} && {remote}"]
  if cluster.project:
    command.insert(6, f"--project={cluster.project}")
  return command


def _train_line(config_spec, workdir, overrides, multihost: bool) -> str:
  extra = ["--config.multihost=true"] if multihost else []
  return " ".join(shlex.quote(a) for a in runs.train_command(config_spec, workdir, overrides,
                                                              extra=extra))


def sky_run_name(workdir: str) -> str:
  """A run's SkyPilot name: its sweep group and run name (<root>/<group>/<name>), readable
  part cut to fit, and a hash of the whole workdir, so that runs of two sweeps (or two
  roots) with the same overrides never share a cluster."""
  group, name = str(workdir).rstrip("/").split("/")[-2:]
  digest = hashlib.sha1(str(workdir).encode()).hexdigest()[:8]
  return sky_name(f"{group}-{name}"[:50].rstrip("-") + "-" + digest)


def skypilot_yaml(config_spec, workdir, overrides, cluster: Cluster) -> str:
  """A SkyPilot task: the repo synced as workdir, installed in setup (`skypilot_setup`).
  A TPU slice runs on one node, and SkyPilot runs the command on each of its hosts: JAX finds
  the slice's hosts itself (`--config.multihost=true`, as tpu_vm). GPU nodes: with several,
  the head node's IP is jax.distributed's coordinator and the node rank its process id."""
  check_skypilot(cluster)
  run = ['export PATH="$HOME/.local/bin:$PATH"', f"source {VENV}/bin/activate"]
  tpu = is_tpu(cluster.accelerators)
  if cluster.num_nodes > 1:
    run += ['export JAX_COORDINATOR_ADDRESS="$(echo "$SKYPILOT_NODE_IPS" | head -n1):8476"',
            'export JAX_NUM_PROCESSES="$SKYPILOT_NUM_NODES"',
            'export JAX_PROCESS_ID="$SKYPILOT_NODE_RANK"']
  run.append(_train_line(config_spec, workdir, overrides, tpu or cluster.num_nodes > 1))
  odd = re.search("[\r\x0b\x0c\x1c-\x1e\x85\u2028\u2029]", run[-1])
  if odd:   # YAML reads them as line breaks, which the block scalar does not give back
    raise ValueError(f"run {workdir}: an override holds {odd.group()!r}, which a SkyPilot "
                     f"task YAML cannot carry")
  # Every physical line indented, also inside a quoted value that holds a newline: the block
  # scalar gives the text back as it was.
  indent = lambda lines: "\n".join("  " + line for line in "\n".join(lines).split("\n"))
  return (f"name: {sky_run_name(workdir)}\n"
          f"num_nodes: {cluster.num_nodes}\n"
          f"resources:\n  accelerators: {cluster.accelerators}\n"
          f"workdir: .\n"
          f"setup: |\n{indent(skypilot_setup(cluster.accelerators))}\n"
          f"run: |\n{indent(run)}\n")


def slurm_script(name, config_spec, workdir, overrides, cluster: Cluster) -> str:
  """sbatch script: one task per GPU (one per host without GPUs), started by `srun`; JAX
  detects Slurm and initialises jax.distributed from its environment, each task on the GPU
  of its SLURM_LOCALID (JAX's rule under Slurm: one process per GPU)."""
  # Slurm opens its log on the node's file system: beside the run, or (a bucket run) in the
  # directory sbatch is called from, named by the job.
  log = "slurm-%x-%j.out" if "://" in str(workdir) else f"{workdir}/slurm-%j.out"
  tasks = cluster.gpus_per_node or 1
  lines = ["#!/bin/bash", f"#SBATCH --job-name={name}", f"#SBATCH --nodes={cluster.num_nodes}",
           f"#SBATCH --ntasks-per-node={tasks}", f"#SBATCH --time={cluster.time}",
           f"#SBATCH --output={log}"]
  if cluster.gpus_per_node:
    lines.append(f"#SBATCH --gpus-per-node={cluster.gpus_per_node}")
  if cluster.partition:
    lines.append(f"#SBATCH --partition={cluster.partition}")
  lines += ["set -euo pipefail", f"cd {cluster.repo_dir}",
            "srun " + _train_line(config_spec, workdir, overrides,
                                  cluster.num_nodes * tasks > 1)]
  return "\n".join(lines) + "\n"
