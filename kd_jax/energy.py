"""Energy per inference of a TFLite model: measured where the host exposes it, else estimated.

Measured: Linux powercap RAPL (``/sys/class/powercap/intel-rapl:<n>/energy_uj``, one
counter per CPU package, also on AMD CPUs since Linux 5.8) read around a loop of
invokes; the counter covers the whole package, so other work on the host is in it.
Most hosts hide it (root-only since 2020) or lack it (VMs, ARM).

Estimated: from what the model's TFLite graph does per inference, with per-operation
energies of a 45 nm process at 0.9 V (M. Horowitz, "Computing's Energy Problem (and
what we can do about it)", ISSCC 2014; the 32-bit memory figures as tabulated from it
by Han et al., "EIE", ISCA 2016):

  int8 multiply 0.2 pJ, int32 add 0.1 pJ     -> int8 MAC (int32 accumulator) 0.3 pJ
  fp32 multiply 3.7 pJ, fp32 add 0.9 pJ      -> fp32 MAC 4.6 pJ
  32-bit SRAM read 5 pJ (1.25 pJ/byte), 32-bit DRAM read 640 pJ (160 pJ/byte)

over the multiply-accumulates of every convolution and fully connected layer (in int8
when its weights are int8: full-int8 and dynamic-range models; fp16 weights are
dequantised to fp32 before use), the bytes of every activation tensor written once and
read by each consumer, and the constant (weight) bytes read once. A target profile
says where the weights come from: ``45nm_dram_weights`` (default: from DRAM every
inference, a model larger than the caches or a cold start) or ``45nm_sram`` (weights
resident in on-chip SRAM). Element-wise work (additions, pooling) is left out, as in
MAC counts. Every figure is labelled ``measured`` or ``estimated``.
"""
from __future__ import annotations

import glob
import os
import time
from typing import Callable, Optional

import numpy as np
from ai_edge_litert import schema_py_generated as tflite_schema

RAPL_ROOT = "/sys/class/powercap"
# pJ per operation / per byte (see the module docstring).
MAC_PJ = {"int8": 0.2 + 0.1, "fp32": 3.7 + 0.9}
SRAM_PJ_PER_BYTE = 5.0 / 4
DRAM_PJ_PER_BYTE = 640.0 / 4
PROFILES = {"45nm_dram_weights": DRAM_PJ_PER_BYTE, "45nm_sram": SRAM_PJ_PER_BYTE}

_BYTES = {tflite_schema.TensorType.FLOAT32: 4, tflite_schema.TensorType.FLOAT16: 2,
          tflite_schema.TensorType.INT32: 4, tflite_schema.TensorType.INT64: 8,
          tflite_schema.TensorType.INT8: 1, tflite_schema.TensorType.UINT8: 1,
          tflite_schema.TensorType.INT16: 2, tflite_schema.TensorType.BOOL: 1}
_OPS = tflite_schema.BuiltinOperator


def rapl_domains(root: str = RAPL_ROOT) -> list[str]:
  """The readable package-level RAPL counters (``intel-rapl:<n>``, not sub-zones)."""
  found = []
  for folder in sorted(glob.glob(os.path.join(root, "intel-rapl:*"))):
    if os.path.basename(folder).count(":") != 1:
      continue
    path = os.path.join(folder, "energy_uj")
    try:
      with open(path) as f:
        int(f.read())
    except (OSError, ValueError):
      continue
    found.append(folder)
  return found


def _read_uj(folder: str) -> tuple[int, int]:
  """(energy_uj, max_energy_range_uj) of one RAPL domain."""
  with open(os.path.join(folder, "energy_uj")) as f:
    energy = int(f.read())
  try:
    with open(os.path.join(folder, "max_energy_range_uj")) as f:
      wrap = int(f.read())
  except (OSError, ValueError):
    wrap = 2 ** 32
  return energy, wrap


def rapl_delta_uj(before: int, after: int, wrap: int) -> int:
  """Microjoules between two counter readings; the counter wraps at `wrap`."""
  return after - before if after >= before else after + wrap - before


def measure_uj(run: Callable[[], None], min_seconds: float = 0.3,
               root: str = RAPL_ROOT) -> Optional[dict]:
  """Package energy per call of `run`, from RAPL, or None where it cannot be read.

  `run` is called until `min_seconds` have passed (the counters update about every
  millisecond), between two readings of every package counter.
  """
  domains = rapl_domains(root)
  if not domains:
    return None
  before = [_read_uj(d) for d in domains]
  calls, start = 0, time.perf_counter()
  while calls < 1 or time.perf_counter() - start < min_seconds:
    run()
    calls += 1
  after = [_read_uj(d) for d in domains]
  total = sum(rapl_delta_uj(b[0], a[0], b[1]) for b, a in zip(before, after))
  return {"uj": total / calls, "kind": "measured",
          "basis": f"RAPL {', '.join(os.path.basename(d) for d in domains)} (whole package)",
          "detail": f"{total:,} µJ over {calls} calls"}


def _nbytes(tensor) -> int:
  return int(np.prod(tensor.shape)) * _BYTES.get(tensor.type, 4)


