"""experiments.machine: the measured clock against the kernel's own figure, and the busy
threads it counts against threads we start ourselves."""
import platform
import threading

import pytest

from drivlm_jax import host
from experiments import machine

x86 = pytest.mark.skipif(platform.machine() != "x86_64", reason="the clock probe is x86-64 code")


@x86
def test_the_measured_clock_is_the_kernels_within_turbo_and_throttling():
  nominal = float(host.cpuinfo()["cpu MHz"])
  mhz = machine.measured_mhz(1, seconds=0.2)
  assert 0.5 * nominal < mhz < 2.5 * nominal
  where = machine.describe()
  cpu = where["cpu"]
  assert cpu["nominal_mhz"] == nominal
  assert cpu["fp32_peak_gflops"] == pytest.approx(
      cpu["cores"] * cpu["mhz"] * cpu["fp32_flop_per_cycle"] / 1e3)
  assert f"{cpu['mhz']:.0f} MHz measured" in machine.line(where)
  # the suite's 8 CPU devices keep XLA's dots (cpu_gemm's auto mode is single-device only)
  assert where["jax_float32_matmuls"] == "XLA" and machine.line(where).endswith("on XLA")


@x86
def test_the_measured_flop_per_cycle_is_the_vendors_figure():
  """The FMA probe against the vendors' published FMA widths x pipes, on the CPUs these
  machines come with: Intel's AMX server cores (Sapphire Rapids on: two 512-bit FMA pipes)
  and AMD's Zen 4 and Zen 5 EPYC. A wrong instruction encoding or timing shows up as another
  figure."""
  info = host.cpuinfo()
  vendor, family = info.get("vendor_id"), int(info.get("cpu family", 0))
  flags = set(info.get("flags", "").split())
  amd_epyc = (vendor == "AuthenticAMD" and family in (25, 26)
              and "EPYC" in info.get("model name", ""))
  server = amd_epyc or (vendor == "GenuineIntel" and "amx_tile" in flags)
  if not server or machine.fma_bits(flags) is None:
    pytest.skip(f"no published figure here: {info.get('model name')} (family {family})")
  assert machine.measured_flop_per_cycle(flags) == machine.flop_per_cycle(vendor, flags, family)
  assert machine.describe(matmuls=False)["cpu"]["fp32_flop_per_cycle_source"] == "measured"


class Pool:
  """`size` threads that live until closed (as XLA's and OpenMP's pools do), each running the
  clock probe's chain of adds once per `run()`."""

  def __init__(self, size):
    self.chain = machine.add_chain()
    self.go = [threading.Event() for _ in range(size)]
    self.done = [threading.Event() for _ in range(size)]
    self.stop = False
    self.threads = [threading.Thread(target=self._loop, args=(i,)) for i in range(size)]
    for t in self.threads:
      t.start()

  def _loop(self, i):
    while self.go[i].wait() and not self.stop:
      self.go[i].clear()
      self.chain(100_000_000)                    # 1.6e9 cycles: about 0.5 s
      self.done[i].set()

  def run(self, workers):
    for i in range(workers):
      self.done[i].clear()
      self.go[i].set()
    for i in range(workers):
      self.done[i].wait()

  def close(self):
    self.stop = True
    for event in self.go:
      event.set()
    for t in self.threads:
      t.join()


@x86
def test_busy_threads_counts_the_threads_that_worked():
  pool = Pool(3)
  try:
    assert machine.busy_threads(lambda: pool.run(1)) == 1
    assert machine.busy_threads(lambda: pool.run(2)) == 2
  finally:
    pool.close()
