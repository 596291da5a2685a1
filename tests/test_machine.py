"""`kd_jax.machine`: the CPU line every latency and throughput figure carries."""
from kd_jax import machine


def test_isa_level_from_cpu_flags():
  assert machine.isa_level({"avx2", "avx512f", "avx512_vnni"}, "x86_64") == "AVX-512+VNNI"
  assert machine.isa_level({"avx2", "avx512f"}, "x86_64") == "AVX-512"
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
