"""The distillation objective, declared in the config as a list of terms.

    objective = ce_weight · CE(student, labels) + Σ_i weight_i(step) · loss_i(student, teacher)

Each term names a method from `METHODS` (a pure loss of `kd_jax.losses`) and, for
feature and relation methods, the student and teacher taps it compares, e.g.

    distill.terms = [dict(method='kd', weight=0.9, temperature=4.0),
                     dict(method='attention_transfer', weight=1000.0,
                          student_tap='stage_2', teacher_tap='stage_2')]

Adding a method is one loss function and one `register(...)` call.

Self-paced learning (`distill.self_paced`) weighs each example by the student's own
cross-entropy `l_b` against a threshold `λ(step)` growing linearly from
`start_threshold` to `final_threshold` by `full_at_epoch`:

    hard:   v_b = 1[l_b < λ]                       (Kumar et al., NeurIPS 2010)
    linear: v_b = max(0, 1 − l_b / λ)              (Jiang et al., ACM MM 2014)
    soft:   v_b = sigmoid((λ − l_b) / softness)    (a smooth step at λ)

and the CE and every logit term with a per-example form (kd, lskd, dkd) become
`mean_b(v_b · loss_b)`; other terms are left unweighted. The weights are constants
(no gradient flows through them).
"""
from __future__ import annotations

import collections
import copy
import dataclasses
import functools
import inspect
import math
import operator
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax
import ml_collections
import numpy as np
import optax

from kd_jax import losses
from kd_jax import models
from kd_jax.models.vit import DISTILL_LOGITS
from kd_jax.registry import Registry, section

# What a method compares: the two logits vectors, a pair of taps (feature maps), a
# pair of taps that defaults to the penultimate embeddings, several taps at once
# (student_tap / teacher_tap are then sequences of names, the loss gets tuples), or a
# pair of embeddings and the two logits (`fn(s_emb, t_emb, s_logits, t_logits)`), or
# the logits of the student's distillation head (its tap `distill_logits`, DeiT's) and
# the teacher's logits.
LOGITS, FEATURES, EMBEDDING, MULTI = "logits", "features", "embedding", "multi"
EMBEDDING_LOGITS = "embedding+logits"
DISTILL_HEAD = "distill_head"
INPUTS = (LOGITS, FEATURES, EMBEDDING, MULTI, EMBEDDING_LOGITS, DISTILL_HEAD)
TEACHER_LOGITS_ONLY = (LOGITS, DISTILL_HEAD)  # the kinds that read no teacher tap


@dataclasses.dataclass(frozen=True)
class Pretraining:
  """A part of a module method trained in a phase of its own before the phase that uses
  it, then frozen (FT's paraphraser; `kd_jax.phase.pretrain_parts` runs it).

  The pre-training phase trains `model(teacher, tap, **hyper)` (the teacher frozen
  inside it, `hyper` the term's settings that `model` takes) on the mean squared error
  between its tap `output` and the teacher's tap (the `fitnet` loss), without
  cross-entropy; only `params[part]` trains. Those parameters become the term's
  variable `collection/params`. The phase's recipe is the student's (`train`) with
  `recipe` and then the term's `pretrain` block over it.
  """
  model: Callable[..., nn.Module]
  part: str
  collection: str
  output: str = "reconstruction"
  recipe: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Method:
  """A registered loss: a pure function, or a Flax module class for learned parts.

  A module method is built as `fn(num_train=..., **hyper)` and called as
  `module(student, teacher, labels=..., index=..., train=...) -> scalar`; its
  parameters train with the student and its other collections (BatchNorm statistics,
  memory banks) live in the train state.
  """
  fn: Any
  inputs: str
  needs_labels: bool = False
  per_example: Any = None  # Same arguments as `fn`, returns the [B] values it averages.
  # Arguments of `fn` taken from the teacher's parameters when the objective is
  # resolved against the models: name -> fn(teacher params) (not set in a config).
  from_teacher: Mapping[str, Callable[[Any], Any]] = dataclasses.field(
      default_factory=dict)
  pretraining: Pretraining | None = None  # a part trained before the phase (FT)
  # Compares the student with itself on a second view (the term's `target_view`), not
  # with the teacher: domain alignment (CORAL, MMD) between source and target images.
  aligns_views: bool = False

  @property
  def is_module(self) -> bool:
    return isinstance(self.fn, type) and issubclass(self.fn, nn.Module)

  @property
  def hyper_parameters(self) -> tuple[str, ...]:
    """Keyword arguments of the loss that a term may set (temperature, p, ...)."""
    if self.is_module:
      return tuple(f.name for f in dataclasses.fields(self.fn)
                   if f.init and f.name not in ("parent", "name", "num_train",
                                                "bn_axis_name", "steps_per_epoch"))
    params = list(inspect.signature(self.fn).parameters.values())
    skip = (3 if self.needs_labels else 2) + (2 if self.inputs == EMBEDDING_LOGITS else 0)
    return tuple(p.name for p in params[skip:] if p.name not in self.from_teacher)


