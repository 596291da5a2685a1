"""Early exits: classifier heads after chosen stages of a frozen, distilled student.

Each exit head reads one stage output (a ``stage_k`` tap, NHWC) of the student:
optionally a 1x1 conv-BN-ReLU, a global average pool and a dense classifier. The
student stays frozen in inference mode; only the heads train, each against the
teacher's logits (Hinton KD) and the labels:

    L = Σ_exits  ce_weight · CE(z_exit, y) + kd_weight · KD(z_exit, z_teacher, T).

At inference the exits form a cascade, shallowest first: an example stops at the
first exit whose confidence (maximum softmax probability) reaches a threshold, and
otherwise goes on to the student's own classifier (``'final'``). `threshold_table`
gives accuracy and average multiply-accumulates (MACs) per threshold.

Deployment: the cascade cut into segments (`cascade_segments`, `export_cascade`):
segment k takes exit k - 1's tap (the image for the first) and returns exit k's tap
and logits, the last one the final logits. Chained in the interpreter (`Cascade`),
an example that leaves at exit k has run stages 1..k once each, so the cost of a
cascade is ``avg_macs`` of `threshold_table`; `measure_cascade` times it against the
full model.

References:
  Teerapittayanon, McDanel and Kung, "BranchyNet: Fast Inference via Early Exiting
  from Deep Neural Networks", ICPR 2016.
  Phuong and Lampert, "Distillation-Based Training for Multi-Exit Architectures",
  ICCV 2019 (exits trained against a teacher's soft targets).
"""
from __future__ import annotations

import os
import time
from typing import Any, Callable, Iterable, Mapping, NamedTuple, Optional, Sequence

from ai_edge_litert.interpreter import Interpreter
import flax.linen as nn
import jax
from jax.extend import core as jex_core
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh

from kd_jax import data as data_lib
from kd_jax import energy
from kd_jax import export as export_lib
from kd_jax import losses
from kd_jax import machine
from kd_jax import models
from kd_jax import parallel
from kd_jax.edge import cost
from kd_jax.models.layers import Classifier, ConvBN, global_avg_pool

FINAL = "final"  # the student's own classifier, the cascade's last stop


class ExitHead(Classifier):
  """One exit: [1x1 conv-BN-ReLU to ``hidden`` channels], global average pool, dense.

  Unlike a zoo model it takes a feature map ``[B, H, W, C]`` and returns its float32
  logits ``[B, num_classes]`` only.
  """
  hidden: Optional[int] = None

  @nn.compact
  def __call__(self, features: jax.Array, train: bool = False) -> jax.Array:
    x = features.astype(self.dtype)
    if self.hidden:
      x = ConvBN(self.hidden, 1, self.conv(), self.norm(train), name="conv_bn")(x)
    return self.head(global_avg_pool(x))


class ExitHeads(nn.Module):
  """Exit heads on the student's taps, listed shallowest first (the cascade order).

  Attributes:
    num_classes: size of the logits.
    taps: names of the student's NHWC taps the exits read, e.g. ``('stage_1',
      'stage_2')``; each head's variables are stored under its tap's name.
    hidden: channels of each head's 1x1 conv-BN-ReLU; None: no conv.
    dtype: computation dtype (parameters stay float32).

  ``__call__(taps, train=False)`` takes the student's taps dict and returns
  ``{tap: logits}`` for the exits, in ``taps`` order.
  """
  num_classes: int
  taps: Sequence[str]
  hidden: Optional[int] = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, taps: Mapping[str, jax.Array],
               train: bool = False) -> dict[str, jax.Array]:
    return {tap: ExitHead(self.num_classes, dtype=self.dtype, hidden=self.hidden,
                          name=tap)(taps[tap], train)
            for tap in self.taps}


