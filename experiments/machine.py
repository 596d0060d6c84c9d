"""`python -m experiments.machine`: where a benchmark runs: the CPU (vendor, model, vector
extensions, cores, clock), its theoretical fp32 peak, the library versions, and the threads
each side really used.

Every benchmark puts `describe()` into its JSON and prints `line()`; the benchmark tables
(README, docs/benchmarks.md) name the machine from it. The fp32 peak is cores x clock x
FLOP/cycle, both measured on the machine. FLOP/cycle (`measured_flop_per_cycle`) is 2 x the
fp32 lanes of the widest FMA the CPU has (AVX-512F: 16; AVX2's FMA: 8) x the FMAs a core
retires per cycle, timed on independent FMAs against the clock probe's chain on the same
thread (each timed in the thread's own CPU time, so another process taking the core does
not move the ratio) and rounded to whole FMA pipes: 64 on most Intel server cores (AMX ones
all) and AMD Zen 5 server cores (two 512-bit pipes), 32 on Zen 4 (AVX-512 on 256-bit pipes:
one 512-bit FMA per cycle), on Xeons with one 512-bit FMA unit and on AVX2 cores. What it
cannot see: a busy sibling hyperthread on the host, or a core that lowers its clock under
AVX-512 (the add chain runs at the higher clock), both of which read as fewer FMAs per cycle. Vendor tables get this wrong across generations (the table this replaced gave a
Zen 5 EPYC 32, and its XLA GEMM ran at 191% of that "peak"); the table (`flop_per_cycle`) is
only the fallback where the probe cannot run. The clock is measured
(`measured_mhz`): every core runs a chain of dependent register adds (one cycle each on
x86-64 cores), so cycles / seconds is the clock the cores really run at under load. In a
virtual machine /proc/cpuinfo's "cpu MHz" is the nominal clock (2600 MHz on a Xeon whose cores
ran at 3900, where torch's GEMM reached 130% of the "peak" at 2600); it is kept beside the
measured one, and the peak falls back to it off x86-64 Linux.
`busy_threads(fn)` counts the threads of this process that did real work during `fn()`,
from the kernel's per-thread CPU time: what a thread pool uses, not what it was told.
"""
import ctypes
import importlib.metadata
import mmap
import os
import platform
import threading
import time

from drivlm_jax import host

# mov rcx, rdi; xor eax, eax; mov edx, 1; then `ADDS` x `add rax, rdx` (each waits for the
# one before: 1 cycle apiece; not `add rax, imm`, which newer Intel cores fold at rename);
# dec rcx; jnz back to the adds; ret.
ADDS = 16
FMAS = 12   # independent FMAs per loop (> latency x pipes); `_fma_code` encodes up to 12
assert FMAS <= 12, FMAS   # registers 12 and 13 are the sources
_CHAIN = (bytes.fromhex("4889f9" "31c0" "ba01000000") + bytes.fromhex("4801d0") * ADDS
          + bytes.fromhex("48ffc9") + bytes([0x75, -(3 * ADDS + 5) & 0xFF]) + b"\xc3")


def _version(package: str) -> str | None:
  try:
    return importlib.metadata.version(package)
  except importlib.metadata.PackageNotFoundError:
    return None


def flop_per_cycle(vendor: str, flags: set, family: int | None = None) -> int:
  """fp32 FLOP per cycle per core from the vendor and CPU family, where
  `measured_flop_per_cycle` cannot run: 64 for AVX-512 on Intel and on AMD from Zen 5
  (family 26), else 32 with AVX2 or FMA, else 16. A rough table: Zen 5's mobile parts and
  Xeons with one 512-bit FMA unit have 32 where it says 64 (the probe measures them)."""
  if "avx512f" in flags and (vendor == "GenuineIntel"
                             or (vendor == "AuthenticAMD" and (family or 0) >= 26)):
    return 64
  if {"avx512f", "avx2", "fma"} & flags:
    return 32
  return 16


