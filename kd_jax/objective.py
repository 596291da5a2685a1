"""The distillation objective, declared in the config as a list of terms.

    objective = ce_weight · CE(student, labels) + Σ_i weight_i(step) · loss_i(student, teacher)

Each term names a method from `METHODS` (a pure loss of `kd_jax.losses`) and, for
feature and relation methods, the student and teacher taps it compares, e.g.

    distill.terms = [dict(method='kd', weight=0.9, temperature=4.0),
                     dict(method='attention_transfer', weight=1000.0,
                          student_tap='stage_2', teacher_tap='stage_2')]

Adding a method is one loss function and one `register(...)` call.
"""
from __future__ import annotations

import dataclasses
import inspect
import math
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp

from kd_jax import losses

# What a method compares: the two logits vectors, a pair of taps (feature maps), or a
# pair of taps that defaults to the penultimate embeddings.
LOGITS, FEATURES, EMBEDDING = "logits", "features", "embedding"


@dataclasses.dataclass(frozen=True)
class Method:
  fn: Callable[..., jax.Array]
  inputs: str
  needs_labels: bool = False

  @property
  def hyper_parameters(self) -> tuple[str, ...]:
    """Keyword arguments of the loss that a term may set (temperature, p, ...)."""
    params = list(inspect.signature(self.fn).parameters.values())
    skip = 3 if self.needs_labels else 2
    return tuple(p.name for p in params[skip:])


METHODS: dict[str, Method] = {}


def register(name: str, fn: Callable[..., jax.Array], inputs: str,
             needs_labels: bool = False) -> None:
  """Makes `fn(student, teacher, [labels,] **hyper)` usable as `method=name` in a config."""
  if inputs not in (LOGITS, FEATURES, EMBEDDING):
    raise ValueError(f"inputs must be one of {LOGITS}, {FEATURES}, {EMBEDDING}; got {inputs!r}")
  METHODS[name] = Method(fn, inputs, needs_labels)


register("kd", losses.kd, LOGITS)
register("dkd", losses.dkd, LOGITS, needs_labels=True)
register("fitnet", losses.fitnet, FEATURES)
register("attention_transfer", losses.attention_transfer, FEATURES)
register("similarity_preserving", losses.similarity_preserving, FEATURES)
register("nst", losses.nst, FEATURES)
register("correlation_congruence", losses.correlation_congruence, EMBEDDING)
register("rkd", losses.rkd, EMBEDDING)
register("pkt", losses.pkt, EMBEDDING)

_TERM_KEYS = ("method", "weight", "schedule", "warmup_epochs", "decay_epochs",
              "student_tap", "teacher_tap", "name")
SCHEDULES = ("constant", "linear_warmup", "cosine", "step")


def weight_schedule(weight: float, kind: str = "constant", *, total_steps: int,
                    steps_per_epoch: int, warmup_epochs: float = 0.0,
                    decay_epochs: Sequence[float] = ()) -> Callable[[jax.Array], jax.Array]:
  """A term's weight as a function of the step.

  constant: w.  linear_warmup: w·min(1, step / warmup) (DKD's warm-up).
  cosine: w·½(1 + cos(π·step/total)).  step: w·0.1^(number of decay epochs passed).
  """
  w = float(weight)
  if kind == "constant":
    return lambda step: jnp.asarray(w, jnp.float32)
  if kind == "linear_warmup":
    warm = max(1.0, warmup_epochs * steps_per_epoch)
    return lambda step: w * jnp.minimum(1.0, step.astype(jnp.float32) / warm)
  if kind == "cosine":
    return lambda step: w * 0.5 * (1 + jnp.cos(math.pi * jnp.minimum(
        step.astype(jnp.float32) / max(1, total_steps), 1.0)))
  if kind == "step":
    bounds = jnp.asarray([e * steps_per_epoch for e in decay_epochs], jnp.float32)
    return lambda step: w * 0.1 ** jnp.sum(step.astype(jnp.float32) >= bounds)
  raise ValueError(f"unknown weight schedule {kind!r}; use one of {', '.join(SCHEDULES)}")


@dataclasses.dataclass(frozen=True)
class Term:
  name: str
  method: Method
  weight: Callable[[jax.Array], jax.Array]
  student_tap: str | None
  teacher_tap: str | None
  hyper: Mapping[str, Any]

  def __call__(self, s_logits, s_taps, t_logits, t_taps, labels) -> jax.Array:
    if self.method.inputs == LOGITS:
      s, t = s_logits, t_logits
    else:
      s, t = s_taps[self.student_tap], t_taps[self.teacher_tap]
    args = (s, t, labels) if self.method.needs_labels else (s, t)
    return self.method.fn(*args, **self.hyper)


