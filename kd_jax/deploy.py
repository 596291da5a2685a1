"""The deployment check: which exported variants fit a target device's budget, and which
to ship.

A budget is the `export.target` block of a run's config (`default_target`): a limit on
each measured quantity of an export row (`kd_jax.export.measure`), a value of 0 or
unset meaning no limit:

  latency_ms       single-image latency in the LiteRT interpreter, median, at 1 thread
                   (row key `latency_ms`) or at all the host's threads
                   (`latency_all_threads_ms`), as `latency_threads` ('1' / 'all') says
  bytes            the flatbuffer's size (`bytes`)
  memory_bytes     peak memory of one inference on the host (`peak_memory_bytes`,
                   labelled by `memory_kind`: the LiteRT runtime's, weights included)
  arena_bytes      the activation tensors alive at once (`arena_bytes`, planned from
                   the graph: `kd_jax.energy.activation_arena_bytes`), what a
                   microcontroller's tensor arena must hold beside the weights in flash
  energy_uj        energy per inference (`energy.uj`, labelled `measured` (RAPL) or
                   `estimated` (from the graph) by `energy.kind`)
  min_accuracy     top-1 on the eval split, a fraction (0.95 = 95%), at least this

`preset` names one of `PRESETS`; keys set beside it override the preset's figures
(0 lifts a limit). A row that did not measure a quantity under a limit cannot be
confirmed to meet it and does not fit. The pick is the most accurate row meeting every
limit; ties go to the smaller flatbuffer, then to the row listed first.

Presets (what the target offers one model; cite the figures when you change them):

  mcu    Cortex-M7-class microcontroller (STM32F7/H7, the MLPerf Tiny boards: 1 MB flash,
         320 KB-1 MB SRAM). bytes ≤ 524,288 (512 KiB: half the flash, the rest for the
         TFLite Micro runtime and the application); arena_bytes ≤ 262,144 (a 256 KiB
         tensor arena beside stacks and I/O buffers; the host's peak memory, a desktop
         runtime's, says nothing of the board's); energy_uj ≤ 1,000 (1 mJ: a 225 mAh
         3 V coin cell, about 2.4 kJ, then lasts 2.4 million inferences, one every 10 s
         for about 9 months). No latency limit: the latency is timed on the host that
         exports, a desktop- or server-class core tens of times faster than a Cortex-M,
         so it says nothing about the microcontroller's (set `latency_ms` from a
         measurement on the board).
  phone  a mid-range phone, one big core (Cortex-A76 class), the model shipped inside
         the app. latency_ms ≤ 16 at 1 thread (one 60 Hz frame, 16.7 ms; a host core is
         1-3× a phone core, so leave headroom); bytes ≤ 20,000,000 (a small share of a
         typical app download); memory_bytes ≤ 67,108,864 (64 MiB, comfortable on a
         3-4 GB phone); energy_uj ≤ 5,000 (5 mJ: at 30 inferences/s for an hour,
         1% of a 15 Wh battery).
  sbc    a Raspberry Pi 4-class single-board computer (4× Cortex-A72, 1 GB and up, mains
         powered). latency_ms ≤ 100 at all threads (a 10 frames/s camera pipeline);
         bytes ≤ 100,000,000; memory_bytes ≤ 268,435,456 (256 MiB); no energy limit.

`strict` True makes `kd-jax export` end with exit status 3 when no row fits (after
writing everything); otherwise it exits 0 and the text says what each row misses.

`check(rows, target)` evaluates export rows ({label: row}, as in `export.json`);
`write(result, out_dir)` writes `deploy.json` and `deploy.md` there.
"""
from __future__ import annotations

import math
import os
from typing import Any, Mapping

import ml_collections
from ml_collections import config_dict

from kd_jax import files

# The limits, in table order; 0 or unset: no limit.
LIMITS = ("latency_ms", "bytes", "memory_bytes", "arena_bytes", "energy_uj",
          "min_accuracy")
_NAMES = dict(latency_ms="latency", bytes="bytes", memory_bytes="peak memory",
              arena_bytes="activation arena",
              energy_uj="energy", min_accuracy="accuracy")
LATENCY_KEYS = {"1": "latency_ms", "all": "latency_all_threads_ms"}
PRESETS = {
    "mcu": dict(bytes=524_288, arena_bytes=262_144, energy_uj=1_000.0),
    "phone": dict(latency_ms=16.0, latency_threads="1", bytes=20_000_000,
                  memory_bytes=67_108_864, energy_uj=5_000.0),
    "sbc": dict(latency_ms=100.0, latency_threads="all", bytes=100_000_000,
                memory_bytes=268_435_456),
}
_TYPES = dict(latency_ms=float, latency_threads=str, bytes=int, memory_bytes=int,
              arena_bytes=int, energy_uj=float, min_accuracy=float)
DEPLOY_JSON, DEPLOY_MD = "deploy.json", "deploy.md"


class NothingFits(Exception):
  """`export.target.strict` is set and no exported variant meets every limit."""


