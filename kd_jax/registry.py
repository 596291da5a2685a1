"""Name -> object tables (models, methods, edge ops, augmentations, workflows).

One helper serves every table, so an unknown name fails the same way everywhere: one
line naming what was asked for, the closest known name, and every known name.
"""
from __future__ import annotations

import difflib
from typing import Any, Callable, Generic, Iterator, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
  """An ordered table of named entries of one kind.

  Example::

    WORKFLOWS = Registry("workflow", hint="set --config.workflow")
    WORKFLOWS.register("heads", heads.run)
    WORKFLOWS.get("head")  # ValueError: unknown workflow 'head'; did you mean 'heads'? ...
  """

  def __init__(self, kind: str, hint: str = ""):
    """`kind` names an entry in errors; `hint` says where the name came from."""
    self.kind, self.hint = kind, hint
    self._entries: dict[str, T] = {}

  def register(self, name: str, entry: T | None = None) -> Any:
    """Adds `entry` under `name`; without `entry`, a decorator that adds what it wraps."""
    if entry is None:
      def decorator(fn: Callable) -> Callable:
        self.register(name, fn)
        return fn
      return decorator
    if name in self._entries:
      raise ValueError(f"{self.kind} {name!r} is registered already")
    self._entries[name] = entry
    return entry

  def names(self) -> list[str]:
    """The registered names, in registration order."""
    return list(self._entries)

  def unknown(self, name: Any) -> str:
    """The one-line message for an unknown `name`."""
    close = difflib.get_close_matches(str(name), self._entries, n=1, cutoff=0.6)
    guess = f"did you mean {close[0]!r}? " if close else ""
    where = f"{self.hint} to " if self.hint else "use "
    return (f"unknown {self.kind} {name!r}; {guess}{where}one of "
            f"{', '.join(self._entries)}")

  def get(self, name: str) -> T:
    """The entry of `name`; ValueError with a did-you-mean hint for an unknown one."""
    if name not in self._entries:
      raise ValueError(self.unknown(name))
    return self._entries[name]

  def items(self) -> list[tuple[str, T]]:
    """(name, entry) pairs, in registration order."""
    return list(self._entries.items())

  def __getitem__(self, name: str) -> T:
    return self.get(name)

  def __contains__(self, name: object) -> bool:
    return name in self._entries

  def __iter__(self) -> Iterator[str]:
    return iter(self._entries)

  def __len__(self) -> int:
    return len(self._entries)


def section(name: str, spec: Any, defaults: dict[str, Any]) -> dict[str, Any]:
  """A config section with its owner's `defaults` for absent or unset (None) keys.

  The module that reads a section owns its defaults and passes them here; an unknown
  key fails in one line with the closest known key.
  """
  given = {key: value for key, value in dict(spec or {}).items() if value is not None}
  for key in given:
    if key not in defaults:
      close = difflib.get_close_matches(key, defaults, n=1, cutoff=0.6)
      guess = f"did you mean {close[0]!r}? " if close else ""
      raise ValueError(f"{name} has no key {key!r}; {guess}its keys: "
                       f"{', '.join(defaults)}")
  return {**defaults, **given}
