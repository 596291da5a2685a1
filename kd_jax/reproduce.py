"""`kd-jax reproduce`: the CIFAR-100 tables of CRD and DKD, measured beside the published.

    kd-jax reproduce --workdir=runs/crd --pairs=resnet32x4-resnet8x4 --methods=kd,dkd

For the chosen pairs and methods of experiments/cifar100_crd.py (all of them by
default; a method without a run for a pair, `cifar100_crd.unavailable`, is skipped
with a log line) this trains each distinct teacher once (`DIR/teachers/<teacher>`), each pair's
CE-only student once (`DIR/<pair>/vanilla`: the table's student column) and each
method's student from the trained teacher (`DIR/<pair>/<method>`), then writes
`DIR/reproduce.json` and `DIR/reproduce.md`: per run, the measured top-1 (%) of the
teacher, the vanilla student and the method beside the published numbers, and the
differences. Rerunning the command resumes every unfinished run (each is a
`kd-jax distill` run with its own config.json and checkpoints) and reads finished ones
back from their summary.json. With `--seeds=N` every student run (vanilla and each
method) is repeated with seeds 0..N-1 from the same teacher (`DIR/<pair>/<method>`,
then `<method>@seed1`, ...) and the table gives mean ± std (sample std) over the seeds,
for the last epoch and for the best-by-validation checkpoint — published tables differ
in which they quote, and mdistiller's average several runs. From a notebook:
`run(pairs, methods, workdir, seeds=N)`.
"""
from __future__ import annotations

import json
import os
import statistics
from typing import Any, Optional, Sequence

import jax
import ml_collections

from kd_jax import configs
from kd_jax import experiment
from kd_jax.experiments import cifar100_crd
from kd_jax.metric_writer import log

CONFIG_FILE = "experiments/cifar100_crd.py"
VANILLA = "vanilla"
QUANTITIES = ("teacher", "student", "method")  # top-1 of each, per row


def _select(names: Optional[Sequence[str] | str], known: Sequence[str],
            what: str) -> list[str]:
  """`names` (or 'a,b') in order without repeats (all of `known` if empty); one-line errors."""
  if isinstance(names, str):
    names = [n.strip() for n in names.split(",") if n.strip()]
  if not names:
    return list(known)
  unknown = [n for n in names if n not in known]
  if unknown:
    raise ValueError(f"unknown {what} {', '.join(map(repr, unknown))}; known {what}s: "
                     f"{', '.join(known)}")
  return list(dict.fromkeys(names))


def variant(pair: str, method: str, tiny: bool = False) -> str:
  """The `get_config` variant of cifar100_crd.py for one run."""
  return f"{pair}:{method}" + (":tiny" if tiny else "")


def run_config(pair: str, method: str, tiny: bool = False, *,
               data_dir: Optional[str] = None,
               export: bool = False) -> ml_collections.ConfigDict:
  """One run's config: the benchmark variant, TFLite export off unless `export`."""
  config = cifar100_crd.get_config(variant(pair, method, tiny))
  if data_dir:
    config.data.data_dir = data_dir
  if not export:
    config.export.variants = ()
  return configs.validate(config)


