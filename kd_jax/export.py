"""Export a Flax model to TFLite and measure it in the LiteRT interpreter.

The path, verified on jax 0.10 + tensorflow 2.21 + ai-edge-litert 2.3:

  model.apply(variables, x, train=False)[0]      (logits only, inference mode)
      -> jax2tf.convert (native serialization: StableHLO for the CPU platform)
      -> tf.function with a fixed input signature [batch_size, H, W, C] float32
      -> tf.lite.TFLiteConverter.from_concrete_functions, restricted to TFLITE_BUILTINS
      -> flatbuffer bytes, run with ``ai_edge_litert.interpreter.Interpreter``.

The converter legalises StableHLO to builtin TFLite ops and folds BatchNorm into the
convolutions. Conversion never falls back to SELECT_TF_OPS (Flex): a model that would
need them is rejected with a ``ValueError`` naming the ops, because Flex kernels are
not available in the edge runtimes this framework targets.

Quantisation variants (``to_tflite(quantization=...)``):

  fp32     no optimisation; logits match JAX to ~1e-7.
  fp16     float16 weights, dequantised to float32 for compute.
  dynamic  int8 weights, activations quantised on the fly (no calibration data).
  int8     full integer: int8 weights and activations (TFLITE_BUILTINS_INT8),
           calibrated on ``representative_images``. The model's input and output
           tensors stay float32: the converter adds one QUANTIZE op after the input
           and one DEQUANTIZE op before the output, so every variant is called the
           same way, with float images, and returns float logits. ``TFLiteModel``
           still handles models whose I/O tensors are int8/uint8 (made elsewhere).

TensorFlow is imported on first use only, with its logging quietened and its GPUs
hidden (so a GPU build of TF never grabs accelerator memory that JAX is using).
"""
import copy
import functools
import json
import os
import re
import time
import warnings
from typing import Any, Mapping

from ai_edge_litert import schema_py_generated as tflite_schema
from ai_edge_litert.interpreter import Interpreter
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from kd_jax import deploy
from kd_jax import energy as energy_lib
from kd_jax import files
from kd_jax import machine as machine_lib
from kd_jax import op_profile
from kd_jax.models import layers as zoo_layers

QUANTIZATIONS = ("fp32", "fp16", "dynamic", "int8")
# The `export` block of an experiment config: the TFLite variants of the distilled
# student, the calibration images of int8 and the timed single-image invokes.
DEFAULTS = dict(variants=("fp32", "int8"), num_calibration_images=256, latency_runs=50)


def default_config() -> ml_collections.ConfigDict:
  """The `export` block of an experiment config, at its defaults; `target` is the
  deployment budget the exported variants are checked against (`kd_jax.deploy`)."""
  config = ml_collections.ConfigDict(copy.deepcopy(DEFAULTS))
  config.target = deploy.default_target()
  return config


def check_config(export_config: Mapping[str, Any]) -> None:
  """One-line errors for an `export` block that cannot export."""
  unknown = [v for v in export_config["variants"] if v not in QUANTIZATIONS]
  if unknown:
    raise ValueError(f"export.variants names unknown quantizations {unknown}; use some "
                     f"of {', '.join(QUANTIZATIONS)}")
  for key in ("num_calibration_images", "latency_runs"):
    if export_config[key] < 1:
      raise ValueError(f"export.{key} must be at least 1, got {export_config[key]}")
  deploy.check_target(export_config["target"])

_BUILTIN_OP_NAMES = op_profile.BUILTIN_OP_NAMES  # {builtin code: TFLite op name}