@dataclasses.dataclass(frozen=True)
class Objective:
  """ce_weight · CE + Σ weight_i(step) · term_i; returns the total and every part."""
  ce_weight: float
  terms: tuple[Term, ...]

  @property
  def needs_teacher(self) -> bool:
    return bool(self.terms)

  def __call__(self, step, s_logits, s_taps, t_logits, t_taps, labels):
    ce = losses.cross_entropy(s_logits, labels)
    total = self.ce_weight * ce
    parts = {"ce": ce}
    for term in self.terms:
      value = term(s_logits, s_taps, t_logits, t_taps, labels)
      weighted = term.weight(step) * value
      total = total + weighted
      parts[f"{term.name}"] = value
      parts[f"{term.name}_weighted"] = weighted
    return total, parts


def build(distill_config: Mapping[str, Any], *, total_steps: int,
          steps_per_epoch: int) -> Objective:
  """The objective from `config.distill` (`ce_weight`, `terms`); one-line errors."""
  terms, names = [], set()
  for i, spec in enumerate(distill_config.get("terms", ()) or ()):
    where = f"distill.terms[{i}]"
    spec = dict(spec)
    method_name = spec.get("method")
    if method_name not in METHODS:
      raise ValueError(f"{where}: unknown distillation method {method_name!r}; "
                       f"known methods: {', '.join(sorted(METHODS))}")
    method = METHODS[method_name]
    hyper = {k: v for k, v in spec.items() if k not in _TERM_KEYS}
    unknown = sorted(set(hyper) - set(method.hyper_parameters))
    if unknown:
      raise ValueError(f"{where}: {method_name} takes no {', '.join(unknown)}; "
                       f"its settings: {', '.join(method.hyper_parameters) or 'none'}")
    default_tap = "embedding" if method.inputs == EMBEDDING else None
    student_tap = spec.get("student_tap", default_tap)
    teacher_tap = spec.get("teacher_tap", student_tap)
    if method.inputs == FEATURES and not student_tap:
      raise ValueError(f"{where}: {method_name} compares feature maps; "
                       "set student_tap (and teacher_tap), e.g. student_tap='stage_2'")
    name = spec.get("name") or (method_name if method.inputs == LOGITS
                                else f"{method_name}/{student_tap}")
    if name in names:
      raise ValueError(f"{where}: a second term named {name!r}; give it name='...'")
    names.add(name)
    if spec.get("schedule", "constant") not in SCHEDULES:
      raise ValueError(f"{where}: unknown schedule {spec['schedule']!r}; "
                       f"use one of {', '.join(SCHEDULES)}")
    weight = weight_schedule(
        spec.get("weight", 1.0), spec.get("schedule", "constant"),
        total_steps=total_steps, steps_per_epoch=steps_per_epoch,
        warmup_epochs=spec.get("warmup_epochs", 0.0),
        decay_epochs=tuple(spec.get("decay_epochs", ())))
    terms.append(Term(name, method, weight,
                      None if method.inputs == LOGITS else student_tap,
                      None if method.inputs == LOGITS else teacher_tap, hyper))
  return Objective(float(distill_config.get("ce_weight", 1.0)), tuple(terms))


def check_taps(objective: Objective, student_taps: Mapping[str, Any],
               teacher_taps: Mapping[str, Any], student_name: str,
               teacher_name: str) -> None:
  """Fails in one line on a tap a model lacks or on mismatched shapes."""
  for term in objective.terms:
    if term.method.inputs == LOGITS:
      continue
    for tap, taps, model in ((term.student_tap, student_taps, student_name),
                             (term.teacher_tap, teacher_taps, teacher_name)):
      if tap not in taps:
        raise ValueError(f"term {term.name}: {model} has no tap {tap!r}; "
                         f"its taps: {', '.join(sorted(taps))}")
    s, t = student_taps[term.student_tap].shape, teacher_taps[term.teacher_tap].shape
    if term.method.fn is losses.fitnet and s != t:
      raise ValueError(f"term {term.name}: student tap {term.student_tap} has shape "
                       f"{tuple(s)} but teacher tap {term.teacher_tap} has {tuple(t)}; "
                       "pick taps of equal shape")