def default_target() -> ml_collections.ConfigDict:
  """The `export.target` block: no preset, every limit unset (no check is made)."""
  block = {key: config_dict.placeholder(kind) for key, kind in _TYPES.items()}
  return ml_collections.ConfigDict(dict(preset=config_dict.placeholder(str), strict=False,
                                        **block))


def budget(target: Mapping[str, Any]) -> dict[str, Any]:
  """The limits `target` sets: its preset's figures with its own keys on top.

  Returns:
    dict(preset, latency_threads, and each key of `LIMITS` that limits: a positive
    number); {} when nothing is limited (no preset, no key set).

  Raises:
    ValueError: an unknown preset or key, a negative limit, a `latency_threads` other
      than '1' / 'all', a `min_accuracy` above 1; the message names the config key.
  """
  target = dict(target.items())
  unknown = sorted(set(target) - set(_TYPES) - {"preset", "strict"})
  if unknown:
    raise ValueError(f"unknown config key export.target.{unknown[0]}; the keys of "
                     f"export.target are preset, strict, {', '.join(_TYPES)}")
  preset = target.get("preset")
  if preset and preset not in PRESETS:
    raise ValueError(f"export.target.preset={preset!r} is unknown (from --target or "
                     f"--config.export.target.preset); use one of {', '.join(PRESETS)}")
  merged = dict(PRESETS.get(preset, {})) if preset else {}
  merged.update({k: v for k, v in target.items() if k in _TYPES and v is not None})
  threads = str(merged.pop("latency_threads", "1"))
  if threads not in LATENCY_KEYS:
    raise ValueError(f"export.target.latency_threads must be '1' or 'all', got {threads!r}")
  for key, value in merged.items():
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      raise ValueError(f"export.target.{key} must be a number, got {value!r}")
    if not math.isfinite(value) or value < 0:
      raise ValueError(f"export.target.{key} must be a non-negative number (0: no "
                       f"limit), got {value}")
  if merged.get("min_accuracy", 0) > 1:
    raise ValueError("export.target.min_accuracy is a fraction (0.95 for 95%), got "
                     f"{merged['min_accuracy']}")
  limits = {k: merged[k] for k in LIMITS if merged.get(k)}
  if not limits:
    return {}
  return dict(preset=preset or None, latency_threads=threads, **limits)


def check_target(target: Mapping[str, Any]) -> None:
  """One-line errors for an `export.target` block (see `budget`)."""
  budget(target)


def _measured(row: Mapping[str, Any], key: str, threads: str
              ) -> tuple[float | None, str | None]:
  """(the row's value under limit `key`, its label: measured / estimated / None)."""
  if key == "latency_ms":
    return row.get(LATENCY_KEYS[threads]), None
  if key == "bytes":
    return row.get("bytes"), None
  if key == "memory_bytes":
    return row.get("peak_memory_bytes"), row.get("memory_kind")
  if key == "arena_bytes":
    arena = row.get("arena_bytes")
    return arena, "planned" if arena is not None else None
  if key == "energy_uj":
    energy = row.get("energy") or {}
    return energy.get("uj"), energy.get("kind")
  return row.get("accuracy"), None


def check_row(row: Mapping[str, Any], limits: Mapping[str, Any]) -> list[dict[str, Any]]:
  """One dict per limit: budget, measured (None: not measured), limit, kind, status
  ('meets', 'fails' or 'not measured')."""
  checks = []
  for key in LIMITS:
    if key not in limits:
      continue
    value, kind = _measured(row, key, limits["latency_threads"])
    if value is None:
      status = "not measured"
    elif key == "min_accuracy":
      status = "meets" if value >= limits[key] else "fails"
    else:
      status = "meets" if value <= limits[key] else "fails"
    checks.append(dict(budget=key, measured=value, limit=limits[key], kind=kind,
                       status=status))
  return checks


def check(rows: Mapping[str, Mapping[str, Any]], target: Mapping[str, Any],
          machines: str = "") -> dict[str, Any] | None:
  """Which rows meet `target`, and the pick; None when `target` limits nothing.

  Args:
    rows: {label: export row} (`export.json`).
    target: an `export.target` block.
    machines: where the latencies were measured (`export.machines_line`), kept in the
      result.

  Returns:
    dict(target=budget(target), strict, machines, rows={label: dict(fits, checks)},
    pick=label or None, reason=why the pick, or what each row misses).
  """
  limits = budget(target)
  if not limits:
    return None
  checked = {}
  for label, row in rows.items():
    checks = check_row(row, limits)
    checked[label] = dict(fits=all(c["status"] == "meets" for c in checks),
                          checks=checks)
  fitting = [label for label in rows if checked[label]["fits"]]
  pick = None
  if fitting:
    def rank(label):
      accuracy, size = rows[label].get("accuracy"), rows[label].get("bytes")
      return (math.inf if accuracy is None else -accuracy,
              math.inf if size is None else size)
    pick = min(fitting, key=rank)  # min keeps the first listed among equals
    accuracy, size = rows[pick].get("accuracy"), rows[pick].get("bytes")
    reason = (f"the most accurate of the {len(fitting)} variant"
              f"{'s' if len(fitting) > 1 else ''} meeting every limit (accuracy "
              f"{'not measured' if accuracy is None else f'{accuracy:.4f}'}, "
              f"{'size not measured' if size is None else f'{size:,} bytes'}; ties go "
              "to fewer bytes)")
  elif rows:
    misses = []
    for label in rows:
      missed = [_miss(c) for c in checked[label]["checks"] if c["status"] != "meets"]
      misses.append(f"{label} ({', '.join(missed)})")
    reason = "no exported variant meets every limit: " + "; ".join(misses)
  else:
    reason = "nothing was exported"
  return dict(target=limits, strict=bool(dict(target.items()).get("strict")),
              machines=machines, rows=checked, pick=pick, reason=reason)