@functools.cache
def _tensorflow():
  """Imports TensorFlow once, quiet and CPU-only."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  tf.get_logger().setLevel("ERROR")
  try:
    tf.config.set_visible_devices([], "GPU")
  except RuntimeError:  # TF's devices were already initialised by another user.
    pass
  return tf


def _example_shape(input_shape, batch_size):
  """Splits `input_shape` ((H, W, C) or (B, H, W, C)) into (batch, (H, W, C)).

  A batch of None stays None: the batch-polymorphic signature.
  """
  input_shape = tuple(input_shape)
  if len(input_shape) == 4:
    batch_size, input_shape = input_shape[0], input_shape[1:]
  if len(input_shape) != 3:
    raise ValueError(f"input_shape must be (H, W, C) or (B, H, W, C), got {input_shape}.")
  return (None if batch_size is None else int(batch_size)), tuple(int(d) for d in input_shape)


def logits_function(model, variables):
  """Inference logits of `model` in its export form (`models.export_form`: a RepVGG's
  fused 3x3 convs), traced with the ``lax`` ops (`models.portable`): TFLite gets
  DEPTHWISE_CONV_2D and MAX_POOL_2D."""
  model, variables = zoo_layers.export_form(model, variables)
  model = zoo_layers.portable(model)
  return lambda images: model.apply(variables, images, train=False)[0]


def _unsupported_ops(message, logits_fn, shape):
  """Names the ops a failed conversion could not express with TFLite builtins."""
  ops = re.findall(r"error: '([\w.]+)' op is (?:neither a custom op nor a flex op"
                   r"|not part of the vhlo support)", message)
  if "tf.XlaCallModule" in ops:
    # The whole StableHLO module failed to legalise; point at its usual culprits.
    from jax import export  # pylint: disable=g-import-not-at-top
    exported = export.export(jax.jit(logits_fn), platforms=("cpu",))(
        jax.ShapeDtypeStruct(shape, jnp.float32))
    text = exported.mlir_module()
    inner = re.findall(r"custom_call @([\w.]+)", text) + re.findall(r"\bchlo\.\w+", text)
    ops += [f"stablehlo.custom_call @{op}" if "." not in op else op for op in inner]
  return list(dict.fromkeys(ops))


def to_tflite(model, variables, input_shape, quantization="fp32",
              representative_images=None, batch_size=1):
  """Converts `model.apply(variables, x, train=False)` logits to a TFLite flatbuffer.

  Args:
    model: a Flax linen module returning `(logits, taps)`.
    variables: its variables, e.g. `{'params': ..., 'batch_stats': ...}`.
    input_shape: one example's shape (H, W, C); a 4-D (B, H, W, C) sets the batch too.
    quantization: one of 'fp32', 'fp16', 'dynamic', 'int8' (see module docstring).
    representative_images: float32 [N, H, W, C] calibration images; required for
      'int8' (ignored otherwise). Fed in batches of `batch_size`.
    batch_size: the batch dimension of the TFLite input tensor; None makes it
      polymorphic (the interpreter's input is resized to each call's batch).

  Returns:
    The TFLite model as bytes. Its input is float32 [batch, H, W, C] and its output
    float32 logits [batch, num_classes], for every quantization.

  Raises:
    ValueError: unknown quantization, 'int8' without calibration images, or a model
      that needs ops outside TFLITE_BUILTINS (the message names them).
  """
  return function_to_tflite(logits_function(model, variables), input_shape, quantization,
                            representative_images, batch_size)


def function_to_tflite(fn, input_shape, quantization="fp32", representative_images=None,
                       batch_size=1, activation_ranges=None):
  """Converts any JAX function of a float32 image batch to a TFLite flatbuffer.

  `fn(images) -> array` (or a tuple of arrays: one output tensor each) is traced once;
  only the ops its outputs depend on reach the flatbuffer, so a function that returns
  an intermediate feature exports just the layers up to it. Other arguments and errors
  are as for `to_tflite`, plus:

  activation_ranges: for 'int8', optional ``(probe_images, [(values, lo, hi), ...])``,
    e.g. a QAT model's learned ranges (`kd_jax.edge.quantize.export_ranges`). Each
    activation tensor of the calibrated graph whose values on `probe_images` equal
    ``c · values`` for one entry (a positive `c`: the converter may fold a constant
    factor, such as a mean's 1/N, into the next layer) is quantised over
    ``[c · lo, c · hi]`` instead of its calibrated range (`override_ranges`).
  """
  if quantization not in QUANTIZATIONS:
    raise ValueError(f"quantization must be one of {QUANTIZATIONS}, got {quantization!r}.")
  batch_size, example_shape = _example_shape(input_shape, batch_size)
  shape = (batch_size, *example_shape)
  calibration_batch = batch_size or 1
  if quantization == "int8":
    if representative_images is None or len(representative_images) < calibration_batch:
      raise ValueError("quantization='int8' needs representative_images: a float32 "
                       f"[N, {', '.join(map(str, example_shape))}] array with "
                       f"N >= {calibration_batch}.")
    representative_images = np.asarray(representative_images, np.float32)
    if representative_images.shape[1:] != example_shape:
      raise ValueError(f"representative_images have shape {representative_images.shape}, "
                       f"expected [N, {', '.join(map(str, example_shape))}].")

  tf = _tensorflow()
  from jax.experimental import jax2tf  # pylint: disable=g-import-not-at-top

  polymorphic = None if batch_size else [f"(b, {', '.join(map(str, example_shape))})"]
  serving_fn = tf.function(
      jax2tf.convert(fn, with_gradient=False, polymorphic_shapes=polymorphic,
                     native_serialization_platforms=("cpu",)),
      input_signature=[tf.TensorSpec(shape, tf.float32, name="images")],
      autograph=False)
  converter = tf.lite.TFLiteConverter.from_concrete_functions(
      [serving_fn.get_concrete_function()], serving_fn)
  converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
  if quantization != "fp32":
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
  if quantization == "fp16":
    converter.target_spec.supported_types = [tf.float16]
  if quantization == "int8":
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.representative_dataset = lambda: (
        [representative_images[i:i + calibration_batch]]
        for i in range(0, len(representative_images) - calibration_batch + 1,
                       calibration_batch))
  if quantization == "int8" and activation_ranges is not None:
    converter._experimental_calibrate_only = True  # pylint: disable=protected-access
  try:
    with warnings.catch_warnings():  # int8: the input stays float, by design.
      warnings.filterwarnings("ignore", "Statistics for quantized inputs")
      flatbuffer = converter.convert()
    if quantization == "int8" and activation_ranges is not None:
      calibrated, _ = override_ranges(flatbuffer, *activation_ranges)
      flatbuffer = _quantize_calibrated(calibrated)
    return flatbuffer
  except Exception as e:  # tf.lite's ConverterError is not public API.
    ops = _unsupported_ops(str(e), fn, (calibration_batch, *example_shape))
    if not ops:
      raise
    raise ValueError(f"TFLite {quantization} conversion needs ops outside TFLITE_BUILTINS "
                     f"(SELECT_TF_OPS/Flex is not allowed): {', '.join(ops)}") from e


def _quantize_calibrated(calibrated):
  """Full-int8 model (float input and output) from a calibrated float flatbuffer: the
  step `TFLiteConverter.convert` takes after calibration, whose public API offers no
  way to set a tensor's range."""
  from tensorflow.lite.python import convert  # pylint: disable=g-import-not-at-top
  return convert.mlir_quantize(calibrated)


def override_ranges(calibrated, probe_images, ranges, rtol=1e-3):
  """Replaces calibrated activation ranges by given ones, finding tensors by value.

  Args:
    calibrated: a float flatbuffer whose activation tensors carry calibrated min/max
      (``TFLiteConverter`` with ``_experimental_calibrate_only``).
    probe_images: float32 [N, H, W, C] images, run one at a time.
    ranges: ``[(values [N, ...], lo, hi), ...]``: a tensor's values on `probe_images`
      and the range to give it.
    rtol: a tensor matches an entry when ``max|t - c·values| <= rtol · max|t|`` for
      the least-squares factor ``c > 0``.

  Returns:
    ``(flatbuffer, matched)``: the calibrated model with the matched tensors' min/max
    replaced, and ``{tensor name: index into ranges}``.
  """
  import flatbuffers  # pylint: disable=g-import-not-at-top
  model = tflite_schema.ModelT.InitFromPackedBuf(bytearray(calibrated), 0)
  subgraph = model.subgraphs[0]  # the main graph; others (loop bodies) stay calibrated
  with warnings.catch_warnings():  # keeping every tensor is the point here
    warnings.filterwarnings("ignore", "Warning: Enabling `experimental_preserve_all")
    interpreter = Interpreter(model_content=bytes(calibrated),
                              experimental_preserve_all_tensors=True)
  (inputs,) = interpreter.get_input_details()
  if tuple(inputs["shape"][1:]) != tuple(np.shape(probe_images)[1:]):
    raise ValueError(f"probe_images have shape {np.shape(probe_images)}; the model takes "
                     f"{tuple(inputs['shape'])}")
  calibrated_tensors = [i for i, t in enumerate(subgraph.tensors)
                        if t.quantization is not None and t.quantization.min is not None
                        and t.type == tflite_schema.TensorType.FLOAT32]
  interpreter.allocate_tensors()
  probed = {i: [] for i in calibrated_tensors}
  for image in np.asarray(probe_images, np.float32):
    interpreter.set_tensor(inputs["index"], image[None].astype(np.float32))
    interpreter.invoke()
    for i in calibrated_tensors:
      probed[i].append(interpreter.get_tensor(i))
  matched = {}
  for i in calibrated_tensors:
    t = np.concatenate(probed[i]).astype(np.float64)
    for k, (values, lo, hi) in enumerate(ranges):
      values = np.asarray(values, np.float64)
      if values.shape != t.shape or not np.any(values):
        continue
      factor = float(np.sum(t * values) / np.sum(values * values))
      if factor > 0 and np.max(np.abs(t - factor * values)) <= rtol * np.max(np.abs(t)):
        quantization = subgraph.tensors[i].quantization
        quantization.min = np.array([factor * lo], np.float32)
        quantization.max = np.array([factor * hi], np.float32)
        matched[subgraph.tensors[i].name.decode()] = k
        break
  builder = flatbuffers.Builder(len(calibrated) + 1024)
  builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
  return bytes(builder.Output()), matched


def op_names(tflite_model):
  """Sorted names of the ops a TFLite flatbuffer uses.

  Builtin ops by their TFLite name ('CONV_2D', 'FULLY_CONNECTED', ...); custom ops by
  their custom code (a Flex op reads 'Flex<TfOpName>').
  """
  model = op_profile.read_model(tflite_model)
  names = {op_profile.op_name(model, operator)
           for subgraph in model.subgraphs or () for operator in subgraph.operators or ()}
  return sorted(names)


class TFLiteModel:
  """A TFLite classifier callable on float images: `logits = TFLiteModel(b)(images)`.

  Batches of any size are run in chunks of the model's fixed input batch (the last one
  zero-padded); a batch-polymorphic model is resized to chunks of `DYNAMIC_CHUNK`.
  Integer input/output tensors are (de)quantised with their own scales.
  """
  DYNAMIC_CHUNK = 64

  def __init__(self, tflite_model, num_threads=1):
    """`tflite_model`: flatbuffer bytes or a path to a .tflite file."""
    if not isinstance(tflite_model, (bytes, bytearray)):
      with open(tflite_model, "rb") as f:
        tflite_model = f.read()
    self._interpreter = Interpreter(model_content=bytes(tflite_model),
                                    num_threads=num_threads)
    self._interpreter.allocate_tensors()
    (self._input,) = self._interpreter.get_input_details()
    (self._output,) = self._interpreter.get_output_details()
    self.polymorphic = int(self._input["shape_signature"][0]) == -1

  @property
  def interpreter(self):
    """The underlying LiteRT `Interpreter` (allocated)."""
    return self._interpreter

  @property
  def input_shape(self):
    """The input tensor's current shape, (batch, H, W, C)."""
    return tuple(int(d) for d in self._input["shape"])

  def _resize(self, batch):
    if batch != self.input_shape[0]:
      self._interpreter.resize_tensor_input(self._input["index"],
                                            [batch, *self.input_shape[1:]])
      self._interpreter.allocate_tensors()
      (self._input,) = self._interpreter.get_input_details()
      (self._output,) = self._interpreter.get_output_details()

  def invoke(self, chunk):
    """Runs one input-batch-sized float32 chunk; returns float32 logits."""
    if self.polymorphic:
      self._resize(len(chunk))
    scale, zero_point = self._input["quantization"]
    if scale:
      info = np.iinfo(self._input["dtype"])
      chunk = np.clip(np.round(chunk / scale + zero_point), info.min, info.max)
    self._interpreter.set_tensor(self._input["index"], chunk.astype(self._input["dtype"]))
    self._interpreter.invoke()
    logits = self._interpreter.get_tensor(self._output["index"])
    scale, zero_point = self._output["quantization"]
    if scale:
      logits = (logits.astype(np.float32) - zero_point) * scale
    return logits.astype(np.float32)

  def __call__(self, images):
    images = np.asarray(images, np.float32)
    n = len(images)
    batch = min(n, self.DYNAMIC_CHUNK) if self.polymorphic else self.input_shape[0]
    padded = np.zeros((-(-n // batch) * batch, *images.shape[1:]), np.float32)
    padded[:n] = images
    return np.concatenate(
        [self.invoke(padded[i:i + batch]) for i in range(0, len(padded), batch)])[:n]


def _as_model(tflite_model, num_threads=1):
  if isinstance(tflite_model, TFLiteModel):
    return tflite_model
  return TFLiteModel(tflite_model, num_threads=num_threads)


def evaluate_tflite(tflite_model, batches):
  """Top-1 accuracy of a TFLite classifier over numpy batches.

  Args:
    tflite_model: a `TFLiteModel`, flatbuffer bytes or a .tflite path.
    batches: iterable of dicts with 'image' [b, H, W, C], 'label' [b] (class ids, or
      one-hot [b, K]) and optionally 'mask' [b]; rows with mask 0 (padding) are skipped.

  Returns:
    dict(accuracy=correct / counted (NaN when nothing was counted), num_examples=counted).
  """
  tflite_model = _as_model(tflite_model)
  correct = counted = 0
  for batch in batches:
    predictions = np.argmax(tflite_model(batch["image"]), axis=-1)
    labels = np.asarray(batch["label"])
    if labels.ndim == 2:
      labels = np.argmax(labels, axis=-1)
    mask = np.asarray(batch.get("mask", np.ones(len(labels))), bool)
    correct += int(np.sum((predictions == labels) & mask))
    counted += int(np.sum(mask))
  return dict(accuracy=correct / counted if counted else float("nan"),
              num_examples=counted)


def latency_ms(tflite_model, input_shape, runs=50, warmup=5, num_threads=1):
  """Wall time of one interpreter invoke on a single image, in milliseconds.

  Args:
    tflite_model: a `TFLiteModel` (used as is), flatbuffer bytes or a .tflite path.
    input_shape: one example's shape (H, W, C).
    runs: timed invokes; warmup: untimed invokes before them.
    num_threads: interpreter threads when `tflite_model` is not already a `TFLiteModel`.

  Returns:
    dict(median_ms=..., p90_ms=..., p99_ms=...): percentiles of the timed invokes
    (each one set_tensor + invoke + get_tensor, as `TFLiteModel.invoke` runs them).
  """
  tflite_model = _as_model(tflite_model, num_threads)
  batch = 1 if tflite_model.polymorphic else tflite_model.input_shape[0]
  image = np.random.default_rng(0).uniform(size=(batch, *input_shape[-3:]))
  image = image.astype(np.float32)
  for _ in range(warmup):
    tflite_model.invoke(image)
  times = []
  for _ in range(runs):
    start = time.perf_counter()
    tflite_model.invoke(image)
    times.append((time.perf_counter() - start) * 1e3)
  median, p90, p99 = np.percentile(times, [50, 90, 99])
  return dict(median_ms=float(median), p90_ms=float(p90), p99_ms=float(p99))


def init_ms(tflite_model, runs=5, num_threads=1):
  """Median wall time, in milliseconds, of making a ready interpreter from flatbuffer
  bytes: `Interpreter(model_content=...)` (which applies the XNNPACK delegate) and
  `allocate_tensors()`, over `runs` fresh interpreters."""
  times = []
  for _ in range(runs):
    start = time.perf_counter()
    interpreter = Interpreter(model_content=bytes(tflite_model), num_threads=num_threads)
    interpreter.allocate_tensors()
    times.append((time.perf_counter() - start) * 1e3)
    del interpreter
  return float(np.median(times))


# Run by `peak_memory` in a fresh interpreter process: the growth of its peak resident
# set (VmHWM, reset to the current RSS by writing 5 to /proc/self/clear_refs once the
# imports are done) while it loads the model, allocates its tensors and invokes once.
_PEAK_MEMORY_CHILD = """
import sys
import numpy as np
from ai_edge_litert.interpreter import Interpreter
def status(key):
  with open("/proc/self/status") as f:
    return next(int(l.split()[1]) * 1024 for l in f if l.startswith(key + ":"))
with open("/proc/self/clear_refs", "w") as f:
  f.write("5")
base = status("VmRSS")
interpreter = Interpreter(model_path=sys.argv[1], num_threads=1)
interpreter.allocate_tensors()
for d in interpreter.get_input_details():
  interpreter.set_tensor(d["index"], np.zeros(d["shape"], d["dtype"]))
interpreter.invoke()
print(status("VmHWM") - base)
"""
MEMORY_KIND = "peak RSS growth of a fresh process: load + allocate + 1 invoke, 1 thread"


def peak_memory(tflite_model):
  """Peak memory of running the model once, in bytes, and how it was measured.

  A fresh Python process (imports done, its peak resident set reset to its current
  one) loads the .tflite file, applies XNNPACK, allocates the tensors and invokes once
  at 1 thread; the figure is its peak RSS minus its RSS before loading: the model's
  weights as read (and XNNPACK's repacked copy), the activation arena and the
  runtime's scratch. Linux only (/proc): elsewhere, or when the child fails, returns
  ``dict(bytes=None, kind='not measured (<why>)')``.

  Returns:
    dict(bytes=..., kind=...).
  """
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  import tempfile  # pylint: disable=g-import-not-at-top
  if not os.path.exists("/proc/self/clear_refs"):
    return dict(bytes=None, kind="not measured (no /proc)")
  with tempfile.NamedTemporaryFile(suffix=".tflite") as f:
    f.write(bytes(tflite_model))
    f.flush()
    done = subprocess.run([sys.executable, "-c", _PEAK_MEMORY_CHILD, f.name],
                          capture_output=True, text=True,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
  if done.returncode != 0:  # e.g. a sandbox that forbids clear_refs
    reason = (done.stderr.strip().splitlines() or ["no output"])[-1]
    return dict(bytes=None, kind=f"not measured ({reason})")
  return dict(bytes=int(done.stdout.split()[-1]), kind=MEMORY_KIND)


def all_threads():
  """The thread count used for the 'all threads' latency: the host's CPU count."""
  return os.cpu_count() or 1


def measure(tflite_model, input_shape, *, eval_batches_fn=None, parity_images=None,
            reference_logits=None, latency_runs=50, per_op=False):
  """Size, ops, accuracy, parity, start-up, latency, memory and energy of one TFLite
  classifier.

  Args:
    tflite_model: flatbuffer bytes.
    input_shape: one example's shape (H, W, C).
    eval_batches_fn: optional callable returning a fresh iterator of eval batches
      (see `evaluate_tflite`).
    parity_images, reference_logits: optional float32 [N, H, W, C] images and the
      JAX logits for them; the largest absolute difference is reported.
    latency_runs: timed single-image invokes per thread setting.
    per_op: also profile every op (`kd_jax.op_profile.profile`, about 0.1-1 s more).

  Returns:
    dict(bytes, ops, accuracy, num_examples, max_abs_logit_diff, init_ms, latency_ms,
    latency_p90_ms, latency_p99_ms (1 thread), latency_all_threads_ms,
    latency_all_threads_p90_ms, latency_all_threads_p99_ms, threads,
    peak_memory_bytes, memory_kind, arena_bytes, graph, machine, energy) and, with
    `per_op`, `per_op`; accuracy/num_examples and max_abs_logit_diff are None without their
    inputs. `init_ms` is `init_ms` (interpreter + XNNPACK + allocation, 1 thread);
    `peak_memory_bytes` / `memory_kind` are `peak_memory`'s; `arena_bytes` is
    `kd_jax.energy.activation_arena_bytes` (planned from the graph); `graph` is
    `kd_jax.op_profile.graph_facts` (I/O types, QUANTIZE/DEQUANTIZE positions,
    per-channel or per-tensor weights) with `xnnpack_partitions`, the DELEGATE nodes
    of the 1-thread interpreter. `machine` is `kd_jax.machine.cpu(threads=1)`: the
    CPU model and ISA level the latencies were measured on (`threads` is the
    all-threads count). `energy` is `kd_jax.energy.per_inference`: ``dict(uj, kind,
    basis, detail)`` per single-image invoke at 1 thread, `kind` 'measured' (RAPL) or
    'estimated'. `per_op` is `op_profile.profile` at 1 thread.
  """
  model = TFLiteModel(tflite_model, num_threads=1)
  evaluation = (evaluate_tflite(model, eval_batches_fn()) if eval_batches_fn is not None
                else dict(accuracy=None, num_examples=None))
  one = latency_ms(model, input_shape, runs=latency_runs)
  many = latency_ms(TFLiteModel(tflite_model, num_threads=all_threads()), input_shape,
                    runs=latency_runs)
  image = np.zeros((1 if model.polymorphic else model.input_shape[0],
                    *input_shape[-3:]), np.float32)
  energy = energy_lib.per_inference(tflite_model, lambda: model.invoke(image))
  diff = None
  if parity_images is not None and reference_logits is not None:
    diff = float(np.max(np.abs(model(parity_images) - np.asarray(reference_logits))))
  memory = peak_memory(tflite_model)
  graph = dict(op_profile.graph_facts(tflite_model),
               xnnpack_partitions=op_profile.delegated(model.interpreter))
  result = dict(bytes=len(tflite_model), ops=op_names(tflite_model),
                accuracy=evaluation["accuracy"], num_examples=evaluation["num_examples"],
                max_abs_logit_diff=diff, init_ms=init_ms(tflite_model),
                latency_ms=one["median_ms"], latency_p90_ms=one["p90_ms"],
                latency_p99_ms=one["p99_ms"], latency_all_threads_ms=many["median_ms"],
                latency_all_threads_p90_ms=many["p90_ms"],
                latency_all_threads_p99_ms=many["p99_ms"], threads=all_threads(),
                peak_memory_bytes=memory["bytes"], memory_kind=memory["kind"],
                arena_bytes=energy_lib.activation_arena_bytes(tflite_model),
                graph=graph, machine=machine_lib.cpu(threads=1), energy=energy)
  if per_op:
    result["per_op"] = op_profile.profile(tflite_model)
  return result


def jax_logits(fn, images):
  """`fn(images)` at full float32 matmul precision (no TF32 on GPUs): the reference."""
  with jax.default_matmul_precision("highest"):
    return np.asarray(jax.jit(fn)(np.asarray(images, np.float32)))


def export_and_measure(fn, input_shape, path, quantization="fp32", *,
                       representative_images=None, parity_images=None, reference_fn=None,
                       eval_batches_fn=None, latency_runs=50, batch_size=1,
                       activation_ranges=None):
  """Converts `fn` to TFLite, writes it to `path` and measures it in LiteRT.

  Every model kd_jax exports (students, pruned and QAT models, exits, head sets) goes
  through here, so every row of an export table is measured the same way.

  Args:
    fn, input_shape, quantization, representative_images, batch_size,
      activation_ranges: as for `function_to_tflite`.
    path: the .tflite file to write (its folder is created if missing).
    parity_images: optional float32 [N, H, W, C]; the flatbuffer's outputs are compared
      with `reference_fn(parity_images)` (default `fn`) run by JAX at full precision.
    eval_batches_fn, latency_runs: as for `measure`.

  Returns:
    dict(path, **measure(...)).
  """
  flatbuffer = function_to_tflite(fn, input_shape, quantization, representative_images,
                                  batch_size, activation_ranges)
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  files.write_atomic(path, flatbuffer)
  reference = (jax_logits(reference_fn or fn, parity_images)
               if parity_images is not None else None)
  return dict(path=path, **measure(
      flatbuffer, input_shape, eval_batches_fn=eval_batches_fn,
      parity_images=parity_images, reference_logits=reference, latency_runs=latency_runs))


def export_all(model, variables, input_shape, out_dir, variants=("fp32", "int8"),
               representative_images=None, eval_batches_fn=None, parity_images=None,
               latency_runs=50, name="student", batch_polymorphic=False):
  """Converts, writes and measures each TFLite variant of a model.

  Writes `<out_dir>/<name>_<variant>.tflite` (out_dir joined as given).

  Args:
    model, variables, input_shape, representative_images: as for `to_tflite`.
    out_dir: directory for the .tflite files (created if missing).
    variants: quantizations to export.
    eval_batches_fn: optional callable returning a fresh iterator of eval batches.
    parity_images: optional float32 [N, H, W, C]; logits compared with JAX's.
    latency_runs: timed single-image invokes (at 1 thread and at all threads).
    name: the files' prefix.
    batch_polymorphic: export with a polymorphic batch dimension instead of 1.

  Returns:
    {variant: dict(path, **measure(...))}.
  """
  fn = logits_function(model, variables)
  return {variant: export_and_measure(
      fn, input_shape, os.path.join(out_dir, f"{name}_{variant}.tflite"), variant,
      representative_images=representative_images, parity_images=parity_images,
      eval_batches_fn=eval_batches_fn, latency_runs=latency_runs,
      batch_size=None if batch_polymorphic else 1) for variant in variants}


_TABLE_COLUMNS = (
    ("model", "{}"), ("bytes", "{:,}"), ("accuracy", "{:.4f}"), ("jax_accuracy", "{:.4f}"),
    ("max_abs_logit_diff", "{:.1e}"), ("init_ms", "{:.2f}"), ("latency_ms", "{:.3f}"),
    ("latency_p90_ms", "{:.3f}"), ("latency_p99_ms", "{:.3f}"),
    ("latency_all_threads_ms", "{:.3f}"), ("latency_all_threads_p90_ms", "{:.3f}"),
    ("latency_all_threads_p99_ms", "{:.3f}"), ("peak_memory_bytes", "{:,}"),
    ("arena_bytes", "{:,}"), ("macs", "{:,.0f}"), ("params", "{:,}"), ("energy", None))


def _energy_cell(energy) -> str:
  """'<µJ> µJ measured' / '... estimated': every energy figure says which it is."""
  return f"{energy['uj']:.3g} µJ {energy['kind']}"


def machines_line(rows) -> str:
  """'measured on <CPU> (<ISA>)' for the rows' `machine` (each machine with its rows'
  labels when they differ)."""
  by_machine = {}
  for label, row in rows.items():
    if row.get("machine"):
      by_machine.setdefault(f"{row['machine']['cpu']} ({row['machine']['isa']})",
                            []).append(label)
  if not by_machine:
    return "machine not recorded"
  if len(by_machine) == 1:
    return f"measured on {next(iter(by_machine))}"
  return "measured on " + "; ".join(f"{m} ({', '.join(labels)})"
                                    for m, labels in by_machine.items())


def write_table(rows, out_dir):
  """Writes `<out_dir>/export.json` (the rows) and `export.md` (one Markdown table).

  Args:
    rows: {label: dict} as returned by `measure` / `export_all`, optionally with
      `jax_accuracy` (the JAX model's accuracy), `macs` and `params`.
    out_dir: where to write.

  Returns:
    The Markdown text.
  """
  os.makedirs(out_dir, exist_ok=True)
  files.write_json(os.path.join(out_dir, "export.json"), rows)
  header = [c for c, _ in _TABLE_COLUMNS]
  lines = ["| " + " | ".join(h.replace("_", " ") for h in header) + " |",
           "|" + "---|" * len(header)]
  for label, row in rows.items():
    cells = [label]
    for column, fmt in _TABLE_COLUMNS[1:]:
      value = row.get(column)
      cells.append("–" if value is None else
                   _energy_cell(value) if column == "energy" else fmt.format(value))
    lines.append("| " + " | ".join(cells) + " |")
  threads = next((r["threads"] for r in rows.values() if "threads" in r), all_threads())
  text = ("\n".join(lines) + f"\n\nLatency: one image, median, p90 and p99 of timed "
          f"invokes in the LiteRT interpreter (XNNPACK) at 1 and {threads} threads, "
          f"{machines_line(rows)}. Init: interpreter construction + allocate_tensors, "
          f"median of 5.\n")
  kinds = sorted({r["memory_kind"] for r in rows.values() if r.get("memory_kind")})
  if kinds:
    text += f"\nPeak memory: {'; '.join(kinds)}.\n"
  bases = sorted({f"{r['energy']['kind']}: {r['energy']['basis']}" for r in rows.values()
                  if r.get("energy")})
  if bases:
    text += f"\nEnergy per image at 1 thread ({'; '.join(bases)}; see kd_jax/energy.py).\n"
  for label, row in rows.items():
    if "full_latency_ms" in row:  # an exit cascade (`kd_jax.edge.early_exit`)
      text += (f"\n{label} at threshold {row['threshold']:g}: mean {row['latency_ms']:.3f} "
               f"ms and {row['macs']:,.0f} MACs per image, against the full model's "
               f"{row['full_latency_ms']:.3f} ms and {row['full_macs']:,} MACs "
               f"({row['images']} evaluation images, timed alternately at 1 thread).\n")
  files.write_atomic(os.path.join(out_dir, "export.md"), text)
  return text