def _graph_ops(model, graph):
  """The ops of one subgraph as (builtin, activation inputs, weight inputs, outputs),
  tensor indices each. A constant's DEQUANTIZE (fp16 weights: the runtime dequantises
  them once, before the first inference, and every inference reads the float32 copy)
  is not an op of the inference: its output counts as a weight where it is read."""
  buffers = model.buffers

  def constant(i):
    buffer = buffers[graph.tensors[i].buffer]
    return buffer.data is not None and len(buffer.data) > 0 or buffer.size

  dequantized = set()
  for op in graph.operators or ():
    code = model.operatorCodes[op.opcodeIndex]
    builtin = max(code.builtinCode, code.deprecatedBuiltinCode)
    inputs = [i for i in op.inputs if i >= 0]
    if builtin == _OPS.DEQUANTIZE and constant(inputs[0]):
      dequantized.update(op.outputs)
      continue
    weights = [i for i in inputs if constant(i) or i in dequantized]
    yield (builtin, [i for i in inputs if i not in weights], weights, list(op.outputs),
           inputs)


def graph_costs(tflite_model: bytes) -> dict[str, int]:
  """Per-inference work of a TFLite graph: ``macs_int8``, ``macs_fp32`` (convolutions
  and fully connected layers), ``activation_bytes`` (each non-constant tensor written
  once and read by each consumer) and ``weight_bytes`` (constant tensors, once)."""
  model = tflite_schema.ModelT.InitFromPackedBuf(bytearray(tflite_model), 0)
  costs = dict(macs_int8=0, macs_fp32=0, activation_bytes=0, weight_bytes=0)
  for graph in model.subgraphs or ():
    tensors, weights = graph.tensors, set()
    for builtin, activations, op_weights, outputs, inputs in _graph_ops(model, graph):
      weights.update(op_weights)
      costs["activation_bytes"] += sum(_nbytes(tensors[i]) for i in activations + outputs)
      if builtin in (_OPS.CONV_2D, _OPS.DEPTHWISE_CONV_2D, _OPS.FULLY_CONNECTED):
        out = int(np.prod(tensors[outputs[0]].shape))
        kernel = tensors[inputs[1]].shape
        if builtin == _OPS.CONV_2D:  # kernel [O, kh, kw, I]
          per_output = int(np.prod(kernel[1:]))
        elif builtin == _OPS.DEPTHWISE_CONV_2D:  # kernel [1, kh, kw, O]
          per_output = int(kernel[1] * kernel[2])
        else:  # FULLY_CONNECTED, kernel [O, I]
          per_output = int(kernel[-1])
        int8 = tensors[inputs[1]].type == tflite_schema.TensorType.INT8
        costs["macs_int8" if int8 else "macs_fp32"] += out * per_output
    costs["weight_bytes"] += sum(_nbytes(tensors[i]) for i in weights)
  return costs


def activation_arena_bytes(tflite_model: bytes) -> int:
  """The largest total of activation tensors alive at once, in the graph's op order.

  A tensor (graph input, or an op's output; not a constant, nor the float copy of a
  constant the runtime dequantises once) lives from the op that writes it (the start
  for graph inputs) to the last op that reads it (the end for graph outputs); the
  figure is max over ops of the bytes alive there. It is what an arena planner such as
  TFLite Micro's needs at least for one inference (a planner may add alignment and
  fragmentation; in-place ops may need less), independent of the host's runtime.
  """
  model = tflite_schema.ModelT.InitFromPackedBuf(bytearray(tflite_model), 0)
  peak = 0
  for graph in model.subgraphs or ():
    start = {i: 0 for i in graph.inputs}
    end = dict(start)
    steps = 0
    for k, (_, activations, _, outputs, _) in enumerate(_graph_ops(model, graph)):
      for i in activations + outputs:
        start.setdefault(i, k)
        end[i] = k
      steps = k + 1
    for i in graph.outputs:
      end[i] = max(steps - 1, 0)
    size = {i: _nbytes(graph.tensors[i]) for i in start}
    for k in range(max(steps, 1)):
      peak = max(peak, sum(size[i] for i in start if start[i] <= k <= end[i]))
  return peak


def estimate_uj(costs: dict[str, int], profile: str = "45nm_dram_weights") -> dict:
  """Energy per inference from `graph_costs`, in microjoules, on a target `profile`."""
  if profile not in PROFILES:
    raise ValueError(f"energy profile {profile!r} is unknown; use one of "
                     f"{', '.join(PROFILES)}")
  pj = (costs["macs_int8"] * MAC_PJ["int8"] + costs["macs_fp32"] * MAC_PJ["fp32"]
        + costs["activation_bytes"] * SRAM_PJ_PER_BYTE
        + costs["weight_bytes"] * PROFILES[profile])
  return {"uj": pj * 1e-6, "kind": "estimated",
          "basis": f"{profile} profile (Horowitz, ISSCC 2014)",
          "detail": f"{costs['macs_int8']:,} int8 + {costs['macs_fp32']:,} fp32 MACs, "
                    f"{costs['activation_bytes']:,} B activations, "
                    f"{costs['weight_bytes']:,} B weights"}


def per_inference(tflite_model: bytes, run: Callable[[], None],
                  profile: str = "45nm_dram_weights", root: str = RAPL_ROOT) -> dict:
  """``dict(uj, kind, basis, detail)``: RAPL-measured energy per call of `run` where
  readable, else the estimate of `tflite_model` on `profile`; `kind` is 'measured' or
  'estimated', `basis` says how (counters or profile), `detail` the figures used."""
  return measure_uj(run, root=root) or estimate_uj(graph_costs(tflite_model), profile)