def _teacher_part(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """What defines a run's teacher; saved beside it so a different one is refused."""
  return ml_collections.ConfigDict(dict(seed=config.seed, data=config.data.to_dict(),
                                        teacher=config.teacher.to_dict()))


def _shared_teacher_config(config: ml_collections.ConfigDict,
                           teacher_dir: str) -> ml_collections.ConfigDict:
  """The config that trains the teacher shared by every pair naming it.

  A teacher folder is shared across pairs (and across `reproduce` calls with other
  students): the run config saved there is reused when its teacher part (seed, data,
  teacher) equals this one's; a different teacher part is refused, naming the keys.
  """
  if not os.path.exists(os.path.join(teacher_dir, "config.json")):
    return config
  saved = configs.load_run_config(teacher_dir)
  old, new = (json.loads(_teacher_part(c).to_json(sort_keys=True)) for c in (saved, config))
  if old != new:
    diff = sorted(configs.diff_keys(old, new))
    raise ValueError(f"{teacher_dir} holds a teacher of another config (differs at "
                     f"{', '.join(diff[:4])}); use a new --workdir")
  return saved


def _distill(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """The summary of a finished `kd-jax distill` run in `workdir`, running it if needed."""
  configs.save_run_config(config, workdir)  # refuses a workdir of another config
  path = os.path.join(workdir, "summary.json")
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  return experiment.distill(config, workdir)


def _percent(accuracy: Optional[float]) -> Optional[float]:
  return None if accuracy is None else 100.0 * accuracy


def run(pairs: Optional[Sequence[str]], methods: Optional[Sequence[str]], workdir: str,
        tiny: bool = False, *, data_dir: Optional[str] = None,
        export: bool = False, seeds: int = 1) -> list[dict[str, Any]]:
  """Runs (or resumes) the chosen pairs × methods; returns the rows of the table.

  Args:
    pairs: names of `cifar100_crd.PAIRS` ('resnet32x4-resnet8x4', ...) as a sequence
      or a comma-separated string; None: all.
    methods: names of `cifar100_crd.METHODS` ('kd', 'dkd', ...), likewise; None: all.
    workdir: where every run, reproduce.json and reproduce.md go.
    tiny: the `:tiny` flavour of each config (kd_digits, 1 epoch, small models).
    data_dir: TFDS data directory holding cifar100 (`data.data_dir`).
    export: also export each student to TFLite (off: accuracy is what the table needs).
    seeds: student runs per pair × method (seeds 0..seeds-1); the teacher is shared.

  Returns:
    One dict per pair × method: `pair`, `method`, `teacher`, `student` (model names),
    `config`, `workdir`, `seeds`, and `measured`, `best_by_validation`, `published`,
    `difference` (measured − published), each a dict of top-1 (%) for `teacher`,
    `student` (vanilla), `method` (students: the mean over seeds), and `std`,
    `best_by_validation_std` (sample std over seeds; None for one seed).

  Raises:
    ValueError: an unknown pair or method (one line, listing the known ones).
  """
  pairs = _select(pairs, list(cifar100_crd.PAIRS), "pair")
  methods = _select(methods, cifar100_crd.METHODS, "method")
  if seeds < 1:
    raise ValueError(f"--seeds must be at least 1, got {seeds}")
  for pair in pairs:  # AB and FSP have no cross-architecture runs
    for method in methods:
      if cifar100_crd.unavailable(cifar100_crd.PAIRS[pair], method):
        log(f"reproduce: skipping {pair} {method}: "
            f"{cifar100_crd.unavailable(cifar100_crd.PAIRS[pair], method)}")
  chosen = {pair: [m for m in methods
                   if not cifar100_crd.unavailable(cifar100_crd.PAIRS[pair], m)]
            for pair in pairs}
  runs = {(pair, method, seed): _seeded(
      run_config(pair, method, tiny, data_dir=data_dir, export=export), seed)
      for pair in pairs for method in dict.fromkeys([VANILLA, *chosen[pair]])
      for seed in range(seeds)}

  teacher_dirs: dict[str, str] = {}
  for config in runs.values():
    name = config.teacher.name
    if name not in teacher_dirs:
      teacher_dirs[name] = os.path.join(workdir, "teachers", name)
      log(f"reproduce: teacher {name} in {teacher_dirs[name]}")
      experiment.train_teacher(_shared_teacher_config(_seeded(config, 0),
                                                      teacher_dirs[name]),
                               teacher_dirs[name])

  summaries = {}
  for (pair, method, seed), config in runs.items():
    config.teacher.checkpoint = teacher_dirs[config.teacher.name]
    run_dir = os.path.join(workdir, pair, method + (f"@seed{seed}" if seed else ""))
    log(f"reproduce: {pair} {method} seed {seed} in {run_dir}")
    summaries[pair, method, seed] = _distill(config, run_dir)

  rows = []
  for pair in pairs:
    for method in chosen[pair]:
      config = runs[pair, method, 0]
      of = lambda m: [summaries[pair, m, seed] for seed in range(seeds)]
      last = dict(teacher=[_percent(of(method)[0]["teacher_accuracy"])],
                  student=[_percent(s["distilled_accuracy"]) for s in of(VANILLA)],
                  method=[_percent(s["distilled_accuracy"]) for s in of(method)])
      # Best-by-validation: where the run held out a validation split, the test top-1
      # of each phase's best validation checkpoint (the published scripts instead
      # track the best test epoch).
      best = dict(teacher=[_best(of(method)[0], "teacher")],
                  student=[_best(s, "distilled") for s in of(VANILLA)],
                  method=[_best(s, "distilled") for s in of(method)])
      measured, std = _mean_std(last)
      best_mean, best_std = _mean_std(best)
      published = {k: config.published[k] for k in QUANTITIES}
      rows.append(dict(
          pair=pair, method=method, teacher=config.teacher.name,
          student=config.student.name,
          config=f"{CONFIG_FILE}:{variant(pair, method, tiny)}",
          workdir=os.path.join(workdir, pair, method), seeds=seeds, measured=measured,
          std=std, best_by_validation=best_mean, best_by_validation_std=best_std,
          published=published,
          difference={k: None if measured[k] is None or published[k] is None
                      else measured[k] - published[k] for k in QUANTITIES}))
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "reproduce.json"), "w") as f:
      json.dump(dict(tiny=tiny, runs=rows), f, indent=2)
    with open(os.path.join(workdir, "reproduce.md"), "w") as f:
      f.write(markdown(rows, tiny))
    log(f"reproduce: wrote {os.path.join(workdir, 'reproduce.md')}")
  return rows