def exit_function(student: nn.Module, student_variables: Any, heads: ExitHeads,
                  head_variables: Any,
                  exit_name: str) -> Callable[[jax.Array], jax.Array]:
  """`images -> logits` of one exit (a tap of `heads`) or of `FINAL`, in inference mode.

  An exit's function depends only on the student's layers up to its tap, so tracing
  it (for `exit_macs`, parity checks) keeps just that prefix and the exit's head. The
  student is traced with the ``lax`` ops (`kd_jax.models.portable`), as exports and
  MAC counts need.
  """
  student = models.portable(student)
  if exit_name == FINAL:
    return lambda images: student.apply(student_variables, images, train=False)[0]
  head = heads.clone(taps=(exit_name,))
  return lambda images: head.apply(
      head_variables, student.apply(student_variables, images, train=False)[1])[exit_name]


def _tap_shapes(student: nn.Module, student_variables: Any,
                example_shape: Sequence[int]) -> dict[str, tuple[int, ...]]:
  """Shapes of the student's taps for one example, in the model's (computation) order."""
  images = jax.ShapeDtypeStruct((1, *example_shape), jnp.float32)
  taps = jax.eval_shape(lambda v, x: student.apply(v, x, train=False)[1],
                        student_variables, images)
  return {name: tuple(tap.shape) for name, tap in taps.items()}


def _check_exit_taps(heads: ExitHeads, tap_shapes: Mapping[str, tuple[int, ...]]) -> None:
  """One-line ValueError unless the exits are distinct NHWC taps in stage order."""
  maps = [name for name, shape in tap_shapes.items() if len(shape) == 4]
  if not maps:
    raise ValueError("the student has no NHWC feature-map taps for exit heads (a vision "
                     "transformer's block_k taps are token sequences [B, N, D]); set "
                     "edge.exits.enabled=False or distil a convolutional student")
  unknown = [tap for tap in heads.taps if tap not in maps]
  if not heads.taps or unknown:
    raise ValueError(f"exit taps {list(heads.taps)} must be feature-map taps of the "
                     f"student; set the exit taps to some of {maps}")
  positions = [maps.index(tap) for tap in heads.taps]
  if positions != sorted(set(positions)):
    in_order = sorted(set(heads.taps), key=maps.index)
    raise ValueError(f"exit taps {list(heads.taps)} must be distinct and listed "
                     f"shallowest first; set them to {in_order}")


def init_exit_heads(heads: ExitHeads, student: nn.Module, student_variables: Any,
                    example_shape: Sequence[int], seed: int = 0) -> Any:
  """Fresh variables of `heads` on `student`, whose images have shape `example_shape`.

  Raises:
    ValueError: the exits are not distinct NHWC taps of the student, shallowest first.
  """
  tap_shapes = _tap_shapes(student, student_variables, example_shape)
  _check_exit_taps(heads, tap_shapes)
  features = {tap: jnp.zeros(tap_shapes[tap], jnp.float32) for tap in heads.taps}
  return heads.init(jax.random.key(seed), features, train=False)


