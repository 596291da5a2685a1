"""`kd_jax.machine`: the CPU line every latency and throughput figure carries."""
from kd_jax import machine


def test_isa_level_from_cpu_flags():
  assert machine.isa_level({"avx2", "avx512f", "avx512_vnni"}, "x86_64") == "AVX-512+VNNI"
  assert machine.isa_level({"avx2", "avx512f"}, "x86_64") == "AVX-512"
  assert machine.isa_level({"avx2", "avx512f", "avx512_vnni", "amx_tile", "amx_int8"},
                           "x86_64") == "AVX-512+VNNI+AMX"
  assert machine.isa_level({"sse4_2", "avx", "avx2", "fma"}, "x86_64") == "AVX2"
  assert machine.isa_level({"sse4_2"}, "x86_64") == "SSE"
  assert machine.isa_level({"asimd", "asimddp"}, "aarch64") == "ARM dotprod"
  assert machine.isa_level({"asimd"}, "aarch64") == "ARM NEON"


def test_describe_names_model_isa_cap_and_threads(monkeypatch):
  monkeypatch.setattr(machine, "_cpuinfo", lambda: {
      "model name": "Example CPU 9000", "flags": "fpu sse4_2 avx avx2 fma"})
  monkeypatch.setattr(machine.platform, "machine", lambda: "x86_64")
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
  assert machine.describe(threads=2) == "Example CPU 9000 (AVX2), 2 threads"
  monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_max_isa=AVX2 --foo=1")
  assert machine.describe(threads=1) == "Example CPU 9000 (AVX2, XLA capped at AVX2), 1 thread"


# Two processors of an x86 host and the tail of an ARM board's /proc/cpuinfo, as the
# kernel prints them (fields abridged).
X86_CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
model\t\t: 17
model name\t: AMD EPYC 9R14 96-Core Processor
flags\t\t: fpu sse4_2 avx avx2 fma avx512f avx512bw avx512_vnni

processor\t: 1
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 9R14 96-Core Processor
flags\t\t: fpu sse4_2 avx avx2 fma avx512f avx512bw avx512_vnni
"""
ARM_CPUINFO = """processor\t: 0
BogoMIPS\t: 108.00
Features\t: fp asimd evtstrm crc32 cpuid asimdrdm lrcpc dcpop asimddp

processor\t: 1
BogoMIPS\t: 108.00
Features\t: fp asimd evtstrm crc32 cpuid asimdrdm lrcpc dcpop asimddp

Hardware\t: BCM2835
Model\t\t: Raspberry Pi 5 Model B Rev 1.0
"""


def test_cpu_from_a_cpuinfo_text(monkeypatch):
  monkeypatch.delenv("XLA_FLAGS", raising=False)
  monkeypatch.setattr(machine.platform, "machine", lambda: "x86_64")
  assert machine.cpu(threads=1, cpuinfo=X86_CPUINFO) == {
      "cpu": "AMD EPYC 9R14 96-Core Processor", "isa": "AVX-512+VNNI", "threads": 1}
  avx2 = X86_CPUINFO.replace(" avx512f avx512bw avx512_vnni", "")
  assert machine.cpu(threads=4, cpuinfo=avx2)["isa"] == "AVX2"
  assert machine.cpu(threads=4, cpuinfo=avx2.replace(" fma", " fma avx_vnni"))["isa"] == (
      "AVX2+VNNI")
  monkeypatch.setattr(machine.platform, "machine", lambda: "aarch64")
  assert machine.cpu(threads=2, cpuinfo=ARM_CPUINFO) == {
      "cpu": "Raspberry Pi 5 Model B Rev 1.0", "isa": "ARM dotprod", "threads": 2}
  assert machine.cpu(threads=2, cpuinfo=ARM_CPUINFO.replace(" asimddp", ""))["isa"] == (
      "ARM NEON")
  # describe() is the same figures on one line.
  monkeypatch.setattr(machine, "_cpuinfo", lambda: machine.parse_cpuinfo(ARM_CPUINFO))
  assert machine.describe(threads=2) == "Raspberry Pi 5 Model B Rev 1.0 (ARM dotprod), 2 threads"
