"""Process-wide runtime settings that must be made before JAX initialises.

XLA reads `XLA_FLAGS` once, when JAX starts its backends, and glibc's allocator options
are best set before threads start. Only the `kd-jax` command (`kd_jax.cli`) and the
scripts under `benchmarks/` call `configure()`; importing kd_jax changes nothing in the
host process, so a notebook or another program keeps its own settings (it may call
`configure()` itself, first thing).
"""
from __future__ import annotations

import ctypes
import os
import sys

# XLA:CPU sends convolutions through YNNPACK fusions by default; for training steps they
# were slower than XLA's own convolutions, mostly in the weight-gradient convolutions.
# The flag is plain XLA and valid on every CPU (x86 with or without AVX-512, ARM).
# `benchmarks/results/xla_flags.md` compares it with XLA's default on AVX-512 and AVX2:
# `python benchmarks/step_throughput.py` runs with it, and with
# `XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=+individual_convolution` without.
CPU_XLA_FLAGS = ("--xla_cpu_experimental_ynn_fusion_type=-individual_convolution",)


def configure_xla_flags() -> None:
  """Adds kd_jax's CPU XLA flags to XLA_FLAGS, except those the user already set.

  A flag given in the environment's XLA_FLAGS (by name, whatever its value) wins, so
  `XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=+individual_convolution` restores
  XLA's default path. GPU and TPU backends ignore these XLA:CPU flags.
  """
  flags = os.environ.get("XLA_FLAGS", "")
  for flag in CPU_XLA_FLAGS:
    if flag.split("=")[0] not in flags:
      flags = f"{flags} {flag}".strip()
  os.environ["XLA_FLAGS"] = flags


# XLA:CPU allocates each execution's temporary buffer (a KD step's is hundreds of MiB)
# with malloc from its worker threads. glibc serves such a request with a fresh mmap and
# returns it with munmap, so every step pays a page fault per 4 KiB to touch the memory
# again. With one arena, no mmap and no trimming, freed buffers stay in the process heap
# and the next step reuses them (tests/test_perf_options.py counts the page faults). The
# process keeps its peak heap instead of returning it to the system between steps.
_MALLOC_ENV = ("MALLOC_ARENA_MAX", "MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_")
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8


def configure_allocator() -> bool:
  """Makes glibc keep and reuse freed memory; returns whether it was changed.

  Left alone where the C library is not glibc, or where the environment already sets
  one of glibc's `MALLOC_ARENA_MAX`, `MALLOC_MMAP_MAX_`, `MALLOC_TRIM_THRESHOLD_`
  (the user's choice wins, as with `XLA_FLAGS`).
  """
  if not sys.platform.startswith("linux") or any(k in os.environ for k in _MALLOC_ENV):
    return False
  try:
    mallopt = ctypes.CDLL("libc.so.6").mallopt
  except (OSError, AttributeError):
    return False
  mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
  return all(mallopt(option, value) == 1 for option, value in (
      (_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1)))


def configure() -> None:
  """`configure_xla_flags()` and `configure_allocator()`: call before JAX starts."""
  configure_xla_flags()
  configure_allocator()
