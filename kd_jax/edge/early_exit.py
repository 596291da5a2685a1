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

Deployment: one TFLite model per exit, the student's layers up to the exit's stage
plus its head (`export_exits`; only the ops an output depends on reach the
flatbuffer). A single multi-output model would run every layer and every head on
each invoke, so it cannot stop early; separate models can, at the price of
recomputing the shared layers when an exit declines (``avg_macs_separate_models``
in the table). ``avg_macs`` is the cost of a cascade on one device that keeps the
shared layers' features and computes them once.

References:
  Teerapittayanon, McDanel and Kung, "BranchyNet: Fast Inference via Early Exiting
  from Deep Neural Networks", ICPR 2016.
  Phuong and Lampert, "Distillation-Based Training for Multi-Exit Architectures",
  ICCV 2019 (exits trained against a teacher's soft targets).
"""
from __future__ import annotations

import os
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh

from kd_jax import data as data_lib
from kd_jax import export as export_lib
from kd_jax import losses
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
  it (for `export_exits`, `exit_macs`) keeps just that prefix and the exit's head. The
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
  softmax probability is >= the threshold, else at ``'final'``. Costs per example,
  exits `e_1 .. e_n`, stopping at `e_i`:

    avg_macs                  macs(e_i) + Σ_{j<i} head_macs(e_j)
                              (one device, shared layers computed once; the final
                              classifier costs macs(final) + Σ_j head_macs(e_j))
    avg_macs_separate_models  Σ_{j<=i} macs(e_j)
                              (each exit's own model run from the image, as with the
                              TFLite files of `export_exits`)

  Args:
    outputs: ``{exit: logits [N, K]}`` with ``'final'`` (`exit_outputs`).
    labels: [N] class ids.
    macs: `exit_macs` of the same exits.
    thresholds: confidence thresholds; 0 stops everything at the first exit, > 1 at
      ``'final'``.

  Returns:
    One dict per threshold: ``threshold``, ``accuracy``, ``avg_macs``, ``macs_ratio``
    (avg_macs / macs of the student alone), ``avg_macs_separate_models`` and
    ``exit_share`` (``{exit: fraction of examples stopping there}``, with ``'final'``).

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
  separate_cost = np.cumsum([macs[name]["macs"] for name in stops])
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
        avg_macs_separate_models=float(np.mean(separate_cost[stop])),
        exit_share={name: float(np.mean(stop == i)) for i, name in enumerate(stops)}))
  return rows


def export_exits(student: nn.Module, student_variables: Any, heads: ExitHeads,
                 head_variables: Any, input_shape: Sequence[int], out_dir: str,
                 quantization: str = "fp32", representative_images=None,
                 parity_images=None, eval_batches_fn=None,
                 latency_runs: int = 50) -> dict[str, dict[str, Any]]:
  """One TFLite model per exit (the student up to its tap, then its head), and 'final'.

  Writes `<out_dir>/exit_<exit>_<quantization>.tflite`. Each model takes float32
  images [1, H, W, C] and returns float32 logits, like `kd_jax.export.to_tflite`.

  Args:
    student, student_variables, heads, head_variables: the student and its exits.
    input_shape: one example's shape (H, W, C).
    out_dir: directory for the .tflite files (created if missing).
    quantization, representative_images: as for `kd_jax.export.function_to_tflite`.
    parity_images: optional float32 [N, H, W, C]; each model's logits are compared
      with JAX's.
    eval_batches_fn: optional; each exit's accuracy in the interpreter on its own.
    latency_runs: timed single-image invokes (see `kd_jax.export.measure`).

  Returns:
    ``{exit: dict(path, **kd_jax.export.measure(...))}`` in cascade order, then
    ``'final'``.
  """
  return {name: export_lib.export_and_measure(
      exit_function(student, student_variables, heads, head_variables, name), input_shape,
      os.path.join(out_dir, f"exit_{name}_{quantization}.tflite"), quantization,
      representative_images=representative_images, parity_images=parity_images,
      eval_batches_fn=eval_batches_fn, latency_runs=latency_runs)
      for name in (*heads.taps, FINAL)}