METHODS: Registry[Method] = Registry("distillation method",
                                      hint="set a distill.terms entry's method")


def register(name: str, fn: Any, inputs: str, needs_labels: bool = False,
             per_example: Any = None,
             from_teacher: Mapping[str, Callable[[Any], Any]] | None = None,
             pretraining: Pretraining | None = None, aligns_views: bool = False) -> None:
  """Makes `fn` usable as `method=name` in a config's `distill.terms`.

  `fn(student, teacher, [labels,] **hyper) -> scalar` for a pure loss, or a Flax
  module class (see `Method`) for a method with learned parameters or state.
  `per_example`, with the same arguments, returns the `[B]` values whose mean is
  `fn`'s; self-paced weights apply to the terms that have one. `pretraining`: a part
  of a module method trained by a phase of its own first (`Pretraining`).
  `aligns_views`: `fn(student on student_view, student on target_view)`, no teacher.
  """
  if inputs not in INPUTS:
    raise ValueError(f"inputs must be one of {', '.join(INPUTS)}; got {inputs!r}")
  METHODS.register(name, Method(fn, inputs, needs_labels, per_example,
                                dict(from_teacher or {}), pretraining, aligns_views))


def _teacher_classifier(params: Any) -> Any:
  """The zoo teacher's final Dense kernel `[D, K]` (`Classifier.head`)."""
  return params["classifier"]["kernel"]


def wkd(student_logits, teacher_logits, labels, classifier_kernel, kappa: float = 1.0,
        temperature: float = 2.0, gamma: float = 30.0, sinkhorn_lambda: float = 0.05,
        sinkhorn_iters: int = 10):
  """WKD-L (`losses.wkd_logit`) with the class cost from the teacher's classifier
  weights (`losses.wkd_cost_matrix`, sharpened by `kappa`)."""
  return losses.wkd_logit(student_logits, teacher_logits, labels,
                          losses.wkd_cost_matrix(classifier_kernel, kappa),
                          temperature=temperature, gamma=gamma,
                          sinkhorn_lambda=sinkhorn_lambda, sinkhorn_iters=sinkhorn_iters)


register("kd", losses.kd, LOGITS, per_example=losses.kd_per_example)
register("dkd", losses.dkd, LOGITS, needs_labels=True, per_example=losses.dkd_per_example)
register("lskd", losses.lskd, LOGITS, per_example=losses.lskd_per_example)
register("fitnet", losses.fitnet, FEATURES)
register("attention_transfer", losses.attention_transfer, FEATURES)
register("similarity_preserving", losses.similarity_preserving, FEATURES)
register("nst", losses.nst, FEATURES)
register("correlation_congruence", losses.correlation_congruence, EMBEDDING)
register("rkd", losses.rkd, EMBEDDING)
register("pkt", losses.pkt, EMBEDDING)
register("vid", losses.VID, FEATURES)
register("crd", losses.CRD, EMBEDDING)
register("review_kd", losses.ReviewKD, MULTI)
register("class_prior", losses.ClassPrior, LOGITS, needs_labels=True)
register("dist", losses.dist, LOGITS)
register("srd", losses.srd_standardized, EMBEDDING_LOGITS)
register("skd_instance", losses.skd_instance, LOGITS)
register("skd_direction", losses.skd_direction, LOGITS)
register("nkd", losses.nkd, LOGITS, needs_labels=True)
register("wkd", wkd, LOGITS, needs_labels=True,
         from_teacher={"classifier_kernel": _teacher_classifier})