def _executable(code: bytes):
  """x86-64 machine code as a callable taking and returning one integer (a C long), or None
  off x86-64 Linux or where executable memory cannot be mapped."""
  if platform.machine() != "x86_64" or not os.path.exists("/proc/self"):
    return None
  try:
    page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
  except (OSError, ValueError, AttributeError):
    return None
  page.write(code)
  fn = ctypes.CFUNCTYPE(ctypes.c_long, ctypes.c_long)(
      ctypes.addressof(ctypes.c_char.from_buffer(page)))
  fn.page = page                     # the code lives as long as the callable
  return fn


def add_chain():
  """`_CHAIN` as a callable (`chain(loops)` runs `ADDS * loops` dependent adds and returns
  that count), or None where `_executable` is."""
  chain = _executable(_CHAIN)
  return chain if chain is not None and chain(3) == 3 * ADDS else None


def _fma_code(bits: int) -> bytes:
  """mov rcx, rdi; vxorps ymm0-13 (zeroes the zmm registers too); then `FMAS` x
  `vfmadd231ps {z,y}mm<i>, {z,y}mm12, {z,y}mm13` (i = 0..FMAS-1: independent, more than an FMA's
  latency x pipes); dec rcx; jnz back to the FMAs; vzeroupper; mov rax, rdi; ret."""
  zero = b"".join(bytes([0xc5, 0xfc - 8 * i, 0x57, 0xc0 + 9 * i]) if i < 8 else
                  bytes([0xc4, 0x41, 0x3c - 8 * (i - 8), 0x57, 0xc0 + 9 * (i - 8)])
                  for i in range(14))
  evex, vex = bits == 512, bits == 256
  assert evex or vex, bits
  prefix = ((b"\x62\xd2\x1d\x48", b"\x62\x52\x1d\x48") if evex
            else (b"\xc4\xc2\x1d", b"\xc4\x42\x1d"))
  body = b"".join(prefix[i >= 8] + bytes([0xb8, 0xc5 + 8 * (i % 8)]) for i in range(FMAS))
  return (bytes.fromhex("4889f9") + zero + body + bytes.fromhex("48ffc9")
          + bytes([0x75, -(len(body) + 5) & 0xFF]) + bytes.fromhex("c5f877" "4889f8" "c3"))


def fma_bits(flags: set) -> int | None:
  """The widest fp32 FMA this CPU runs: 512 (AVX-512F), 256 (FMA), or None."""
  if "avx512f" in flags:
    return 512
  if {"fma", "avx"} <= flags:
    return 256
  return None


