"""`python -m experiments.machine`: where a benchmark runs: the CPU (vendor, model, vector extensions, cores, clock), its
theoretical fp32 peak, the library versions, and the threads each side really used.

Every benchmark puts `describe()` into its JSON and prints `line()`; the README's tables
name the machine from it. The fp32 peak is cores x clock x FLOP/cycle: 2 FMA pipes x 2 FLOP
x the fp32 lanes of the widest vector an FMA pipe executes at full rate (512-bit AVX-512 on
Intel server cores, 16 lanes: 64 FLOP/cycle; AMD Zen 4 runs AVX-512 on 256-bit pipes, and
AVX2 cores have 256-bit ones, 8 lanes: 32 FLOP/cycle). The clock is /proc/cpuinfo's "cpu
MHz" (the frequency the kernel reports, not the turbo a core may reach under load).
`busy_threads(fn)` counts the threads of this process that did real work during `fn()`,
from the kernel's per-thread CPU time: what a thread pool uses, not what it was told.
"""
import importlib.metadata
import os


def _cpuinfo() -> dict:
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


def _version(package: str) -> str | None:
  try:
    return importlib.metadata.version(package)
  except importlib.metadata.PackageNotFoundError:
    return None


def flop_per_cycle(vendor: str, flags: set) -> int:
  """fp32 FLOP per cycle per core (see the module docstring)."""
  if "avx512f" in flags and vendor == "GenuineIntel":
    return 64
  if {"avx512f", "avx2", "fma"} & flags:
    return 32
  return 16


def describe() -> dict:
  info = _cpuinfo()
  vendor = info.get("vendor_id", "unknown")
  flags = set(info.get("flags", "").split())
  cores = len(os.sched_getaffinity(0))
  mhz = float(info["cpu MHz"]) if "cpu MHz" in info else None
  per_cycle = flop_per_cycle(vendor, flags)
  wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16",
            "amx_int8")
  return {
      "cpu": {"vendor": vendor, "model_name": info.get("model name"),
              "family": info.get("cpu family"), "model": info.get("model"),
              "flags": sorted(flags & set(wanted)), "cores": cores, "mhz": mhz,
              "fp32_flop_per_cycle": per_cycle,
              "fp32_peak_gflops": cores * mhz * per_cycle / 1e3 if mhz else None},
      "versions": {p: _version(p) for p in ("jax", "jaxlib", "torch", "transformers",
                                            "onnxruntime")},
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
  }


def line(machine: dict) -> str:
  """One line naming the machine, for a benchmark's output and the README's tables."""
  cpu = machine["cpu"]
  peak = cpu["fp32_peak_gflops"]
  return (f"{cpu['vendor']} {cpu['model_name']} (family {cpu['family']} model {cpu['model']}), "
          f"{cpu['cores']} cores at {cpu['mhz'] or '?'} MHz, "
          f"{'/'.join(cpu['flags']) or 'no AVX'}, fp32 peak "
          f"{f'{peak:.0f} GFLOP/s' if peak else 'unknown'}; "
          + ", ".join(f"{k} {v}" for k, v in machine["versions"].items() if v))


def _thread_times() -> dict:
  times = {}
  for tid in os.listdir("/proc/self/task"):
    try:
      with open(f"/proc/self/task/{tid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
      times[tid] = int(fields[11]) + int(fields[12])   # utime + stime, clock ticks
    except (OSError, IndexError):
      pass
  return times


def busy_threads(fn, share: float = 0.1) -> int:
  """Threads of this process that each did at least `share` of the busiest thread's CPU
  time while `fn()` ran (run it for a second or more: the kernel counts in 10 ms ticks)."""
  before = _thread_times()
  fn()
  after = _thread_times()
  used = [after[t] - before.get(t, 0) for t in after]
  top = max(used, default=0)
  return sum(u >= share * top for u in used) if top else 0


if __name__ == "__main__":
  import json
  where = describe()
  print(line(where))
  print(json.dumps(where, indent=1))