register("mlkd", losses.mlkd, LOGITS)
# DeiT: the student's distillation head learns the teacher's decision (or its tempered
# distribution); the class head keeps the cross-entropy (distill.ce_weight).
register("deit", losses.deit, DISTILL_HEAD, per_example=losses.deit_per_example)
register("ctkd", losses.CTKD, LOGITS)
register("fsp", losses.fsp, MULTI)
register("activation_boundary", losses.activation_boundary, MULTI)
# FT: the paraphraser trains 30 epochs at a constant learning rate first (RepDistiller's
# init phase: SGD, the student's momentum and weight decay).
register("factor_transfer", losses.FactorTransfer, FEATURES, pretraining=Pretraining(
    lambda teacher, tap, rate=0.5: losses.ParaphraserOnTeacher(teacher, tap, rate),
    part="paraphraser", collection=losses.PARAPHRASER,
    recipe=dict(optimizer="sgd", epochs=30.0, schedule="constant", warmup_epochs=0.0)))
register("dist_plus", losses.dist_plus, EMBEDDING_LOGITS)
# Domain adaptation (kd_jax/workflows/domain.py): self-training on the teacher's
# confident predictions, and source/target alignment of the student's features.
register("pseudo_label", losses.pseudo_label, LOGITS,
         per_example=losses.pseudo_label_per_example)
register("coral", losses.coral, EMBEDDING, aligns_views=True)
register("mmd", losses.mmd, EMBEDDING, aligns_views=True)

# The keys of a `distill.terms` entry other than its method's hyper-parameters, with
# their defaults (teacher_tap None: the student's tap; name None: the method's name,
# with the tap of a feature term; pretrain: recipe keys of the pre-training phase of a
# method that has one, e.g. dict(epochs=1.0, learning_rate=0.01); labels: the batch key
# of a label-using term's labels, None: 'label', e.g. 'labels/coarse_label' for a
# `data.extra_labels` feature).
TERM_DEFAULTS = dict(method=None, weight=1.0, schedule="constant", warmup_epochs=0.0,
                     decay_epochs=(), student_tap=None, teacher_tap=None, name=None,
                     adapter=None, temperature_schedule="constant",
                     final_temperature=None, student_view=None, teacher_view=None,
                     target_view=None, pretrain=None, labels=None)
MAIN_VIEW = "image"  # the batch's own image (`kd_jax.data`: other views are `view/<name>`)
TEMPERATURE_SCHEDULES = ("constant", "linear", "cosine")
ADAPTERS = ("conv1x1", "linear")
SCHEDULES = ("constant", "linear_warmup", "cosine", "step")
SELF_PACED = ("none", "hard", "linear", "soft")
_SELF_PACED_DEFAULTS = dict(kind="none", start_threshold=2.0, final_threshold=6.0,
                            full_at_epoch=30.0, softness=0.25)
# The `distill` block of an experiment config: objective = ce_weight · CE (with
# label_smoothing) + Σ weight · term; `cache_teacher_logits` computes the teacher's
# logits once for the training split (needs data.augment='none'; teacher_cache.py).
# Views (`data.views`): CE is summed over `ce_views`; each term compares the student on
# its `student_view` (default `student_view`) with the teacher on its `teacher_view`
# (default `teacher_view`, None: the term's student view). `mixup_alpha` > 0 mixes
# every view of each device batch with the batch rolled by one (λ ~ Beta(α, α) per
# step, `train.mixup`) before teacher and student see it: function matching's inputs;
# labels are then meaningless, so CE and label-using terms are refused.
DEFAULTS = dict(ce_weight=1.0, terms=[], label_smoothing=0.0, cache_teacher_logits=False,
                self_paced=_SELF_PACED_DEFAULTS, ce_views=(MAIN_VIEW,),
                student_view=MAIN_VIEW, teacher_view=None, mixup_alpha=0.0)


class Views(dict):
  """{view name: value}: a model's outputs on several views of one batch."""


def view_of(value: Any, name: str) -> Any:
  """`value` on view `name` (the main view's where the batch has no such view, e.g. in
  evaluation); a plain value is the main view's."""
  if not isinstance(value, Views):
    return value
  return value[name] if name in value else value[MAIN_VIEW]


def default_config() -> ml_collections.ConfigDict:
  """The `distill` block of an experiment config, at its defaults (cross-entropy alone)."""
  config = ml_collections.ConfigDict(copy.deepcopy(DEFAULTS))
  config.teacher_view = ml_collections.config_dict.placeholder(str)
  return config