def _number(key: str, value: float) -> str:
  if key in ("bytes", "memory_bytes", "arena_bytes"):
    return f"{value:,.0f} B"
  if key == "latency_ms":
    return f"{value:.3g} ms"
  if key == "energy_uj":
    return f"{value:,.4g} µJ"
  return f"{value:.4f}"


def _value(c: Mapping[str, Any]) -> str:
  """'12.8 µJ estimated', '0.025 ms', 'not measured'."""
  if c["measured"] is None:
    return "not measured"
  text = _number(c["budget"], c["measured"])
  return f"{text} {c['kind']}" if c["kind"] else text


def _miss(c: Mapping[str, Any]) -> str:
  """'bytes 323,444 B > 100,000 B' or 'peak memory not measured'."""
  name = _NAMES[c["budget"]]
  if c["measured"] is None:
    return f"{name} not measured"
  sign = "<" if c["budget"] == "min_accuracy" else ">"
  return f"{name} {_value(c)} {sign} {_number(c['budget'], c['limit'])}"


def _cell(c: Mapping[str, Any]) -> str:
  mark = {"meets": "✓", "fails": "✗", "not measured": "?"}[c["status"]]
  if c["measured"] is None:
    return f"{mark} not measured"
  sign = {("meets", True): "≥", ("fails", True): "<", ("meets", False): "≤",
          ("fails", False): ">"}[c["status"], c["budget"] == "min_accuracy"]
  return f"{mark} {_value(c)} {sign} {_number(c['budget'], c['limit'])}"


def budget_line(limits: Mapping[str, Any]) -> str:
  """'latency ≤ 16 ms (1 thread), bytes ≤ 20,000,000 B, ...'."""
  parts = []
  for key in LIMITS:
    if key in limits:
      sign = "≥" if key == "min_accuracy" else "≤"
      extra = (f" ({'1 thread' if limits['latency_threads'] == '1' else 'all threads'})"
               if key == "latency_ms" else "")
      parts.append(f"{_NAMES[key]} {sign} {_number(key, limits[key])}{extra}")
  return ", ".join(parts)


def markdown(result: Mapping[str, Any]) -> str:
  """deploy.md: the budget, one row per variant with each limit's verdict, the pick."""
  limits = result["target"]
  name = limits["preset"] or "custom"
  keys = [k for k in LIMITS if k in limits]
  lines = [f"# Deployment check: target {name}", "",
           f"Budget: {budget_line(limits)}.", "",
           "| variant | fits | " + " | ".join(_NAMES[k] for k in keys) + " |",
           "|---|---|" + "---|" * len(keys)]
  for label, row in result["rows"].items():
    lines.append(f"| {label} | {'yes' if row['fits'] else 'no'} | "
                 + " | ".join(_cell(c) for c in row["checks"]) + " |")
  lines += ["", (f"Pick: **{result['pick']}**, {result['reason']}."
                 if result["pick"] else
                 f"**Nothing fits.** {result['reason'][0].upper()}{result['reason'][1:]}.")]
  notes = []
  if "latency_ms" in limits:
    notes.append(f"Latency is the host's ({result['machines'] or 'machine not recorded'}),"
                 " not the target's: confirm it on the device.")
  if "energy_uj" in limits:
    notes.append("Energy is per inference at 1 thread, `measured` (RAPL, the whole CPU "
                 "package) or `estimated` (45 nm figures, kd_jax/energy.py), as labelled.")
  notes.append("A limit on a quantity a variant did not measure cannot be confirmed "
               "(`?`): that variant does not fit.")
  return "\n".join(lines + [""] + notes) + "\n"


def write(result: Mapping[str, Any], out_dir: str) -> str:
  """Writes `<out_dir>/deploy.json` (the result) and `deploy.md`; returns the Markdown."""
  os.makedirs(out_dir, exist_ok=True)
  files.write_json(os.path.join(out_dir, DEPLOY_JSON), result)
  text = markdown(result)
  files.write_atomic(os.path.join(out_dir, DEPLOY_MD), text)
  return text
