"""drivlm_jax.host: the restart with glibc's huge-page tunable, checked against the kernel's
own account of the process's memory (/proc/self/smaps_rollup)."""
import os
import subprocess
import sys

import pytest

from drivlm_jax import host

# Allocates 64 MiB with glibc's malloc (numpy would madvise its own), touches it, and prints
# the anonymous memory the kernel backs with huge pages.
CHILD = """
import ctypes
from drivlm_jax import host
host.restart_with_huge_pages()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
size = 64 << 20
ctypes.memset(libc.malloc(size), 1, size)
with open("/proc/self/smaps_rollup") as f:
  print(next(int(l.split()[1]) for l in f if l.startswith("AnonHugePages:")))
"""


def _huge_kib(tunables):
  env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
  if tunables is not None:
    env["GLIBC_TUNABLES"] = tunables
  out = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True,
                       check=True)
  return int(out.stdout.split()[-1])


@pytest.mark.skipif(not host.can_use_huge_pages(),
                    reason="needs glibc >= 2.35 and the kernel's THP mode 'madvise'")
def test_the_restart_puts_large_mallocs_on_huge_pages():
  assert _huge_kib(None) >= 32 << 10                       # restarted with the tunable
  assert _huge_kib(f"{host.TUNABLE}=0") == 0               # an explicit choice is kept


def test_the_environment_adds_the_tunable_once():
  env = host.with_huge_pages({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2", "A": "1"})
  assert env == {"A": "1", "GLIBC_TUNABLES": f"glibc.malloc.arena_max=2:{host.TUNABLE}=1"}
  assert host.with_huge_pages(env) is None
  assert host.with_huge_pages({})["GLIBC_TUNABLES"] == f"{host.TUNABLE}=1"