def weight_schedule(weight: float, kind: str = "constant", *, total_steps: int,
                    steps_per_epoch: int, warmup_epochs: float = 0.0,
                    decay_epochs: Sequence[float] = ()) -> optax.Schedule:
  """A term's weight as a function of the step (an optax schedule).

  constant: w.  linear_warmup: w·min(1, step / warmup) (DKD's warm-up).
  cosine: w·½(1 + cos(π·step/total)).  step: w·0.1^(number of decay epochs passed).
  """
  w = float(weight)
  if kind == "constant":
    return optax.constant_schedule(w)
  if kind == "linear_warmup":
    return optax.linear_schedule(0.0, w, max(1, round(warmup_epochs * steps_per_epoch)))
  if kind == "cosine":
    return optax.cosine_decay_schedule(w, max(1, total_steps))
  if kind == "step":
    boundaries = collections.Counter(math.ceil(e * steps_per_epoch) for e in decay_epochs)
    return optax.piecewise_constant_schedule(
        w, {step: 0.1 ** count for step, count in boundaries.items()})
  raise ValueError(f"unknown weight schedule {kind!r}; use one of {', '.join(SCHEDULES)}")


def temperature_schedule(start: float, end: float | None, kind: str, *,
                         total_steps: int) -> optax.Schedule | None:
  """A term's temperature (or the self-paced threshold) by step: from `start` to `end`
  linearly or along a cosine over `total_steps`, then `end` (optax schedules)."""
  if kind == "constant" or end is None:
    return None
  if kind == "linear":
    return optax.linear_schedule(float(start), float(end), max(1, total_steps))
  if kind == "cosine":
    if not start:
      raise ValueError("a cosine temperature schedule needs a non-zero start")
    return optax.cosine_decay_schedule(float(start), max(1, total_steps),
                                       alpha=float(end) / float(start))
  raise ValueError(f"unknown temperature_schedule {kind!r}; use one of "
                   f"{', '.join(TEMPERATURE_SCHEDULES)}")


def self_paced_weights(per_example_loss: jax.Array, threshold: jax.Array, kind: str,
                       softness: float = 0.25) -> jax.Array:
  """Per-example weights in [0, 1] from per-example losses and the threshold λ.

  hard: `1[l < λ]`; linear: `max(0, 1 − l / λ)`; soft: `sigmoid((λ − l) / softness)`.
  """
  if kind == "hard":
    return (per_example_loss < threshold).astype(per_example_loss.dtype)
  if kind == "linear":
    return jnp.maximum(0.0, 1.0 - per_example_loss / threshold)
  if kind == "soft":
    return jax.nn.sigmoid((threshold - per_example_loss) / softness)
  raise ValueError(f"distill.self_paced.kind={kind!r} is unknown; use one of "
                   f"{', '.join(SELF_PACED)}")


