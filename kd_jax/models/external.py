"""Any Flax linen module as a teacher or student, named by its import path.

``teacher.name`` / ``student.name`` of the form ``package.module:factory`` name a
callable returning a linen module whose ``__call__(x)`` returns logits ``[B, K]``. The
factory is called with ``num_classes=`` and the config's ``kwargs``, plus ``dtype`` and
``bn_axis_name`` where its signature takes them. `External` wraps the module so that it
returns ``(logits, taps)`` as the zoo's models do:

- taps are keyed by module path relative to the user's module (``"layer3"``,
  ``"layer4/block_1"``, ``"Conv_0"``): the ``__call__`` output of every submodule
  whose output is an array with the batch as leading dimension, recorded with
  ``nn.intercept_methods``. A module called several times keeps its last output. Under
  ``jit`` the taps no term reads are dead code, so recording them all costs nothing.
- ``"embedding"`` is the input of the last ``nn.Dense`` with ``num_classes`` outputs
  (the classifier), flattened to ``[B, D]``; a submodule named ``embedding`` takes
  precedence. A module without such a Dense has no embedding tap.
- ``train=`` is passed only when the module's ``__call__`` takes ``train``; a module
  without it must set BatchNorm's ``use_running_average`` from a field of its own.

The user's parameters sit at the top of the variables, as the module itself would
have them, so variables trained outside kd_jax load as they are.
"""
from __future__ import annotations

import importlib
import inspect
from typing import Any, Callable, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

NAME_KEYS = "teacher.name / student.name"


def is_import_path(name: str) -> bool:
  """Whether a model name is a ``package.module:factory`` import path (not a zoo name)."""
  return ":" in name


def _takes(fn: Callable, arg: str) -> bool:
  """Whether ``fn`` accepts the keyword ``arg`` (by name or through ``**kwargs``)."""
  try:
    params = inspect.signature(fn).parameters.values()
  except (TypeError, ValueError):
    return True  # a builtin or C callable: let the call decide
  return any(p.name == arg or p.kind == p.VAR_KEYWORD for p in params)


def factory(path: str, key: str = NAME_KEYS) -> Callable[..., nn.Module]:
  """The callable that ``path`` (``package.module:factory``) names; one-line errors."""
  module_name, _, attr = path.partition(":")
  if not module_name or not attr:
    raise ValueError(f"{key}={path!r} is not an import path; write "
                     "package.module:factory")
  try:
    obj = importlib.import_module(module_name)
  except Exception as e:  # pylint: disable=broad-except  (the user's module may raise anything)
    reason = str(e).splitlines()[0] if str(e) else type(e).__name__
    raise ValueError(f"{key}={path!r}: cannot import {module_name} ({reason}); check the "
                     "module is importable (on PYTHONPATH)") from None
  for part in attr.split("."):
    if not hasattr(obj, part):
      raise ValueError(f"{key}={path!r}: module {module_name} has no attribute {attr}; "
                       "fix the part after ':'")
    obj = getattr(obj, part)
  if not callable(obj):
    raise ValueError(f"{key}={path!r} names a {type(obj).__name__}, not a callable "
                     "returning a Flax module; fix the part after ':'")
  if not _takes(obj, "num_classes"):
    raise ValueError(f"{key}={path!r}: {attr} does not take num_classes; give the factory "
                     "a num_classes argument")
  return obj


def check(path: str, kwargs: Mapping[str, Any], key: str = NAME_KEYS) -> None:
  """Checks that ``path`` imports and that its factory takes ``kwargs``; one-line errors."""
  fn = factory(path, key)
  try:
    inspect.signature(fn).bind_partial(num_classes=1, **dict(kwargs))
  except TypeError as e:
    kwargs_key = key.replace(".name", ".kwargs")
    raise ValueError(f"{key}={path!r} does not take {kwargs_key}={dict(kwargs)} ({e}); "
                     f"fix {kwargs_key}") from None
  except ValueError:
    pass  # no signature to check against


