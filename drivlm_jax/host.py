"""Settings of the host process that must be in place before it starts: XLA's large CPU
buffers on transparent huge pages, and kept for the next call instead of mapped afresh.

XLA's CPU runtime allocates a computation's temporaries on every call (2.0 GB for the CLIP
ViT-B/16 train step at batch 8) and frees them after it. glibc maps a block that large with
`mmap` and unmaps it on free, so every step first-touches every page again: on 4 KiB pages
590,000 page faults and a second of kernel time per step on a 2-core Intel Xeon. Three
glibc tunables, read only when a process starts (hence `restart_with_tunables`), fix this:

  glibc.malloc.hugetlb=1            large mappings on transparent huge pages where the
                                    kernel gives them only on request (THP mode "madvise",
                                    the common default; glibc >= 2.35): 10,000 faults
  glibc.malloc.mmap_threshold=4 GiB blocks below 4 GiB come from the heap ...
  glibc.malloc.trim_threshold=16 GiB ... and a freed one stays there for the next call

The last two work only for blocks malloc'd on the main thread: a worker thread's arena maps
anything over 64 MB afresh whatever the threshold. XLA allocates a computation's buffers on
the thread that runs it, which with JAX's asynchronous CPU dispatch is a worker, so the
restarted process also dispatches single-device CPU computations inline, on the calling
thread (`jax_cpu_enable_async_dispatch=False`; `JAX_CPU_ENABLE_ASYNC_DISPATCH=true` keeps
them asynchronous), as do the worker processes it spawns (`experiments.jobs`). Measured
(`python -m experiments.bench_train`, 2026-12-02, the Intel Xeon above): the ViT-B/16 step
0-50 page faults instead of 1,000-1,600 per call; ours/torch fp32 0.55 -> 0.66-0.74, the demo
model's bare step 260 -> 330-365 examples/s, the demo's own trainer unchanged (the pipeline
runs ahead in its own threads). The cost: a process keeps its largest step's buffers until
it exits.

Entry points call `restart_with_tunables` in an `if __name__ == "__main__"` block above their
imports, so the restarted process is the only one that loads JAX; library code never does.
A tunable already named in GLIBC_TUNABLES (e.g. `glibc.malloc.hugetlb=0`) is left alone.
"""
import importlib.metadata
import os
import platform
import sys

HUGE_PAGES = "glibc.malloc.hugetlb"
KEEP_FREED = {"glibc.malloc.mmap_threshold": str(4 << 30),
              "glibc.malloc.trim_threshold": str(16 << 30)}
THP_MODE = "/sys/kernel/mm/transparent_hugepage/enabled"


def jaxlib_version() -> tuple:
  """The installed jaxlib's (major, minor), read without importing JAX: what XLA's flags and
  passes depend on."""
  try:
    version = importlib.metadata.version("jaxlib")
  except importlib.metadata.PackageNotFoundError:   # a build installed without metadata
    from jaxlib import version as jaxlib  # pylint: disable=import-outside-toplevel
    version = jaxlib.__version__
  return tuple(int(v) for v in version.split(".")[:2])


def cpuinfo() -> dict:
  """The first processor's /proc/cpuinfo fields ({} where there is none): the CPU's vendor,
  model and flags, on which benchmarks and kernel choices depend."""
  info = {}
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if not line.strip():
          break                        # the first processor's block is enough
        key, _, value = line.partition(":")
        info[key.strip()] = value.strip()
  except OSError:
    pass
  return info


def _thp_mode() -> str | None:
  """The kernel's transparent huge page mode ("always", "madvise", "never"), or None."""
  try:
    with open(THP_MODE) as f:
      text = f.read()
  except OSError:
    return None
  return text[text.index("[") + 1:text.index("]")] if "[" in text else None


def _glibc_has_tunables() -> bool:
  """glibc >= 2.35: `glibc.malloc.hugetlb`, and thresholds above 32 MiB through tunables."""
  name, version = platform.libc_ver()
  if name != "glibc":
    return False
  try:
    return tuple(int(v) for v in version.split(".")[:2]) >= (2, 35)
  except ValueError:
    return False


def tunables() -> dict:
  """The tunables this machine can use: none without glibc >= 2.35; huge pages only where
  the kernel gives them on request."""
  if not _glibc_has_tunables():
    return {}
  return {**({HUGE_PAGES: "1"} if _thp_mode() == "madvise" else {}), **KEEP_FREED}


def _named(environ) -> dict:
  """GLIBC_TUNABLES as {name: value}."""
  return dict(item.split("=", 1) for item in environ.get("GLIBC_TUNABLES", "").split(":")
              if "=" in item)


def with_tunables(environ, wanted: dict) -> dict | None:
  """`environ` with the `wanted` tunables that GLIBC_TUNABLES does not name yet added, or
  None when it names them all."""
  current, named = environ.get("GLIBC_TUNABLES", ""), _named(environ)
  missing = [f"{k}={v}" for k, v in wanted.items() if k not in named]
  if not missing:
    return None
  return {**environ, "GLIBC_TUNABLES": ":".join(filter(None, (current, *missing)))}


def _keeps_freed(environ) -> bool:
  """Whether GLIBC_TUNABLES sets both `KEEP_FREED` thresholds at least as high as ours."""
  named = _named(environ)
  try:
    return all(int(named.get(k, 0)) >= int(v) for k, v in KEEP_FREED.items())
  except ValueError:
    return False


def dispatch_inline_where_kept():
  """Has JAX run single-device CPU computations on the calling thread where glibc keeps the
  freed blocks (`_keeps_freed`). JAX_CPU_ENABLE_ASYNC_DISPATCH (true/false), which JAX itself
  does not read, decides instead where it is set. Call before JAX creates its CPU client: in
  the restarted process (`restart_with_tunables`) and in each process it spawns."""
  explicit = os.environ.get("JAX_CPU_ENABLE_ASYNC_DISPATCH", "").strip().lower()
  if explicit:
    inline = explicit in ("0", "false", "f", "no", "n", "off")
  else:
    inline = _keeps_freed(os.environ)
  if inline or explicit:
    import jax  # pylint: disable=import-outside-toplevel
    jax.config.update("jax_cpu_enable_async_dispatch", not inline)


def restart_with_tunables():
  """Replaces this process with the same command line plus `tunables()`, once (the
  restarted process finds them set; none without glibc >= 2.35), then
  `dispatch_inline_where_kept`."""
  wanted = tunables()
  environ = with_tunables(os.environ, wanted) if wanted else None
  if environ is not None and getattr(sys, "orig_argv", None):
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, environ)
  dispatch_inline_where_kept()
