"""Preemption: SIGTERM (and SIGINT) end a run after saving, not in the middle of a step.

Clusters (SLURM, Kubernetes, Cloud TPU) send SIGTERM, then SIGKILL after a grace period.
While a phase trains (`kd_jax.phase`), a signal only sets a flag: the phase finishes the
step it is in, saves a checkpoint of that step, flushes its metrics and raises
`Preempted`; rerunning the same command resumes from that step, bit-identically. A
signal anywhere else (loading data, evaluating, exporting: what is already saved stays
saved) raises `Preempted` at once, as Ctrl-C would. A second signal during the save is
noted and ignored, so it cannot cut the checkpoint short.

In a multi-process run JAX's preemption service receives SIGTERM on every host and the
hosts agree on the step to save at (`multihost_utils.reached_preemption_sync_point`).

Only the `kd-jax` command installs the handlers (`install`); `import kd_jax` does not.
"""
from __future__ import annotations

import contextlib
import signal
import sys
import threading
from typing import Iterator

# Exit statuses of `kd-jax` after a preemption that saved its work: the shell's
# convention for a process ended by the signal, so schedulers treat it as one.
EXIT_STATUS = {signal.SIGTERM: 128 + signal.SIGTERM, signal.SIGINT: 128 + signal.SIGINT}


class Preempted(Exception):
  """A run stopped by a signal; `saved` says what was saved where (or is None)."""

  def __init__(self, signum: int, saved: str | None = None):
    self.signum, self.saved = signum, saved
    name = signal.Signals(signum).name
    where = f"saved {saved}" if saved else "nothing unsaved was lost"
    super().__init__(f"stopped by {name}: {where}; rerun the same command to resume")


_received: list[int] = []  # signals received, in order
_deferring = 0  # > 0 while a phase trains: signals are acted on between steps
_installed = False


def install() -> None:
  """Handles SIGTERM and SIGINT in a single-process run (with several processes JAX's
  preemption service owns SIGTERM, and SIGINT stops a host at once)."""
  global _installed
  if threading.current_thread() is not threading.main_thread():
    return
  for signum in (signal.SIGINT, signal.SIGTERM):
    signal.signal(signum, _handle)
  _installed = True


def uninstall() -> None:
  global _installed
  if _installed and threading.current_thread() is threading.main_thread():
    for signum in (signal.SIGINT, signal.SIGTERM):
      signal.signal(signum, signal.SIG_DFL if signum == signal.SIGTERM
                    else signal.default_int_handler)
  _installed = False
  _received.clear()


def _handle(signum, frame) -> None:
  del frame
  first = not _received
  _received.append(signum)
  if _deferring:
    name = signal.Signals(signum).name
    message = (f"[kd-jax] {name} received: saving at the end of this step"
               if first else f"[kd-jax] {name} received again: still saving, ignored")
    print(message, file=sys.stderr, flush=True)
    return
  raise Preempted(signum)


def requested() -> int | None:
  """The first signal received (while deferring), or None."""
  return _received[0] if _received else None


@contextlib.contextmanager
def deferred() -> Iterator[None]:
  """Signals inside only set the flag (`requested`); the caller saves and stops."""
  global _deferring
  _deferring += 1
  try:
    yield
  finally:
    _deferring -= 1


def should_stop(step: int) -> bool:
  """Whether to save at `step` and stop: a signal was received here, or (several
  processes) every host reached the step JAX's preemption service chose."""
  import jax
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    try:
      if multihost_utils.reached_preemption_sync_point(step):
        _received.append(signal.SIGTERM)
        return True
    except RuntimeError:  # the preemption service is off
      pass
    return False
  return bool(_received)