def build(path: str, num_classes: int, kwargs: Mapping[str, Any], *, dtype: Any = None,
          bn_axis_name: Optional[str] = None) -> nn.Module:
  """The user's module: ``factory(num_classes=..., **kwargs)``, plus ``dtype`` and
  ``bn_axis_name`` where the factory takes them."""
  fn = factory(path)
  kw = dict(kwargs)
  if dtype is not None and _takes(fn, "dtype"):
    kw.setdefault("dtype", dtype)
  if bn_axis_name is not None and _takes(fn, "bn_axis_name"):
    kw.setdefault("bn_axis_name", bn_axis_name)
  try:
    module = fn(num_classes=num_classes, **kw)
  except TypeError as e:
    raise ValueError(f"{NAME_KEYS}={path!r} failed with the config's kwargs {dict(kwargs)} "
                     f"({e}); fix teacher.kwargs / student.kwargs") from None
  if not isinstance(module, nn.Module):
    raise ValueError(f"{NAME_KEYS}={path!r} returned a {type(module).__name__}, not a "
                     "flax.linen Module; make the factory return one")
  return module


class External(nn.Module):
  """A user's linen module (see the module docstring) returning ``(logits, taps)``.

  Attributes:
    factory: the import path ``package.module:factory``.
    num_classes: size of the logits.
    factory_kwargs: the config's ``kwargs`` for the factory, as ``(key, value)`` pairs.
    dtype: passed to the factory when it takes ``dtype``; else unused.
    bn_axis_name: passed to the factory when it takes ``bn_axis_name``; else unused.
    cpu_ops: accepted for the zoo's interface; unused.
  """
  factory: str
  num_classes: int
  factory_kwargs: tuple = ()
  dtype: Any = jnp.float32
  bn_axis_name: Optional[str] = None
  cpu_ops: bool = False

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False):
    user = build(self.factory, self.num_classes, dict(self.factory_kwargs),
                 dtype=self.dtype, bn_axis_name=self.bn_axis_name)
    nn.share_scope(self, user)  # the user's variables at the top, paths relative to it
    root, batch = len(self.path), x.shape[0]
    taps, classifier_inputs = {}, []

    def record(next_fun, args, kwargs, context):
      out = next_fun(*args, **kwargs)
      relative = context.module.path[root:]
      if context.method_name != "__call__" or not relative:
        return out
      if (isinstance(context.module, nn.Dense) and args
          and context.module.features == self.num_classes):
        classifier_inputs.append(args[0])
      if isinstance(out, jax.Array) and out.ndim and out.shape[0] == batch:
        taps["/".join(relative)] = out
      return out

    call_kw = {"train": train} if _takes(type(user).__call__, "train") else {}
    with nn.intercept_methods(record):
      logits = user(x, **call_kw)
    if not isinstance(logits, jax.Array) or logits.shape != (batch, self.num_classes):
      got = getattr(logits, "shape", type(logits).__name__)
      raise ValueError(f"{self.factory} returned {got}, not logits of shape "
                       f"{(batch, self.num_classes)}; an external model returns its logits "
                       "only")
    if classifier_inputs:
      taps.setdefault("embedding", classifier_inputs[-1].reshape(batch, -1))
    return logits.astype(jnp.float32), taps


def create(path: str, num_classes: int, *, dtype: Any = jnp.float32,
           bn_axis_name: Optional[str] = None, cpu_ops: Optional[bool] = None,
           **kwargs) -> External:
  """`External` for ``path``, checked: the factory imports and returns a linen module."""
  build(path, num_classes, kwargs, dtype=dtype, bn_axis_name=bn_axis_name)
  return External(path, num_classes, tuple(sorted(kwargs.items())), dtype=dtype,
                  bn_axis_name=bn_axis_name, cpu_ops=bool(cpu_ops))