def train_exit_heads(student: nn.Module, student_variables: Any, teacher: nn.Module,
                     teacher_variables: Any, data_config: ml_collections.ConfigDict, *,
                     heads: ExitHeads, steps: int, batch_size: int, learning_rate: float,
                     temperature: float = 4.0, ce_weight: float = 0.1,
                     kd_weight: float = 0.9, seed: int = 0,
                     mesh: Optional[Mesh] = None) -> tuple[Any, dict[str, np.ndarray]]:
  """Trains the exit heads of a frozen student against the teacher's logits.

  A jitted step over global batches (`kd_jax.data.train_iterator`, the training
  augmentation) sharded over the ``'data'`` mesh, with every variable replicated:
  student and teacher run in inference mode, only the heads' parameters get
  gradients (Adam, learning rate cosine-decayed to 0 over `steps`), the heads'
  BatchNorm (with `hidden`) normalises over the whole global batch. Deterministic
  given `seed` (head initialisation and data order).

  Args:
    student, student_variables: the distilled student; its variables are not changed.
    teacher, teacher_variables: the teacher whose logits the exits learn.
    data_config: the training data (see `kd_jax.data.default_data_config`).
    heads: the exits (their taps must be NHWC taps of the student).
    steps: optimizer steps.
    batch_size: global batch, divisible by the number of devices and of processes.
    learning_rate: Adam's initial learning rate.
    temperature: KD temperature `T`.
    ce_weight, kd_weight: weights of cross-entropy and KD in each exit's loss.
    seed: seeds the head initialisation and the data order and augmentation.
    mesh: a ``('data',)`` mesh; None: all devices (`kd_jax.parallel.data_mesh`).

  Returns:
    `(head_variables, history)`: host numpy variables of `heads`, and per-step
    metrics ``{'loss': [steps], '<tap>/ce': [steps], '<tap>/kd': ...,
    '<tap>/accuracy': ...}``.

  Raises:
    ValueError: bad exit taps, `steps` < 1, or a batch that does not split evenly.
  """
  if steps < 1:
    raise ValueError(f"steps={steps} must be at least 1; set a positive number of steps")
  parallel.check_batch_size(batch_size, "batch_size")
  mesh = parallel.data_mesh() if mesh is None else mesh
  info = data_lib.get_info(data_config)
  variables = init_exit_heads(heads, student, student_variables, info.image_shape, seed)
  optimizer = optax.adam(optax.cosine_decay_schedule(learning_rate, steps))
  state = dict(variables=variables, opt_state=optimizer.init(variables["params"]))

  def train_step(state, student_variables, teacher_variables, batch):
    images, labels = batch["image"], batch["label"]
    _, taps = student.apply(student_variables, images, train=False)
    teacher_logits, _ = teacher.apply(teacher_variables, images, train=False)

    def loss_fn(params):
      exit_logits, updates = heads.apply({**state["variables"], "params": params}, taps,
                                         train=True, mutable=["batch_stats"])
      metrics = {}
      for tap, logits in exit_logits.items():
        metrics[f"{tap}/ce"] = losses.cross_entropy(logits, labels)
        metrics[f"{tap}/kd"] = losses.kd(logits, teacher_logits, temperature)
        metrics[f"{tap}/accuracy"] = jnp.mean(jnp.argmax(logits, -1) == labels)
      loss = sum(ce_weight * metrics[f"{tap}/ce"] + kd_weight * metrics[f"{tap}/kd"]
                 for tap in exit_logits)
      return loss, (metrics, updates)

    params = state["variables"]["params"]
    (loss, (metrics, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    param_updates, opt_state = optimizer.update(grads, state["opt_state"], params)
    variables = {"params": optax.apply_updates(params, param_updates), **updates}
    return dict(variables=variables, opt_state=opt_state), {"loss": loss, **metrics}

  step_fn = jax.jit(train_step, donate_argnums=(0,),
                    out_shardings=parallel.replicated(mesh))
  state = parallel.replicate(state, mesh)
  student_variables = parallel.replicate(student_variables, mesh)
  teacher_variables = parallel.replicate(teacher_variables, mesh)
  batches = data_lib.train_iterator(data_config, global_batch_size=batch_size, seed=seed)
  history = []
  for _ in range(steps):
    batch = next(batches)
    batch = parallel.to_global({"image": batch["image"], "label": batch["label"]}, mesh)
    state, metrics = step_fn(state, student_variables, teacher_variables, batch)
    history.append(metrics)
  head_variables = parallel.to_host(state["variables"])
  history = parallel.to_host(jax.tree.map(lambda *values: jnp.stack(values), *history))
  return head_variables, history


def exit_outputs(student: nn.Module, student_variables: Any, heads: ExitHeads,
                 head_variables: Any, batches: Iterable[Mapping[str, np.ndarray]],
                 mesh: Optional[Mesh] = None) -> tuple[dict[str, np.ndarray], np.ndarray]:
  """Logits of every exit and of the final classifier over evaluation batches.

  Args:
    student, student_variables, heads, head_variables: the student and its exits.
    batches: host-local dicts with 'image', 'label' and optionally 'mask' (rows with
      mask 0 are padding and are dropped), e.g. `kd_jax.data.eval_iterator`.
    mesh: a ``('data',)`` mesh; None: all devices. With several processes every
      process gets the outputs of all of them.

  Returns:
    `(outputs, labels)`: ``{exit: logits [N, K]}`` in cascade order, then ``'final'``,
    and the labels [N].
  """
  mesh = parallel.data_mesh() if mesh is None else mesh

  @jax.jit
  def forward(student_variables, head_variables, images):
    logits, taps = student.apply(student_variables, images, train=False)
    return {**heads.apply(head_variables, taps), FINAL: logits}

  student_variables = parallel.replicate(student_variables, mesh)
  head_variables = parallel.replicate(head_variables, mesh)
  outputs, labels = [], []
  for batch in batches:
    mask = batch.get("mask", np.ones(len(batch["label"]), np.float32))
    batch = parallel.to_global(
        {"image": batch["image"], "label": batch["label"], "mask": mask}, mesh)
    logits, batch = parallel.to_host(
        (forward(student_variables, head_variables, batch["image"]), batch))
    keep = batch["mask"] > 0
    outputs.append({name: value[keep] for name, value in logits.items()})
    labels.append(batch["label"][keep])
  if not labels:
    raise ValueError("no evaluation batches; set the eval split to one with examples")
  names = (*heads.taps, FINAL)
  return ({name: np.concatenate([o[name] for o in outputs]) for name in names},
          np.concatenate(labels))


def exit_macs(student: nn.Module, student_variables: Any, heads: ExitHeads,
              head_variables: Any, input_shape: Sequence[int]) -> dict[str, dict[str, int]]:
  """Multiply-accumulates of each exit on one image (`kd_jax.edge.cost` convention).

  Args:
    student, student_variables, heads, head_variables: the student and its exits.
    input_shape: one example's shape (H, W, C).

  Returns:
    ``{exit: dict(macs=..., head_macs=...)}`` in cascade order, then ``'final'``:
    ``macs`` of the exit's own model (the student up to its tap, then its head; for
    ``'final'`` the whole student) and ``head_macs`` of its head alone (0 for
    ``'final'``).
  """
  tap_shapes = _tap_shapes(student, student_variables, input_shape[-3:])
  result = {}
  for name in (*heads.taps, FINAL):
    macs = cost.function_macs(
        exit_function(student, student_variables, heads, head_variables, name),
        input_shape)
    head_macs = 0
    if name != FINAL:
      head = heads.clone(taps=(name,))
      head_macs = cost.function_macs(
          lambda features: head.apply(head_variables, {name: features})[name],
          tap_shapes[name])
    result[name] = dict(macs=macs, head_macs=head_macs)
  return result


def threshold_table(outputs: Mapping[str, np.ndarray], labels: np.ndarray,
                    macs: Mapping[str, Mapping[str, int]],
                    thresholds: Sequence[float]) -> list[dict[str, Any]]:
  """Accuracy and average MACs of the exit cascade, one row per confidence threshold.

  An example stops at the first exit (in the order of `outputs`) whose maximum
  softmax probability is >= the threshold, else at ``'final'``. Cost per example,
  exits `e_1 .. e_n`, stopping at `e_i` (shared layers computed once, as the chained
  segments of `export_cascade` do):

    avg_macs   macs(e_i) + Σ_{j<i} head_macs(e_j)
               (the final classifier costs macs(final) + Σ_j head_macs(e_j))

  Args:
    outputs: ``{exit: logits [N, K]}`` with ``'final'`` (`exit_outputs`).
    labels: [N] class ids.
    macs: `exit_macs` of the same exits.
    thresholds: confidence thresholds; 0 stops everything at the first exit, > 1 at
      ``'final'``.

  Returns:
    One dict per threshold: ``threshold``, ``accuracy``, ``avg_macs``, ``macs_ratio``
    (avg_macs / macs of the student alone) and ``exit_share`` (``{exit: fraction of
    examples stopping there}``, with ``'final'``).

  Raises:
    ValueError: `outputs` lacks ``'final'`` or any exit, or `macs` names other exits.
  """
  exits = [name for name in outputs if name != FINAL]
  if FINAL not in outputs or not exits or set(macs) != set(outputs):
    raise ValueError(f"outputs {list(outputs)} and macs {list(macs)} must name the same "
                     f"exits and '{FINAL}'; pass the results of exit_outputs and "
                     "exit_macs for the same heads")
  stops = (*exits, FINAL)
  labels = np.asarray(labels)
  confidence = np.stack([np.max(jax.nn.softmax(np.asarray(outputs[name], np.float32)), -1)
                         for name in exits])
  correct = np.stack([np.argmax(outputs[name], -1) == labels for name in stops])
  # Heads run before stop i: Σ_{j<i} head_macs(e_j); before 'final': all of them.
  heads_before = np.cumsum([0] + [macs[name]["head_macs"] for name in exits])
  shared_cost = np.array([macs[name]["macs"] for name in stops]) + heads_before
  final_macs = macs[FINAL]["macs"]
  examples = np.arange(len(labels))
  rows = []
  for threshold in thresholds:
    passes = confidence >= threshold
    stop = np.where(passes.any(0), passes.argmax(0), len(exits))
    avg_macs = float(np.mean(shared_cost[stop]))
    rows.append(dict(
        threshold=float(threshold),
        accuracy=float(np.mean(correct[stop, examples])),
        avg_macs=avg_macs,
        macs_ratio=avg_macs / final_macs,
        exit_share={name: float(np.mean(stop == i)) for i, name in enumerate(stops)}))
  return rows


class Segment(NamedTuple):
  """One link of the exit cascade: `fn` maps `input_shape` (one example's shape: the
  image for the first, the previous exit's tap otherwise) to ``(tap, exit logits)``,
  or, for the last (``'final'``), to the student's logits."""
  name: str
  fn: Callable[[jax.Array], Any]
  input_shape: tuple[int, ...]


def cascade_segments(student: nn.Module, student_variables: Any, heads: ExitHeads,
                     head_variables: Any, input_shape: Sequence[int]) -> list[Segment]:
  """The cascade cut into segments that each compute their stages once.

  Segment k takes the tap of exit k - 1 (the image for k = 1) and returns exit k's tap
  and logits; the last takes the deepest exit's tap and returns the final logits.
  Chained, they compute every layer of the student once, and an example that leaves
  at exit k has run segments 1..k only. They are cut from one trace of the student
  and its heads: each segment holds the equations its outputs need, starting from
  its input tap.

  Raises:
    ValueError: bad exit taps, or a stage that reads a tensor from before the
      previous exit's tap (the cascade cannot be cut there).
  """
  example_shape = tuple(input_shape[-3:])
  tap_shapes = _tap_shapes(student, student_variables, example_shape)
  _check_exit_taps(heads, tap_shapes)
  student = models.portable(student)

  def everything(images):
    logits, taps = student.apply(student_variables, images, train=False)
    exits = heads.apply(head_variables, taps)
    return [taps[t] for t in heads.taps], [exits[t] for t in heads.taps], logits

  closed = jax.make_jaxpr(everything)(jax.ShapeDtypeStruct((1, *example_shape),
                                                           jnp.float32))
  jaxpr = closed.jaxpr
  n = len(heads.taps)
  tap_vars, exit_vars, final_var = jaxpr.outvars[:n], jaxpr.outvars[n:2 * n], jaxpr.outvars[-1]
  sources = [jaxpr.invars[0], *tap_vars]
  shapes = [example_shape] + [tap_shapes[t][1:] for t in heads.taps]
  names = [*heads.taps, FINAL]
  targets = [(tap_vars[k], exit_vars[k]) for k in range(n)] + [(final_var,)]
  segments = []
  for k, name in enumerate(names):
    sub = _cut(jaxpr, sources[k], targets[k], names[k - 1] if k else "the image")
    fn = jex_core.jaxpr_as_fun(jex_core.ClosedJaxpr(sub, closed.consts))
    single = len(targets[k]) == 1
    segments.append(Segment(name, (lambda f: lambda x: f(x)[0])(fn) if single
                            else (lambda f: lambda x: tuple(f(x)))(fn), shapes[k]))
  return segments


def _cut(jaxpr: jex_core.Jaxpr, source: jex_core.Var, targets: Sequence[jex_core.Var],
         source_name: str) -> jex_core.Jaxpr:
  """The jaxpr computing `targets` from `source` (and the constants) alone."""
  live = {v for v in targets if isinstance(v, jex_core.Var)}
  kept = []
  for eqn in reversed(jaxpr.eqns):
    if source in eqn.outvars or not live.intersection(eqn.outvars):
      continue
    kept.append(eqn)
    live.update(v for v in eqn.invars if isinstance(v, jex_core.Var))
  outside = live - {source} - set(jaxpr.constvars) - {
      v for eqn in kept for v in eqn.outvars}
  if outside:
    raise ValueError(f"the exits cannot be cut at {source_name}: a later stage reads "
                     "an earlier tensor; choose exit taps that the next stage alone reads")
  return jex_core.Jaxpr(jaxpr.constvars, [source], list(targets), kept[::-1])


def segment_macs(segments: Sequence[Segment]) -> dict[str, dict[str, int]]:
  """MACs of each segment (`kd_jax.edge.cost`): ``macs`` of the whole segment,
  ``backbone_macs`` of its student layers (they sum to the student's MACs) and
  ``head_macs`` of its exit head (0 for ``'final'``)."""
  result = {}
  for segment in segments:
    total = cost.function_macs(segment.fn, segment.input_shape)
    backbone = total if segment.name == FINAL else cost.function_macs(
        lambda x, f=segment.fn: f(x)[0], segment.input_shape)
    result[segment.name] = dict(macs=total, backbone_macs=backbone,
                                head_macs=total - backbone)
  return result


class Cascade:
  """The exported segments chained in the LiteRT interpreter, one image at a time.

  `Cascade(paths, threshold)(image)` runs segment 1, stops if its exit's maximum
  softmax probability reaches `threshold`, else feeds its tap to segment 2, and so
  on; it returns ``(stop index, logits)``.
  """

  def __init__(self, paths: Sequence[str], threshold: float, num_threads: int = 1):
    self.threshold = threshold
    self._links = []
    for path in paths:
      interpreter = Interpreter(model_path=path, num_threads=num_threads)
      interpreter.allocate_tensors()
      (source,) = interpreter.get_input_details()
      outputs = interpreter.get_output_details()
      tap = next((o["index"] for o in outputs if len(o["shape"]) == 4), None)
      logits = next(o["index"] for o in outputs if len(o["shape"]) == 2)
      self._links.append((interpreter, source["index"], tap, logits))

  def run_all(self, image: np.ndarray) -> list[np.ndarray]:
    """Every exit's logits and the final ones (no stopping), for parity checks."""
    x, out = image[None].astype(np.float32), []
    for interpreter, source, tap, logits in self._links:
      interpreter.set_tensor(source, x)
      interpreter.invoke()
      out.append(interpreter.get_tensor(logits)[0].copy())
      if tap is not None:
        x = interpreter.get_tensor(tap)
    return out

  def __call__(self, image: np.ndarray) -> tuple[int, np.ndarray]:
    x = image[None].astype(np.float32)
    last = len(self._links) - 1
    for k, (interpreter, source, tap, logits) in enumerate(self._links):
      interpreter.set_tensor(source, x)
      interpreter.invoke()
      z = interpreter.get_tensor(logits)[0]
      if k == last:
        return k, z
      p = np.exp(z - z.max())
      if p.max() / p.sum() >= self.threshold:
        return k, z
      x = interpreter.get_tensor(tap)
    raise AssertionError("unreachable")


def export_cascade(student: nn.Module, student_variables: Any, heads: ExitHeads,
                   head_variables: Any, input_shape: Sequence[int], out_dir: str,
                   parity_images=None) -> dict[str, Any]:
  """Exports the cascade's segments (`cascade_segments`) as fp32 TFLite models.

  Writes `<out_dir>/exit_segment_<k>_<name>.tflite`: segment k takes float32
  [1, ...] features (the image for the first) and returns its exit's tap and logits
  (the last: the final logits).

  Returns:
    dict(paths=[...], bytes=total, segments={name: dict(path, bytes, ops, macs,
    backbone_macs, head_macs)}, max_abs_logit_diff=largest difference between the
    chained segments' exit and final logits on `parity_images` and JAX's (None
    without them)).
  """
  segments = cascade_segments(student, student_variables, heads, head_variables,
                              input_shape)
  macs = segment_macs(segments)
  os.makedirs(out_dir, exist_ok=True)
  info, paths = {}, []
  for k, segment in enumerate(segments):
    flatbuffer = export_lib.function_to_tflite(segment.fn, segment.input_shape)
    path = os.path.join(out_dir, f"exit_segment_{k + 1}_{segment.name}.tflite")
    with open(path, "wb") as f:
      f.write(flatbuffer)
    paths.append(path)
    info[segment.name] = dict(path=path, bytes=len(flatbuffer),
                              ops=export_lib.op_names(flatbuffer), **macs[segment.name])
  diff = None
  if parity_images is not None:
    cascade = Cascade(paths, threshold=2.0)
    chained = np.array([cascade.run_all(image) for image in np.asarray(parity_images)])
    reference = np.stack([export_lib.jax_logits(
        exit_function(student, student_variables, heads, head_variables, name),
        parity_images) for name in info], axis=1)
    diff = float(np.max(np.abs(chained - reference)))
  return dict(paths=paths, bytes=sum(i["bytes"] for i in info.values()), segments=info,
              max_abs_logit_diff=diff)


def measure_cascade(paths: Sequence[str], full_model, macs: Mapping[str, Mapping],
                    images: np.ndarray, labels: np.ndarray, threshold: float,
                    full_macs: int, repeats: int = 3, warmup: int = 5) -> dict[str, Any]:
  """Accuracy, latency and MACs per image of the exported cascade at `threshold`,
  against the full model's, timed alternately image by image at 1 thread.

  Args:
    paths: the segments' files, in order (`export_cascade`).
    full_model: the student's fp32 TFLite model (bytes or a path), one image per invoke.
    macs: `segment_macs` of the segments (each with ``macs``), in the same order.
    images, labels: the images, run one by one, and their class ids.
    threshold: the deployed confidence threshold.
    full_macs: the student's MACs per image.
    repeats: each image is timed this many times; its latency is the median (so a
      scheduler hiccup does not move the mean), the reported figure the mean of those.

  Returns:
    dict(threshold, accuracy, latency_ms (mean per image), latency_p90_ms, macs (mean
    per image), full_latency_ms, full_latency_p90_ms, full_macs, exit_share, images,
    machine (`kd_jax.machine.cpu(threads=1)`), energy (per image, as
    `kd_jax.energy.per_inference`: RAPL around a pass over the images where readable,
    else the mean of the estimates of the segments each image ran)).
  """
  cascade = Cascade(paths, threshold)
  full = export_lib.TFLiteModel(full_model)
  images = np.asarray(images, np.float32)
  for image in images[:warmup]:
    cascade(image)
    full.invoke(image[None])
  cumulative = np.cumsum([m["macs"] for m in macs.values()])
  stops, times, full_times, correct = [], [], [], 0
  for image, label in zip(images, np.asarray(labels)):
    per_image, per_image_full = [], []
    for _ in range(repeats):
      start = time.perf_counter()
      stop, logits = cascade(image)
      per_image.append(time.perf_counter() - start)
      start = time.perf_counter()
      full.invoke(image[None])
      per_image_full.append(time.perf_counter() - start)
    times.append(np.median(per_image) * 1e3)
    full_times.append(np.median(per_image_full) * 1e3)
    stops.append(stop)
    correct += int(np.argmax(logits) == label)
  stops = np.asarray(stops)
  measured = energy.measure_uj(lambda: [cascade(image) for image in images])
  if measured:
    spent = dict(measured, uj=measured["uj"] / len(images))
  else:
    estimates = []
    for path in paths:
      with open(path, "rb") as f:
        estimates.append(energy.estimate_uj(energy.graph_costs(f.read())))
    spent = dict(estimates[0], uj=float(np.mean(np.cumsum([e["uj"] for e in estimates])[stops])),
                 detail="mean over the images of the segments each ran")
  return dict(threshold=float(threshold), accuracy=correct / len(images),
              latency_ms=float(np.mean(times)),
              latency_p90_ms=float(np.percentile(times, 90)),
              macs=float(np.mean(cumulative[stops])),
              full_latency_ms=float(np.mean(full_times)),
              full_latency_p90_ms=float(np.percentile(full_times, 90)),
              full_macs=int(full_macs), images=len(images),
              exit_share={name: float(np.mean(stops == k)) for k, name in enumerate(macs)},
              machine=machine.cpu(threads=1), energy=spent)
