"""Process-wide runtime settings that must be made before JAX initialises.

XLA reads `XLA_FLAGS` once, when JAX starts its backends, so `kd-jax`, the tests and
the benchmarks call `configure_xla_flags()` before importing anything that starts JAX.
"""
from __future__ import annotations

import os

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
