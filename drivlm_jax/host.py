"""Settings of the host process that must be in place before it starts: large buffers on
transparent huge pages.

XLA's CPU runtime allocates a step's temporaries afresh on every call (2.1 GB for the CLIP
ViT-B/16 train step at batch 8), and glibc maps a block that large with `mmap` on 4 KiB
pages, so the step first-touches every page: 590,000 page faults and a second of kernel time
per step on a 2-core Intel Xeon (`python -m experiments.bench_train --cases vit_b16`: 0.49
-> 0.55 of torch's examples/s with huge pages). glibc's `glibc.malloc.hugetlb=1` tunable
(glibc >= 2.35) has malloc ask the kernel for transparent huge pages on those mappings
(10,000 faults) where the kernel gives them only on request (THP mode "madvise", the common
default; "always" needs nothing, "never" gives nothing). glibc reads it only when a process
starts, hence `restart_with_huge_pages`.

Entry points call it in an `if __name__ == "__main__"` block above their imports, so the
restarted process is the only one that loads JAX; library code never does.
An explicit `glibc.malloc.hugetlb=...` in GLIBC_TUNABLES (0 turns it off) is left alone.
"""
import os
import platform
import sys

TUNABLE = "glibc.malloc.hugetlb"
THP_MODE = "/sys/kernel/mm/transparent_hugepage/enabled"


def _thp_mode() -> str | None:
  """The kernel's transparent huge page mode ("always", "madvise", "never"), or None."""
  try:
    with open(THP_MODE) as f:
      text = f.read()
  except OSError:
    return None
  return text[text.index("[") + 1:text.index("]")] if "[" in text else None


def _glibc_has_tunable() -> bool:
  name, version = platform.libc_ver()
  if name != "glibc":
    return False
  try:
    return tuple(int(v) for v in version.split(".")[:2]) >= (2, 35)
  except ValueError:
    return False


def can_use_huge_pages() -> bool:
  return _thp_mode() == "madvise" and _glibc_has_tunable()


def with_huge_pages(environ) -> dict | None:
  """`environ` with the tunable added to GLIBC_TUNABLES, or None when it names it already."""
  tunables = environ.get("GLIBC_TUNABLES", "")
  if TUNABLE in tunables:
    return None
  return {**environ, "GLIBC_TUNABLES": ":".join(filter(None, (tunables, f"{TUNABLE}=1")))}


def restart_with_huge_pages():
  """Replaces this process with the same command line plus `glibc.malloc.hugetlb=1`, once
  (the restarted process finds it set); a no-op where glibc or the kernel cannot use it."""
  environ = with_huge_pages(os.environ)
  if environ is None or not can_use_huge_pages() or not getattr(sys, "orig_argv", None):
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, sys.orig_argv, environ)