def _seeded(config: ml_collections.ConfigDict, seed: int) -> ml_collections.ConfigDict:
  """`config` with `seed`: a copy (unlocked) whose student runs draw from that seed."""
  out = ml_collections.ConfigDict(config.to_dict())
  out.seed = seed
  return out


def _mean_std(values: dict[str, list[Optional[float]]]
              ) -> tuple[dict[str, Optional[float]], dict[str, Optional[float]]]:
  """Per quantity: the mean of its values over seeds and their sample std (None for one
  value, or where a value is missing)."""
  mean, std = {}, {}
  for key, xs in values.items():
    known = None if any(x is None for x in xs) else xs
    mean[key] = None if known is None else statistics.fmean(known)
    std[key] = None if known is None or len(known) < 2 else statistics.stdev(known)
  return mean, std


def _best(summary: dict[str, Any], phase: str) -> Optional[float]:
  """The test top-1 (%) of `phase`'s best-by-validation checkpoint, if it has one."""
  best = summary.get("phases", {}).get(phase, {}).get("best")
  return None if best is None else _percent(best["test_accuracy"])


def _cell(x: Optional[float], signed: bool = False, std: Optional[float] = None) -> str:
  if x is None:
    return "—"
  text = f"{x:+.2f}" if signed else f"{x:.2f}"
  return text if std is None else f"{text} ± {std:.2f}"


def markdown(rows: Sequence[dict[str, Any]], tiny: bool = False) -> str:
  """The table of `run`'s rows: measured, published and Δ for teacher, student, method."""
  seeds = max((r.get("seeds", 1) for r in rows), default=1)
  over = f" (mean ± std over {seeds} seeds for the students)" if seeds > 1 else ""
  lines = ["# CIFAR-100: kd-jax against the published top-1 (%)", "",
           f"Measured{over}: top-1 on the test split after the last epoch; best val.: that of "
           "the checkpoint with the best validation top-1 (— where the config holds out "
           "no validation split). Published: CRD paper "
           "(Tian et al., ICLR 2020, Tables 1-2) and, for dkd, the DKD paper (Zhao et al., "
           "CVPR 2022), whose scripts track the best epoch. Δ = measured − published.", ""]
  if tiny:
    lines += ["**Tiny flavour**: smoke runs on kd_digits with small models, not comparable "
              "to the published numbers.", ""]
  header = ["pair", "method"]
  for what in ("teacher", "vanilla student", "method"):
    header += [what, "best val.", "published", "Δ"]
  lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for r in rows:
    cells = [r["pair"], r["method"]]
    for k in QUANTITIES:
      cells += [_cell(r["measured"][k], std=r.get("std", {}).get(k)),
                _cell(r["best_by_validation"][k],
                      std=r.get("best_by_validation_std", {}).get(k)),
                _cell(r["published"][k]), _cell(r["difference"][k], signed=True)]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"
