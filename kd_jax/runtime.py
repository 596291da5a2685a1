"""Process-wide runtime settings that must be made before JAX initialises.

XLA reads `XLA_FLAGS` once, when JAX starts its backends, and glibc's allocator options
are best set before threads start, so `kd-jax`, the tests and the benchmarks call
`configure()` before importing anything that starts JAX.
"""
from __future__ import annotations

import ctypes
import os
import sys

# XLA:CPU sends convolutions through YNNPACK fusions by default. For training they were
# measured about 2x slower than XLA's own (Eigen) convolutions on a 2-core AVX-512 CPU
# (resnet32x4 -> resnet8x4 KD step, batch 64: 14-19 images/s against 33-35), mostly in
# the weight-gradient convolutions; keeping convolutions out of YNNPACK is the default.
# Also measured for that step and left off (no gain beyond the noise of a shared
# machine): YNNPACK/XNNPACK matmuls (`individual_dot`, only the classifier uses them),
# 512-bit vectors, fast math, oneDNN (`xla_cpu_use_onednn`: it leaves convolutions
# alone in this jaxlib) and two CPU devices for data parallelism over the two cores.
# YNNPACK's reduce and element-wise fusions stay on: taking them off (`-reduce,-eltwise`)
# took a vgg13 forward from 157 to 305-326 images/s but cost the resnet8x4 student step
# ~20%. The VGG gain came from one library fusion swallowing the whole network around
# its max pools, which the zoo now traces as element-wise maxima on the CPU instead
# (`kd_jax.models.layers.implementation`). `python benchmarks/step_throughput.py`
# measures the current choice.
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


# XLA:CPU allocates each execution's temporary buffer (179 MiB for the vgg13 ->
# MobileNetV2 KD step at batch 64) with malloc from its worker threads. glibc serves
# such a request with a fresh mmap and returns it with munmap, so every step paid
# ~46,700 page faults to touch the memory again. With one arena, no mmap and no
# trimming, freed buffers stay in the process heap and the next step reuses them:
# measured in alternating processes, the KD step went from 157-177 to 176-206 images/s
# and the MobileNetV2 student step from 379-427 to 508-621 (resnet32x4 -> resnet8x4:
# 40.6 -> 44.1, student 87 -> 107). The process keeps its peak heap instead of
# returning it to the system between steps.
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
