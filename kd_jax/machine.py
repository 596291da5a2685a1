"""The machine a latency or throughput figure was measured on.

Latency depends on the CPU: int8 kernels gain most with AVX-512 VNNI (x86) or the dot
product instructions (ARM), and XLA:CPU may be capped below what the CPU has by
``XLA_FLAGS=--xla_cpu_max_isa=...``. Every figure kd_jax reports carries `describe()`.
"""
from __future__ import annotations

import os
import platform
import re


def _cpuinfo() -> dict[str, str]:
  """The first processor's fields of /proc/cpuinfo (empty where there is none)."""
  try:
    with open("/proc/cpuinfo") as f:
      text = f.read().split("\n\n")[0]
  except OSError:
    return {}
  fields = {}
  for line in text.splitlines():
    key, sep, value = line.partition(":")
    if sep:
      fields[key.strip().lower()] = value.strip()
  return fields


def isa_level(flags: set[str], arch: str) -> str:
  """The widest vector level relevant to kd_jax's kernels, from CPU feature flags.

  x86: ``AVX-512+VNNI``, ``AVX-512``, ``AVX2``, else ``SSE``; ARM: ``ARM dotprod``
  (``asimddp``) or ``ARM NEON``.
  """
  if arch in ("aarch64", "arm64"):
    return "ARM dotprod" if "asimddp" in flags else "ARM NEON"
  if "avx512f" in flags:
    return "AVX-512+VNNI" if "avx512_vnni" in flags else "AVX-512"
  return "AVX2" if "avx2" in flags else "SSE"


def xla_isa_cap() -> str | None:
  """The ``--xla_cpu_max_isa`` value of ``XLA_FLAGS``, if set."""
  found = re.search(r"--xla_cpu_max_isa=(\S+)", os.environ.get("XLA_FLAGS", ""))
  return found.group(1) if found else None


def describe(threads: int | None = None) -> str:
  """One line: CPU model, ISA level (and XLA's cap, if any), thread count.

  Args:
    threads: the threads the measurement used; defaults to the CPUs this process may
      run on.
  """
  info = _cpuinfo()
  arch = platform.machine().lower()
  model = (info.get("model name") or info.get("hardware") or platform.processor()
           or arch or "unknown CPU")
  flags = set((info.get("flags") or info.get("features") or "").split())
  level = isa_level(flags, arch) if flags else (
      "ARM" if arch in ("aarch64", "arm64") else "unknown ISA")
  cap = xla_isa_cap()
  if cap:
    level += f", XLA capped at {cap}"
  if threads is None:
    threads = (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
               else os.cpu_count())
  return f"{model} ({level}), {threads} thread{'s' if threads != 1 else ''}"


def stamp() -> dict[str, str]:
  """What a measurement ran on: JAX and jaxlib versions, the accelerator, the host CPU
  (`describe()`), the XLA flags and the UTC date."""
  import datetime
  import jax
  import jaxlib
  return {"jax": jax.__version__, "jaxlib": jaxlib.__version__,
          "device": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
          "host": describe(), "xla_flags": os.environ.get("XLA_FLAGS", ""),
          "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def write_results(directory: str, name: str, rows, markdown: str) -> tuple[str, str]:
  """Writes `<directory>/<name>.json` (the stamp and the rows) and `<name>.md` (the
  table, then the stamp); returns both paths."""
  import json
  os.makedirs(directory, exist_ok=True)
  info = stamp()
  base = os.path.join(directory, name)
  with open(base + ".json", "w") as f:
    json.dump({**info, "rows": rows}, f, indent=1)
  with open(base + ".md", "w") as f:
    f.write(markdown.rstrip("\n") + "\n\n" + "; ".join(f"{k}: {v}" for k, v in info.items()
                                                       if v) + "\n")
  return base + ".json", base + ".md"
