"""Per-operator view of a TFLite flatbuffer: where the time goes, what XNNPACK runs.

The LiteRT Python interpreter has no op profiler, so the graph is cut instead: each
operator becomes a one-operator model (`single_op_models`: its input tensors are the
model's inputs, its constant tensors keep their buffers, its outputs are the model's
outputs) and is timed alone in the interpreter with the default XNNPACK delegate, fed
the tensors it sees in the whole model (`intermediate_tensors`). Summing the ops leaves
out what a whole-graph run shares (one delegate call, fused ops, the cache kept warm
between ops) and adds each op's own call, so `profile` reports the per-op sum beside
the whole model's time measured the same way; the shares are of the per-op sum.

A one-operator model is delegated by XNNPACK exactly when the delegate supports the
op with its types and options, so each row also says whether XNNPACK runs the op;
`graph_facts` reads the rest from the flatbuffer (where QUANTIZE / DEQUANTIZE sit,
per-channel or per-tensor weights, the input and output types).
"""
import copy
import time

from ai_edge_litert import schema_py_generated as tflite_schema
from ai_edge_litert.interpreter import Interpreter
from ai_edge_litert.interpreter import OpResolverType
import flatbuffers
import numpy as np

BUILTIN_OP_NAMES = {
    code: name
    for name, code in vars(tflite_schema.BuiltinOperator).items()
    if not name.startswith("_")
}
# Ops whose second input is the weight tensor (per-channel vs per-tensor scales).
_WEIGHTED_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "TRANSPOSE_CONV")


def read_model(tflite_model):
  """The flatbuffer as a mutable `ModelT`."""
  return tflite_schema.ModelT.InitFromPackedBuf(bytearray(tflite_model), 0)


def write_model(model):
  """`ModelT` back to flatbuffer bytes."""
  builder = flatbuffers.Builder(1024)
  builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
  return bytes(builder.Output())


def op_name(model, operator):
  """An operator's TFLite name ('CONV_2D', ...), or a custom op's custom code."""
  code = model.operatorCodes[operator.opcodeIndex]
  builtin = max(code.builtinCode, code.deprecatedBuiltinCode)
  if builtin == tflite_schema.BuiltinOperator.CUSTOM and code.customCode:
    return code.customCode.decode()
  return BUILTIN_OP_NAMES[builtin]


def _is_constant(model, tensor):
  buffer = model.buffers[tensor.buffer] if tensor.buffer < len(model.buffers) else None
  return buffer is not None and buffer.data is not None and len(buffer.data) > 0


def single_op_models(tflite_model):
  """The main graph's operators, each as a model of its own.

  Returns:
    A list in execution order of ``dict(index, op, inputs, outputs, model)``:
    `inputs` the op's non-constant input tensor indices in the whole model (the
    one-op model's inputs, in that order), `outputs` its output tensor indices (the
    one-op model's outputs), `model` the one-op flatbuffer.
  """
  model = read_model(tflite_model)
  graph = model.subgraphs[0]
  sliced = []
  for index, operator in enumerate(graph.operators):
    used = [i for i in list(operator.inputs) + list(operator.outputs) if i >= 0]
    used = list(dict.fromkeys(used))
    local = {i: k for k, i in enumerate(used)}
    buffers, tensors = [tflite_schema.BufferT()], []
    for i in used:
      tensor = copy.copy(graph.tensors[i])
      if _is_constant(model, tensor):
        buffers.append(model.buffers[tensor.buffer])
        tensor.buffer = len(buffers) - 1
      else:
        tensor.buffer = 0
      tensors.append(tensor)
    inputs = [i for i in dict.fromkeys(operator.inputs)
              if i >= 0 and not _is_constant(model, graph.tensors[i])]
    one = copy.copy(operator)
    one.opcodeIndex = 0
    one.inputs = np.array([local[i] if i >= 0 else -1 for i in operator.inputs], np.int32)
    one.outputs = np.array([local[i] for i in operator.outputs], np.int32)
    one.intermediates = None
    subgraph = tflite_schema.SubGraphT()
    subgraph.tensors, subgraph.operators = tensors, [one]
    subgraph.inputs = np.array([local[i] for i in inputs], np.int32)
    subgraph.outputs = np.array(one.outputs, np.int32)
    subgraph.name = b"main"
    out = tflite_schema.ModelT()
    out.version, out.description = model.version, b"one operator"
    out.operatorCodes = [model.operatorCodes[operator.opcodeIndex]]
    out.subgraphs, out.buffers = [subgraph], buffers
    sliced.append(dict(index=index, op=op_name(model, operator), inputs=inputs,
                       outputs=[int(i) for i in operator.outputs], model=write_model(out)))
  return sliced