def measured_flop_per_cycle(flags: set, seconds: float = 0.1) -> int | None:
  """fp32 FLOP per cycle per core, measured on one thread (see the module docstring); None
  where there is no FMA, the probes cannot run, or the reading is not a CPU's (under 0.75
  FMAs per cycle: every FMA core retires one or more)."""
  bits = fma_bits(flags)
  chain = add_chain()
  fmas = _executable(_fma_code(bits)) if bits and chain is not None else None
  if fmas is None:
    return None

  def rate(fn, per_loop):           # the best of 3 runs of about `seconds` of CPU time each
    start = time.thread_time()
    fn(100_000)
    loops = max(1, int(seconds / max(time.thread_time() - start, 1e-6) * 100_000))
    best = 0.0
    for _ in range(3):
      start = time.thread_time()
      fn(loops)
      best = max(best, per_loop * loops / max(time.thread_time() - start, 1e-9))
    return best

  per_cycle = rate(fmas, FMAS) / rate(chain, ADDS)
  return 2 * (bits // 32) * round(per_cycle) if per_cycle >= 0.75 else None


def measured_mhz(cores: int, seconds: float = 0.5) -> float | None:
  """The clock (MHz) `cores` threads run at, each timing its own chain of dependent adds in
  its own CPU time, all at once (the rate all cores keep together; time another process
  takes from a core is not counted against its clock); the mean over threads. None where
  `add_chain` is."""
  chain = add_chain()
  if chain is None:
    return None
  start = time.perf_counter()
  chain(1_000_000)
  loops = max(1, int(seconds / (time.perf_counter() - start) * 1_000_000))
  rates = []

  def run():                         # ctypes releases the GIL: the threads run in parallel
    start = time.thread_time()
    chain(loops)
    rates.append(ADDS * loops / max(time.thread_time() - start, 1e-9) / 1e6)

  threads = [threading.Thread(target=run) for _ in range(cores)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  return sum(rates) / len(rates)


def describe(matmuls: bool = True) -> dict:
  """The machine, for a benchmark's JSON; `matmuls=False` leaves out where our float32
  matmuls run (it loads JAX: `experiments.bench` takes it from its parts' processes)."""
  info = host.cpuinfo()
  vendor = info.get("vendor_id", "unknown")
  flags = set(info.get("flags", "").split())
  cores = len(os.sched_getaffinity(0))
  nominal = float(info["cpu MHz"]) if "cpu MHz" in info else None
  measured = measured_mhz(cores)
  mhz = measured or nominal
  family = info.get("cpu family")
  measured_per_cycle = measured_flop_per_cycle(flags)
  per_cycle = measured_per_cycle or flop_per_cycle(
      vendor, flags, int(family) if family and family.isdigit() else None)
  wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16",
            "amx_int8")
  return {
      "cpu": {"vendor": vendor, "model_name": info.get("model name"),
              "family": family, "model": info.get("model"),
              "flags": sorted(flags & set(wanted)), "cores": cores, "mhz": mhz,
              "clock": "measured" if measured else "nominal", "nominal_mhz": nominal,
              "fp32_flop_per_cycle": per_cycle,
              "fp32_flop_per_cycle_source": "measured" if measured_per_cycle else "table",
              "fp32_peak_gflops": cores * mhz * per_cycle / 1e3 if mhz else None},
      "versions": {p: _version(p) for p in ("jax", "jaxlib", "torch", "transformers",
                                            "onnxruntime", "mkl")},
      "jax_float32_matmuls": _matmuls() if matmuls else None,
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),   # drivlm_jax.host's restart
  }


def _matmuls() -> str:
  """Where our layers' large float32 matmuls run in this process: "MKL" (drivlm_jax's
  `cpu_gemm`, on a single-device Intel CPU) or "XLA", and where a deployed student's constant
  weights go to `cpu_gemm`'s packed kernel without MKL (auto on AMD's AVX-512 CPUs), "XLA
  (constant weights packed)"."""
  from drivlm_jax.model import cpu_gemm  # pylint: disable=import-outside-toplevel
  try:
    if cpu_gemm.active():
      return "MKL"
    return "XLA (constant weights packed)" if cpu_gemm.packs() else "XLA"
  except cpu_gemm.Unavailable:   # DRIVLM_CPU_GEMM=mkl where it cannot run: traces will say so
    return "XLA"


def _mhz(value) -> str:
  return f"{value:.0f} MHz" if value else "? MHz"


def line(machine: dict) -> str:
  """One line naming the machine, for a benchmark's output and the README's tables."""
  cpu = machine["cpu"]
  peak = cpu["fp32_peak_gflops"]
  clock = f"{_mhz(cpu['mhz'])} {cpu['clock']}"
  if cpu["clock"] == "measured":
    clock += f" ({_mhz(cpu['nominal_mhz'])} nominal)"
  return (f"{cpu['vendor']} {cpu['model_name']} (family {cpu['family']} model {cpu['model']}), "
          f"{cpu['cores']} cores at {clock}, {'/'.join(cpu['flags']) or 'no AVX'}, fp32 peak "
          f"{f'{peak:.0f} GFLOP/s' if peak else 'unknown'} ({cpu['fp32_flop_per_cycle']} "
          f"FLOP/cycle, {cpu.get('fp32_flop_per_cycle_source', 'table')}); "
          + ", ".join(f"{k} {v}" for k, v in machine["versions"].items() if v)
          + (f"; float32 matmuls on {kernels}"
             if (kernels := machine.get("jax_float32_matmuls")) else "")
          + (f"; GPU {gpu['torch_device']}" if (gpu := machine.get("accelerator")) else ""))


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