@dataclasses.dataclass(frozen=True)
class SelfPaced:
  """Self-paced example weights: `kind` against the threshold schedule `threshold`."""
  kind: str
  threshold: Callable[[jax.Array], jax.Array]
  softness: float = 0.25

  def __call__(self, step, per_example_loss: jax.Array
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(weights [B], logged parts: threshold, admitted share, mean weight)."""
    per_example_loss = lax.stop_gradient(per_example_loss)
    threshold = self.threshold(jnp.asarray(step))
    weights = self_paced_weights(per_example_loss, threshold, self.kind, self.softness)
    return weights, {
        "self_paced/threshold": threshold,
        "self_paced/admitted": jnp.mean((per_example_loss < threshold).astype(jnp.float32)),
        "self_paced/mean_weight": jnp.mean(weights)}


def build_self_paced(spec: Mapping[str, Any] | None, *,
                     steps_per_epoch: int) -> SelfPaced | None:
  """`distill.self_paced` as a `SelfPaced` (None when absent or kind='none').

  Absent or unset (None) fields take their defaults: thresholds 2 -> 6 nats by epoch
  30, softness 0.25.
  """
  spec = section("distill.self_paced", spec, _SELF_PACED_DEFAULTS)
  if spec["kind"] not in SELF_PACED:
    raise ValueError(f"distill.self_paced.kind={spec['kind']!r} is unknown; use one of "
                     f"{', '.join(SELF_PACED)}")
  if spec["kind"] == "none":
    return None
  start, final = float(spec["start_threshold"]), float(spec["final_threshold"])
  if not 0 < start <= final:
    raise ValueError("distill.self_paced needs 0 < start_threshold <= final_threshold, "
                     f"got {start} and {final}")
  if spec["softness"] <= 0:
    raise ValueError(f"distill.self_paced.softness must be positive, got "
                     f"{spec['softness']}")
  if spec["full_at_epoch"] < 0:
    raise ValueError("distill.self_paced.full_at_epoch must not be negative, got "
                     f"{spec['full_at_epoch']}")
  full_step = max(1, round(spec["full_at_epoch"] * steps_per_epoch))
  return SelfPaced(spec["kind"], temperature_schedule(start, final, "linear",
                                                      total_steps=full_step),
                   float(spec["softness"]))


class Adapter(nn.Module):
  """A learned connector from a student tap to a teacher tap's channels.

  conv1x1: 1×1 convolution + BatchNorm on NHWC maps (FitNet's regressor, as the
  reference implementations use it); linear: a dense projection of embeddings.
  """
  kind: str
  features: int
  bn_axis_name: str | None = None

  @nn.compact
  def __call__(self, x, train: bool):
    if self.kind == "conv1x1":
      x = nn.Conv(self.features, (1, 1), use_bias=False)(x)
      return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                          axis_name=self.bn_axis_name)(x)
    return nn.Dense(self.features)(x)


class Term(nn.Module):
  """One objective term: picks its inputs, applies its adapter, evaluates its loss."""
  name_: str
  method: Method
  weight: Callable[[jax.Array], jax.Array]
  student_tap: str | None
  teacher_tap: str | None
  hyper: Mapping[str, Any]
  adapter: str | None = None
  teacher_features: int = 0
  num_train: int = 0
  bn_axis_name: str | None = None
  temperature: Callable[[jax.Array], jax.Array] | None = None  # scheduled, by step
  steps_per_epoch: int = 1
  student_view: str = MAIN_VIEW
  teacher_view: str = MAIN_VIEW
  pretrain: Mapping[str, Any] | None = None  # the pre-training phase's recipe keys
  target_view: str | None = None  # the student's second view (`Method.aligns_views`)
  labels: str | None = None  # the batch key of its labels (None: the batch's labels)

  @nn.compact
  def __call__(self, s_logits, s_taps, t_logits, t_taps, labels, index, train: bool,
               step=None, example_weights=None):
    if self.method.aligns_views:  # the student's own outputs on the target view
      t_logits, t_taps = (view_of(s_logits, self.target_view),
                          view_of(s_taps, self.target_view))
    else:
      t_logits, t_taps = (view_of(t_logits, self.teacher_view),
                          view_of(t_taps, self.teacher_view))
    s_logits, s_taps = (view_of(s_logits, self.student_view),
                        view_of(s_taps, self.student_view))
    if self.method.inputs == LOGITS:
      s, t = s_logits, t_logits
    elif self.method.inputs == DISTILL_HEAD:
      s, t = s_taps[DISTILL_LOGITS], t_logits
    elif self.method.inputs == MULTI:
      s = tuple(s_taps[n] for n in self.student_tap)
      t = tuple(t_taps[n] for n in self.teacher_tap)
    else:
      s, t = s_taps[self.student_tap], t_taps[self.teacher_tap]
    if self.adapter:
      s = Adapter(self.adapter, self.teacher_features, self.bn_axis_name,
                  name="adapter")(s, train)
    if self.method.inputs == EMBEDDING_LOGITS:
      s, t = (s, s_logits), (t, t_logits)
    if self.method.is_module:
      fields = {f.name for f in dataclasses.fields(self.method.fn)}
      extra = {"steps_per_epoch": self.steps_per_epoch} if "steps_per_epoch" in fields else {}
      module = self.method.fn(num_train=self.num_train, bn_axis_name=self.bn_axis_name,
                              **extra, **self.hyper, name="method")
      takes_step = "step" in inspect.signature(module.__call__).parameters
      return module(s, t, labels=labels, index=index, train=train,
                    **({"step": step} if takes_step else {}))
    args = (s[0], t[0], s[1], t[1]) if self.method.inputs == EMBEDDING_LOGITS else (s, t)
    if self.method.needs_labels:
      args = (*args, labels)
    hyper = dict(self.hyper)
    if self.temperature is not None and step is not None:
      hyper["temperature"] = self.temperature(step)
    if example_weights is not None and self.method.per_example is not None:
      return jnp.mean(example_weights * self.method.per_example(*args, **hyper))
    return self.method.fn(*args, **hyper)


@dataclasses.dataclass(frozen=True)
class Objective:
  """ce_weight · CE + Σ weight_i(step) · term_i; returns the total and every part.

  Terms with learned parts (adapters, module methods) keep their parameters in
  `variables['params'][name]` and their other collections in `variables[collection]`.
  With `self_paced`, the CE and the per-example terms are weighted per example.
  """
  ce_weight: float
  terms: tuple[Term, ...]
  label_smoothing: float = 0.0
  self_paced: SelfPaced | None = None
  cache_teacher_logits: bool = False
  ce_views: tuple[str, ...] = (MAIN_VIEW,)
  mixup_alpha: float = 0.0

  @property
  def needs_teacher(self) -> bool:
    return any(not t.method.aligns_views for t in self.terms)

  @property
  def student_views(self) -> tuple[str, ...]:
    """The views the student runs on: the CE's and the terms', main view first."""
    return tuple(dict.fromkeys((MAIN_VIEW, *self.ce_views,
                                *(t.student_view for t in self.terms),
                                *(t.target_view for t in self.terms if t.target_view))))

  @property
  def teacher_views(self) -> tuple[str, ...]:
    """The views the teacher runs on (none without teacher terms)."""
    return tuple(dict.fromkeys(t.teacher_view for t in self.terms
                               if not t.method.aligns_views))

  def init(self, rng, s_logits, s_taps, t_logits, t_taps, labels, index) -> dict:
    """Variables of every term, keyed by term name inside each collection."""
    variables: dict[str, dict] = {}
    for i, term in enumerate(self.terms):
      v = term.init(jax.random.fold_in(rng, i), s_logits, s_taps, t_logits, t_taps,
                    labels, index, train=False)
      for collection, tree in v.items():
        variables.setdefault(collection, {})[term.name_] = tree
    return variables

  def __call__(self, step, variables, s_logits, s_taps, t_logits, t_taps, labels,
               index=None, *, train: bool = True, axis_name: str | None = None,
               batch: Mapping[str, Any] | None = None):
    """Returns (total, parts, updated non-param collections); a term with `labels`
    reads them from `batch`."""
    weights, self_paced_parts = None, {}
    if self.self_paced is None:
      ce = functools.reduce(operator.add, [
          losses.cross_entropy(view_of(s_logits, view), labels,
                               label_smoothing=self.label_smoothing)
          for view in self.ce_views])
    else:
      ce_each = functools.reduce(operator.add, [
          losses.cross_entropy_per_example(view_of(s_logits, view), labels,
                                           label_smoothing=self.label_smoothing)
          for view in self.ce_views])
      # The weights follow the mean CE over the views (the thresholds are in nats of
      # one CE); the loss keeps their sum.
      weights, self_paced_parts = self.self_paced(step, ce_each / len(self.ce_views))
      ce = jnp.mean(weights * ce_each)
    total = self.ce_weight * ce
    parts = {"ce": ce, **self_paced_parts}
    updates: dict[str, dict] = {}
    for term in self.terms:
      term_vars = {c: tree[term.name_] for c, tree in variables.items()
                   if term.name_ in tree}
      mutable = [c for c in term_vars if c != "params"] if train else False
      out = term.clone(bn_axis_name=axis_name).apply(
          term_vars, s_logits, s_taps, t_logits, t_taps,
          labels if term.labels is None else _batch_labels(batch, term), index,
          train=train,
          step=jnp.asarray(step), example_weights=weights,
          mutable=mutable)
      value, new = out if mutable is not False else (out, {})
      for collection, tree in new.items():
        updates.setdefault(collection, {})[term.name_] = tree
      weighted = term.weight(step) * value
      total = total + weighted
      parts[term.name_] = value
      parts[f"{term.name_}_weighted"] = weighted
    return total, parts, updates


def _batch_labels(batch: Mapping[str, Any] | None, term: Term) -> jax.Array:
  """The labels a term with `labels` reads from the batch."""
  if batch is None or term.labels not in batch:
    raise ValueError(f"term {term.name_} reads labels {term.labels!r}, which the batches "
                     "lack; add the feature to data.extra_labels")
  return batch[term.labels]


def build(distill_config: Mapping[str, Any], *, total_steps: int,
          steps_per_epoch: int, num_train: int = 0) -> Objective:
  """The objective from `config.distill` (`ce_weight`, `terms`); one-line errors."""
  distill = section("distill", distill_config, DEFAULTS)
  terms, names = [], set()
  for i, given in enumerate(distill["terms"]):
    where = f"distill.terms[{i}]"
    spec = {**TERM_DEFAULTS, **{k: v for k, v in dict(given).items() if v is not None}}
    method_name = spec["method"]
    if method_name not in METHODS:
      raise ValueError(f"{where}: {METHODS.unknown(method_name)}")
    method = METHODS.get(method_name)
    hyper = {k: v for k, v in spec.items() if k not in TERM_DEFAULTS}
    unknown = sorted(set(hyper) - set(method.hyper_parameters))
    if unknown:
      raise ValueError(f"{where}: {method_name} takes no {', '.join(unknown)}; "
                       f"its settings: {', '.join(method.hyper_parameters) or 'none'}")
    student_tap = spec["student_tap"] or (
        "embedding" if method.inputs in (EMBEDDING, EMBEDDING_LOGITS) else None)
    teacher_tap = spec["teacher_tap"] or student_tap
    if method.inputs in (FEATURES, MULTI) and not student_tap:
      raise ValueError(f"{where}: {method_name} compares feature maps; "
                       "set student_tap (and teacher_tap), e.g. student_tap='stage_2'")
    if method.inputs == MULTI:
      student_tap, teacher_tap = _names(student_tap), _names(teacher_tap)
      if len(student_tap) != len(teacher_tap):
        raise ValueError(f"{where}: {method_name} pairs taps one to one; student_tap "
                         f"has {len(student_tap)} names, teacher_tap {len(teacher_tap)}")
    name = spec["name"] or (method_name if method.inputs in (*TEACHER_LOGITS_ONLY, MULTI)
                            else f"{method_name}/{student_tap}")
    if name in names:
      raise ValueError(f"{where}: a second term named {name!r}; give it name='...'")
    names.add(name)
    if not spec["weight"] >= 0:
      raise ValueError(f"{where}: weight must not be negative (a negative weight lets the "
                       f"loss fall without bound), got {spec['weight']}")
    for key in ("temperature", "final_temperature"):
      if isinstance(spec.get(key), (int, float)) and not spec[key] > 0:
        raise ValueError(f"{where}: {key} must be positive, got {spec[key]}")
    if spec["schedule"] not in SCHEDULES:
      raise ValueError(f"{where}: unknown schedule {spec['schedule']!r}; "
                       f"use one of {', '.join(SCHEDULES)}")
    weight = weight_schedule(
        spec["weight"], spec["schedule"], total_steps=total_steps,
        steps_per_epoch=steps_per_epoch, warmup_epochs=spec["warmup_epochs"],
        decay_epochs=tuple(spec["decay_epochs"]))
    adapter = spec["adapter"]
    if adapter and (adapter not in ADAPTERS or method.inputs in TEACHER_LOGITS_ONLY):
      raise ValueError(f"{where}: adapter={adapter!r} is not available here; use "
                       f"{' or '.join(ADAPTERS)} on a feature or embedding term")
    temperature = None
    if spec["temperature_schedule"] != "constant":
      if "temperature" not in method.hyper_parameters or method.is_module:
        raise ValueError(f"{where}: {method_name} has no temperature to schedule; "
                         "remove temperature_schedule")
      start = hyper.get("temperature", inspect.signature(method.fn).parameters[
          "temperature"].default)
      temperature = temperature_schedule(
          float(start), spec["final_temperature"], spec["temperature_schedule"],
          total_steps=total_steps)
      if temperature is None:
        raise ValueError(f"{where}: temperature_schedule needs final_temperature")
    if method.aligns_views != bool(spec["target_view"]):
      raise ValueError(
          f"{where}: {method_name} compares the student on two views: set target_view, "
          "e.g. target_view='target'" if method.aligns_views else
          f"{where}: {method_name} compares the student with the teacher; remove "
          "target_view (coral and mmd take one)")
    if method.aligns_views and (adapter or spec["teacher_tap"] not in (None, student_tap)):
      raise ValueError(f"{where}: {method_name} compares the student with itself; "
                       "remove adapter and teacher_tap")
    if spec["pretrain"] is not None and method.pretraining is None:
      raise ValueError(f"{where}: {method_name} has no pre-training phase; remove pretrain")
    if spec["labels"] is not None and not method.needs_labels:
      raise ValueError(f"{where}: {method_name} uses no labels; remove labels")
    student_view = spec["student_view"] or distill["student_view"]
    teacher_view = spec["teacher_view"] or distill["teacher_view"] or student_view
    terms.append(Term(name, method, weight,
                      None if method.inputs in TEACHER_LOGITS_ONLY else student_tap,
                      None if method.inputs in TEACHER_LOGITS_ONLY else teacher_tap, hyper,
                      adapter=adapter, num_train=num_train, temperature=temperature,
                      student_view=student_view, teacher_view=teacher_view,
                      steps_per_epoch=max(1, steps_per_epoch),
                      pretrain=dict(spec["pretrain"] or {}),
                      target_view=spec["target_view"], labels=spec["labels"]))
  ce_views = tuple(distill["ce_views"])
  if not ce_views:
    raise ValueError("distill.ce_views names no view; use ('image',) and set "
                     "distill.ce_weight=0 for no cross-entropy")
  mixup = float(distill["mixup_alpha"])
  self_paced = build_self_paced(distill["self_paced"], steps_per_epoch=steps_per_epoch)
  if mixup < 0:
    raise ValueError(f"distill.mixup_alpha must be >= 0, got {mixup}")
  if mixup > 0:
    labelled = [t.name_ for t in terms if t.method.needs_labels]
    if float(distill["ce_weight"]) or labelled or self_paced is not None:
      raise ValueError("distill.mixup_alpha > 0 mixes images, so their labels no longer "
                       "hold: set distill.ce_weight=0 and use no label-using term "
                       f"({', '.join(labelled) or 'none here'}) or self-paced weights")
    if distill["cache_teacher_logits"]:
      raise ValueError("distill.mixup_alpha > 0 needs the teacher on the mixed images; "
                       "set distill.cache_teacher_logits=False")
  return Objective(float(distill["ce_weight"]), tuple(terms),
                   float(distill["label_smoothing"]), self_paced,
                   cache_teacher_logits=bool(distill["cache_teacher_logits"]),
                   ce_views=ce_views, mixup_alpha=mixup)


def _names(taps: str | Sequence[str]) -> tuple[str, ...]:
  return tuple(t.strip() for t in taps.split(",")) if isinstance(taps, str) else tuple(taps)


def resolve(objective: Objective, student_taps: Mapping[str, Any],
            teacher_taps: Mapping[str, Any], student_name: str,
            teacher_name: str, teacher_params: Any = None) -> Objective:
  """Checks every term's taps against the models (one-line errors) and sizes adapters.

  Returns the objective with each adapter's output width set to its teacher tap's and,
  given `teacher_params`, the arguments a method takes from the teacher's parameters
  (`Method.from_teacher`) filled in as constants.
  """
  resolved = []
  for term in objective.terms:
    if term.method.from_teacher and teacher_params is not None:
      term = term.clone(hyper={**term.hyper, **{
          name: np.asarray(fn(teacher_params))
          for name, fn in term.method.from_teacher.items()}})
    if term.method.inputs == DISTILL_HEAD and DISTILL_LOGITS not in student_taps:
      raise ValueError(f"term {term.name_}: student.name={student_name} has no "
                       f"distillation head (tap {DISTILL_LOGITS!r}); set student.name to "
                       "deit_tiny or deit_tiny_cifar, or use method='kd'")
    if term.method.inputs in TEACHER_LOGITS_ONLY:
      resolved.append(term)
      continue
    checks = ((term.student_tap, student_taps, student_name),
              (term.teacher_tap, teacher_taps, teacher_name))
    for names, taps, model in checks[:1] if term.method.aligns_views else checks:
      for tap in (names if term.method.inputs == MULTI else (names,)):
        if tap not in taps:
          kind = "module paths" if models.is_external(model) else "taps"
          raise ValueError(f"term {term.name_}: {model} has no tap {tap!r}; "
                           f"its {kind}: {', '.join(sorted(taps))}")
    if term.method.inputs == MULTI or term.method.aligns_views:
      resolved.append(term)
      continue
    s = tuple(student_taps[term.student_tap].shape)
    t = tuple(teacher_taps[term.teacher_tap].shape)
    if term.adapter == "conv1x1" and (len(s) != 4 or s[1:3] != t[1:3]):
      raise ValueError(f"term {term.name_}: adapter conv1x1 needs NHWC taps of equal "
                       f"spatial size, got student {s} and teacher {t}; pick other taps")
    if term.adapter == "linear" and len(s) != 2:
      raise ValueError(f"term {term.name_}: adapter linear maps embeddings [B, D], got "
                       f"student tap {term.student_tap} of shape {s}; use conv1x1")
    if term.adapter is None and _needs_equal_shapes(term) and s != t:
      hint = "conv1x1" if len(s) == 4 else "linear"
      raise ValueError(f"term {term.name_}: student tap {term.student_tap} has shape "
                       f"{s} but teacher tap {term.teacher_tap} has {t}; add "
                       f"adapter='{hint}' to the term")
    resolved.append(term.clone(teacher_features=t[-1]) if term.adapter else term)
  return dataclasses.replace(objective, terms=tuple(resolved))


def _needs_equal_shapes(term: Term) -> bool:
  return (term.method.fn in (losses.fitnet, losses.correlation_congruence)
          or term.method.inputs == EMBEDDING_LOGITS)
