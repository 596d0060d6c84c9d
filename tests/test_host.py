"""drivlm_jax.host: the restart with glibc's malloc tunables, checked against the kernel's
and glibc's own accounts of the process's memory (/proc/self/smaps_rollup, mallinfo2)."""
import os
import subprocess
import sys

import pytest

from drivlm_jax import host

# Allocates 64 MiB with glibc's malloc (numpy would madvise its own), touches it, and prints
# the anonymous memory the kernel backs with huge pages.
HUGE = """
import ctypes
from drivlm_jax import host
host.restart_with_tunables()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
size = 64 << 20
ctypes.memset(libc.malloc(size), 1, size)
with open("/proc/self/smaps_rollup") as f:
  print(next(int(l.split()[1]) for l in f if l.startswith("AnonHugePages:")))
"""

# Runs a small training step (the gradient of a 2-layer MLP, batch 16384) twice, then prints
# the free bytes glibc's malloc holds (mallinfo2: freed blocks it kept, not unmapped), the
# step's temporaries by XLA's own account, and JAX's CPU dispatch mode.
STEP = """
import ctypes, sys
from drivlm_jax import host
if sys.argv[1] == "restart":
  host.restart_with_tunables()
import jax, jax.numpy as jnp
f = jax.jit(jax.grad(lambda w, x: jnp.tanh(jnp.tanh(x @ w) @ w).sum()))
w, x = jnp.full((512, 512), 0.01), jnp.ones((16384, 512))
temp = f.lower(w, x).compile().memory_analysis().temp_size_in_bytes
for _ in range(2):
  f(w, x).block_until_ready()
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = type("mallinfo2", (ctypes.Structure,), {"_fields_": [
    (k, ctypes.c_size_t) for k in ("arena ordblks smblks hblks hblkhd usmblks fsmblks "
                                   "uordblks fordblks keepcost").split()]})
print(libc.mallinfo2().fordblks, temp, jax.config.values["jax_cpu_enable_async_dispatch"])
"""


# Runs one job in an `experiments.jobs` worker and prints its CPU dispatch mode.
JOBS = """
import os, sys, tempfile
from experiments import jobs
from tests.test_host import dispatch_mode
log = os.path.join(tempfile.mkdtemp(), "a.txt")
print(jobs.run([jobs.Job("a", dispatch_mode, (), log=log)], 2)["a"])
"""


def dispatch_mode():
  import jax  # pylint: disable=import-outside-toplevel
  return jax.config.values["jax_cpu_enable_async_dispatch"]


def _child(code, tunables=None, *args, **extra_env):
  env = {k: v for k, v in os.environ.items()
         if k not in ("GLIBC_TUNABLES", "JAX_CPU_ENABLE_ASYNC_DISPATCH")
         and not k.startswith("MALLOC_")}
  env.update(extra_env)
  if tunables is not None:
    env["GLIBC_TUNABLES"] = tunables
  out = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True,
                       text=True, check=True)
  return out.stdout.split()


@pytest.mark.skipif(host.HUGE_PAGES not in host.tunables(),
                    reason="needs glibc >= 2.35 and the kernel's THP mode 'madvise'")
def test_the_restart_puts_large_mallocs_on_huge_pages():
  assert int(_child(HUGE)[-1]) >= 32 << 10                      # restarted with the tunable
  assert int(_child(HUGE, f"{host.HUGE_PAGES}=0")[-1]) == 0     # an explicit choice is kept


@pytest.mark.skipif(not host.tunables(), reason="needs glibc >= 2.35")
def test_the_restart_keeps_xla_temporaries_for_the_next_call():
  kept, temp, async_dispatch = _child(STEP, None, "restart")
  plain, _, plain_async = _child(STEP, None, "plain")
  assert (async_dispatch, plain_async) == ("False", "True")
  assert int(kept) >= int(temp) > int(plain)          # 96 MiB: ~225 MB kept vs ~25 MB
  # A user's lower threshold, or an explicit JAX_CPU_ENABLE_ASYNC_DISPATCH, wins.
  assert _child(STEP, "glibc.malloc.mmap_threshold=131072", "restart")[-1] == "True"
  assert _child(STEP, None, "restart", JAX_CPU_ENABLE_ASYNC_DISPATCH="true")[-1] == "True"


def test_jobs_workers_dispatch_as_their_parent():
  """`experiments.jobs` spawns its workers, which skip the entry point's restart."""
  tunables = ":".join(f"{k}={v}" for k, v in host.KEEP_FREED.items())
  assert _child(JOBS, tunables)[-1] == "False"
  assert _child(JOBS, None)[-1] == "True"


def test_the_environment_adds_each_tunable_once():
  wanted = {"a.b": "1", "c.d": "2"}
  env = host.with_tunables({"GLIBC_TUNABLES": "x.y=0:c.d=5", "A": "1"}, wanted)
  assert env == {"A": "1", "GLIBC_TUNABLES": "x.y=0:c.d=5:a.b=1"}   # c.d: the user's choice
  assert host.with_tunables(env, wanted) is None
  assert host.with_tunables({}, wanted)["GLIBC_TUNABLES"] == "a.b=1:c.d=2"