def reference_interpreter(tflite_model, **kwargs):
  """The interpreter with TFLite's builtin kernels only (no XNNPACK), allocated."""
  interpreter = Interpreter(
      model_content=bytes(tflite_model),
      experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
      **kwargs)
  interpreter.allocate_tensors()
  return interpreter


def intermediate_tensors(tflite_model, inputs):
  """Every tensor of the main graph after one run on `inputs` (one array per model
  input), by tensor index: builtin kernels, all tensors kept."""
  interpreter = reference_interpreter(tflite_model,
                                      experimental_preserve_all_tensors=True)
  for detail, value in zip(interpreter.get_input_details(), inputs):
    interpreter.set_tensor(detail["index"], np.asarray(value, detail["dtype"]))
  interpreter.invoke()
  values = {}
  for i in range(len(read_model(tflite_model).subgraphs[0].tensors)):
    try:
      values[i] = interpreter.get_tensor(i)
    except ValueError:  # a tensor without data (an omitted optional input)
      pass
  return values


def example_inputs(tflite_model, seed=0):
  """One random array per model input: uniform [0, 1) floats, or random integers of
  the input's type."""
  rng = np.random.default_rng(seed)
  interpreter = reference_interpreter(tflite_model)
  arrays = []
  for detail in interpreter.get_input_details():
    dtype = np.dtype(detail["dtype"])
    if dtype.kind == "f":
      arrays.append(rng.uniform(size=detail["shape"]).astype(dtype))
    else:
      info = np.iinfo(dtype)
      arrays.append(rng.integers(max(info.min, -128), min(info.max, 127) + 1,
                                 size=detail["shape"]).astype(dtype))
  return arrays


def delegated(interpreter):
  """The number of delegate partitions (DELEGATE nodes) in an allocated interpreter."""
  return sum(op["op_name"] == "DELEGATE" for op in interpreter._get_ops_details())  # pylint: disable=protected-access


def _invoke_ms(interpreter, runs, warmup=3):
  """Mean wall time of `runs` back-to-back invokes, in milliseconds."""
  for _ in range(warmup):
    interpreter.invoke()
  start = time.perf_counter()
  for _ in range(runs):
    interpreter.invoke()
  return (time.perf_counter() - start) * 1e3 / runs


def _timed(tflite_model, feeds, num_threads):
  """An allocated interpreter with XNNPACK fed `feeds`, and its DELEGATE count."""
  interpreter = Interpreter(model_content=bytes(tflite_model), num_threads=num_threads)
  interpreter.allocate_tensors()
  for detail, value in zip(interpreter.get_input_details(), feeds):
    interpreter.set_tensor(detail["index"], np.asarray(value, detail["dtype"]))
  return delegated(interpreter), interpreter


def _empty_model(tflite_model):
  """A graph with no operators whose output is its input: one invoke's fixed cost."""
  model = read_model(tflite_model)
  graph = model.subgraphs[0]
  tensor = copy.copy(graph.tensors[graph.inputs[0]])
  tensor.buffer = 0
  subgraph = tflite_schema.SubGraphT()
  subgraph.tensors, subgraph.operators = [tensor], []
  subgraph.inputs = subgraph.outputs = np.array([0], np.int32)
  out = tflite_schema.ModelT()
  out.version, out.operatorCodes = model.version, []
  out.subgraphs, out.buffers = [subgraph], [tflite_schema.BufferT()]
  return write_model(out)


