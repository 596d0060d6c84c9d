import os
import pathlib

from drivlm_jax import host

os.environ.setdefault("JAX_NUM_CPU_DEVICES", "8")
# One persistent XLA compilation cache for the whole suite: both xdist workers and the CLI
# runs the tests start (they inherit the environment) compile a program the others already
# compiled (the small demo config's step, evaluation, generation) once. Executables are
# keyed by the program, devices and flags, so a hit runs exactly what a fresh compile would.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      str(pathlib.Path(__file__).resolve().parents[1] / ".pytest_xla_cache"))

# Every compile goes to that cache, not only those over a second: most of the suite's
# programs are small, and the CLI runs of one test file repeat them.
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

# The suite compiles far more than it runs (a few steps of tiny models), so XLA's backend
# compiles without LLVM's optimisation passes and with the classic loop emitters instead of
# the fusion emitters. On a 2-core CPU a random init compiles in 4 s instead of 9 s, and a
# 30-step DriVLM-teacher CLI run (cold cache) takes 30 s instead of 36-41 s. Only code
# generation changes, not the HLO programs the tests check.
_FAST_COMPILE = ["--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true"]
# jaxlib 0.11 dropped the emitter flag (checked with 0.11.2), and XLA exits on a flag it does
# not know (status 1, "Unknown flag in XLA_FLAGS") before pytest prints a line.
if host.jaxlib_version() < (0, 11):
  _FAST_COMPILE.append("--xla_cpu_use_fusion_emitters=false")
os.environ["XLA_FLAGS"] = " ".join((os.environ.get("XLA_FLAGS", ""), *_FAST_COMPILE)).strip()

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

# The longest files start first, so the two workers of `make test` (pytest-xdist, a file per
# worker at a time, in this order with --no-loadscope-reorder) finish together instead of one
# running a long file alone at the end.
_LONG_FIRST = ("test_demo.py", "test_bucket.py", "test_train.py", "test_pretrained.py",
               "test_multicamera.py", "test_sweep.py", "test_multihost.py")


def pytest_collection_modifyitems(items):
  rank = lambda item: (_LONG_FIRST.index(item.path.name) if item.path.name in _LONG_FIRST
                       else len(_LONG_FIRST))
  items.sort(key=rank)   # stable: the order within each file is kept
