"""The machine a latency or throughput figure was measured on.

Latency depends on the CPU: int8 kernels gain most with AVX-512 VNNI (x86) or the dot
product instructions (ARM), and XLA:CPU may be capped below what the CPU has by
``XLA_FLAGS=--xla_cpu_max_isa=...``. Every figure kd_jax reports carries `describe()`.
"""
from __future__ import annotations

import os
import platform
import re


def parse_cpuinfo(text: str) -> dict[str, str]:
  """The first processor's fields of a /proc/cpuinfo text, keys lower-cased.

  On ARM the CPU-wide fields (``Hardware``, ``Model``) follow the processor blocks;
  they are kept too.
  """
  fields = {}
  for block in reversed(text.split("\n\n")):  # the first processor's block wins
    for line in block.splitlines():
      key, sep, value = line.partition(":")
      if sep:
        fields[key.strip().lower()] = value.strip()
  return fields


def _cpuinfo() -> dict[str, str]:
  """`parse_cpuinfo` of /proc/cpuinfo, or on macOS the sysctl equivalents (empty
  where neither exists)."""
  try:
    with open("/proc/cpuinfo") as f:
      return parse_cpuinfo(f.read())
  except OSError:
    pass
  if platform.system() == "Darwin":
    import subprocess  # pylint: disable=g-import-not-at-top

    def sysctl(name):
      done = subprocess.run(["sysctl", "-n", name], capture_output=True, text=True)
      return done.stdout.strip() if done.returncode == 0 else ""
    flags = "asimd asimddp" if sysctl("hw.optional.arm.FEAT_DotProd") == "1" else ""
    x86 = sysctl("machdep.cpu.features") + " " + sysctl("machdep.cpu.leaf7_features")
    return {"model name": sysctl("machdep.cpu.brand_string"),
            "flags": (flags + " " + x86.lower().replace(".", "_")).strip()}
  return {}


def isa_level(flags: set[str], arch: str) -> str:
  """The widest vector level relevant to kd_jax's kernels, from CPU feature flags.

  x86: ``AVX-512+VNNI+AMX`` (AMX int8 tiles beside VNNI), ``AVX-512+VNNI``,
  ``AVX-512``, ``AVX2+VNNI`` (AVX-VNNI without AVX-512), ``AVX2``, else ``SSE``; ARM:
  ``ARM dotprod`` (``asimddp``) or ``ARM NEON``. VNNI, AMX and dotprod are the int8
  dot-product instructions that make int8 inference pay.
  """
  if arch in ("aarch64", "arm64"):
    return "ARM dotprod" if "asimddp" in flags else "ARM NEON"
  if "avx512f" in flags:
    if "avx512_vnni" not in flags:
      return "AVX-512"
    return "AVX-512+VNNI+AMX" if "amx_int8" in flags else "AVX-512+VNNI"
  if "avx2" in flags:
    return "AVX2+VNNI" if "avx_vnni" in flags else "AVX2"
  return "SSE"


def xla_isa_cap() -> str | None:
  """The ``--xla_cpu_max_isa`` value of ``XLA_FLAGS``, if set."""
  found = re.search(r"--xla_cpu_max_isa=(\S+)", os.environ.get("XLA_FLAGS", ""))
  return found.group(1) if found else None


def cpu(threads: int | None = None, cpuinfo: str | None = None) -> dict[str, object]:
  """What a latency was measured on: ``dict(cpu=model name, isa=ISA level (and
  XLA's cap, if any), threads=thread count)``.

  Args:
    threads: the threads the measurement used; defaults to the CPUs this process may
      run on.
    cpuinfo: a /proc/cpuinfo text to read instead of this machine's (for tests).
  """
  info = parse_cpuinfo(cpuinfo) if cpuinfo is not None else _cpuinfo()
  arch = platform.machine().lower()
  board = info.get("model", "")  # ARM boards name themselves here; x86 puts a number
  model = (info.get("model name") or (board if not board.isdigit() else "")
           or info.get("hardware") or platform.processor() or arch or "unknown CPU")
  flags = set((info.get("flags") or info.get("features") or "").split())
  level = isa_level(flags, arch) if flags else (
      "ARM" if arch in ("aarch64", "arm64") else "unknown ISA")
  cap = xla_isa_cap()
  if cap:
    level += f", XLA capped at {cap}"
  if threads is None:
    threads = (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
               else os.cpu_count())
  return {"cpu": model, "isa": level, "threads": int(threads)}


def describe(threads: int | None = None) -> str:
  """One line: CPU model, ISA level (and XLA's cap, if any), thread count (see `cpu`)."""
  c = cpu(threads)
  return f"{c['cpu']} ({c['isa']}), {c['threads']} thread{'s' if c['threads'] != 1 else ''}"


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