def profile(tflite_model, runs=30, num_threads=1, top=8, inputs=None, rounds=3):
  """Per-operator time of a TFLite model in the interpreter with XNNPACK.

  Args:
    tflite_model: flatbuffer bytes.
    runs: back-to-back invokes per timing; each op and the whole model are timed
      `rounds` times, interleaved, and the median of the rounds' means is kept.
    num_threads: interpreter threads.
    top: how many of the slowest ops to return in `slowest`.
    inputs: the model's inputs (default `example_inputs`); each op is fed the tensors
      it sees in the whole model on them.

  Returns:
    dict(ops=[dict(index, op, ms, share, xnnpack, out_type)] in execution order,
    slowest (the `top` slowest of `ops`), by_op ({op name: dict(count, ms, share)},
    slowest first), sum_ms (per-op total), whole_ms (the whole model, timed the same
    way), overhead_ms (one invoke of an empty graph, subtracted from every figure),
    partitions (DELEGATE nodes in the whole model), not_delegated (op names XNNPACK
    leaves to the builtin kernels)). `ms` are means of back-to-back invokes.
  """
  inputs = example_inputs(tflite_model) if inputs is None else inputs
  values = intermediate_tensors(tflite_model, inputs)
  model = read_model(tflite_model)
  sliced = single_op_models(tflite_model)
  partitions, whole = _timed(tflite_model, inputs, num_threads)
  _, empty = _timed(_empty_model(tflite_model), inputs[:1], num_threads)
  interpreters = []
  for op in sliced:
    n, interpreter = _timed(op["model"], [values[i] for i in op["inputs"]], num_threads)
    interpreters.append((n > 0, interpreter))
  times = {k: [] for k in range(-2, len(sliced))}
  for _ in range(rounds):
    times[-2].append(_invoke_ms(empty, runs * 4))
    times[-1].append(_invoke_ms(whole, runs))
    for k, (_, interpreter) in enumerate(interpreters):
      times[k].append(_invoke_ms(interpreter, runs))
  overhead = float(np.median(times[-2]))
  ms = [max(float(np.median(times[k])) - overhead, 0.0) for k in range(len(sliced))]
  total = sum(ms) or 1.0
  types = {v: k for k, v in vars(tflite_schema.TensorType).items() if not k.startswith("_")}
  graph = model.subgraphs[0]
  ops = [dict(index=op["index"], op=op["op"], ms=t, share=t / total,
              xnnpack=bool(interpreters[k][0]),
              out_type=types[graph.tensors[op["outputs"][0]].type])
         for k, (op, t) in enumerate(zip(sliced, ms))]
  by_op = {}
  for op in ops:
    entry = by_op.setdefault(op["op"], dict(count=0, ms=0.0, share=0.0))
    entry["count"] += 1
    entry["ms"] += op["ms"]
    entry["share"] += op["share"]
  return dict(ops=ops, slowest=sorted(ops, key=lambda o: -o["ms"])[:top],
              by_op=dict(sorted(by_op.items(), key=lambda kv: -kv[1]["ms"])),
              sum_ms=sum(ms), whole_ms=max(float(np.median(times[-1])) - overhead, 0.0),
              overhead_ms=overhead, partitions=partitions,
              not_delegated=sorted({o["op"] for o in ops if not o["xnnpack"]}))


def graph_facts(tflite_model):
  """What the flatbuffer says about its quantisation.

  Returns:
    dict(input_types, output_types (TFLite type names of the model's inputs and
    outputs), quantize_ops / dequantize_ops (dict(index, at_input / at_output: whether
    the op reads a model input / writes a model output)), weights ('per-channel',
    'per-tensor', 'mixed' or 'float': the scales of the conv / fully connected weights),
    float_ops (op names computing in float32 apart from the DEQUANTIZEs, in a model
    with int8 activations; empty for a float model)).
  """
  model = read_model(tflite_model)
  graph = model.subgraphs[0]
  types = {v: k for k, v in vars(tflite_schema.TensorType).items() if not k.startswith("_")}
  inputs, outputs = set(graph.inputs), set(graph.outputs)
  quantize, dequantize, scales, float_ops = [], [], set(), set()
  int8_graph = any(graph.tensors[i].type == tflite_schema.TensorType.INT8
                   for op in graph.operators for i in op.outputs)
  for index, operator in enumerate(graph.operators):
    name = op_name(model, operator)
    if name == "QUANTIZE":
      quantize.append(dict(index=index, at_input=int(operator.inputs[0]) in inputs))
    elif name == "DEQUANTIZE":
      dequantize.append(dict(index=index, at_output=int(operator.outputs[0]) in outputs))
    elif int8_graph and graph.tensors[operator.outputs[0]].type == (
        tflite_schema.TensorType.FLOAT32):
      float_ops.add(name)
    if name in _WEIGHTED_OPS and len(operator.inputs) > 1:
      weight = graph.tensors[operator.inputs[1]]
      q = weight.quantization
      if weight.type == tflite_schema.TensorType.FLOAT32 or q is None or q.scale is None:
        scales.add("float")
      else:
        scales.add("per-channel" if len(q.scale) > 1 else "per-tensor")
  return dict(input_types=[types[graph.tensors[i].type] for i in graph.inputs],
              output_types=[types[graph.tensors[i].type] for i in graph.outputs],
              quantize_ops=quantize, dequantize_ops=dequantize,
              weights=scales.pop() if len(scales) == 1 else "mixed" if scales else "none",
              float_ops=sorted(float_ops))
