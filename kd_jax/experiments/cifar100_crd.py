"""The CIFAR-100 distillation benchmark of CRD (RepDistiller) and DKD (mdistiller).

One config per teacher→student pair and method, selected by the variant
`PAIR:METHOD[:tiny]`, e.g.

  kd-jax distill --config=experiments/cifar100_crd.py:resnet32x4-resnet8x4:kd \
      --workdir=runs/crd/resnet32x4-resnet8x4/kd

(ml_collections splits `--config` at the first ':' only, so `resnet32x4-resnet8x4:kd`
reaches `get_config` whole). PAIR is `TEACHER-STUDENT` (see `PAIRS`); METHOD is one of
`METHODS`. `kd-jax reproduce` runs a set of them and tabulates them against the
published numbers (see kd_jax/reproduce.py).

Recipe (RepDistiller's train_student.py): 240 epochs, batch 64, SGD momentum 0.9,
lr 0.05 (0.01 for MobileNetV2 / ShuffleV1 / ShuffleV2 students) ×0.1 at epochs
150/180/210, weight decay 5e-4; the teacher is trained with the same recipe. The
objective is RepDistiller's `-r` · CE + `-a` · KD + `-b` · method:
  kd                      CE 0.1 + KD 0.9, T=4
  fitnet                  CE 1 + 100 · MSE(conv1x1+BN(student stage_2), teacher stage_2)
                          (student stage_1 for the ShuffleNets: see `Pair`)
  attention_transfer      CE 1 + 1000 · AT on every stage pair (one term per pair)
  similarity_preserving   CE 1 + 3000 · SP on the last stage
  correlation_congruence  CE 1 + 0.02 · CC on the embeddings (a linear adapter maps the
                          student's to the teacher's width where they differ)
  vid                     CE 1 + 1 · VID on every stage pair
  rkd                     CE 1 + 1 · RKD on the embeddings (distance 25, angle 50)
  pkt                     CE 1 + 30000 · PKT on the embeddings
  nst                     CE 1 + 50 · NST on every stage pair
  activation_boundary     CE 1 + 1 · AB on every stage's pre-activation (same-architecture
                          pairs only; RepDistiller trains the student on AB alone for
                          30 epochs, then on CE alone: here AB is a term of one run)
  fsp                     CE 1 + 1 · FSP on stem → stage_1 → … (same-architecture pairs;
                          RepDistiller: 30 epochs of FSP alone, then CE, as for AB)
  factor_transfer         CE 1 + 200 · FT on the last stage of each; the paraphraser is
                          pre-trained 30 epochs (lr 0.01 for ResNet / WRN students) in
                          a phase of its own first (kd_jax/phase.py), then frozen
  crd                     CE 1 + 0.8 · CRD on the embeddings (128-d, 16384 negatives,
                          τ 0.07, memory momentum 0.5: the loss's defaults)
  dkd                     mdistiller: CE 1 + DKD (alpha 1, beta per pair, T=4) with
                          a linear warm-up of its weight over 20 epochs
  vanilla                 CE only: the student without a teacher signal
Distillation variants set `train_vanilla=False`: a run trains one student, reported
as `distilled_accuracy` in summary.json. The `vanilla` variant's one student is the
CE-only student, so its `distilled_accuracy` is the vanilla top-1 (and
`student_accuracy` is null). `c.published` holds the published top-1 (%) of the
teacher, the vanilla student and the method (`method` = `student` for vanilla).
RepDistiller's and mdistiller's scripts track the best test accuracy over the epochs;
kd-jax reports the last epoch's.

Needs CIFAR-100 prepared for TFDS (`tfds build cifar100` on a machine with network,
then --config.data.data_dir=DIR). Expected runtime on one GPU (an estimate, not a
measurement): about an hour per student run (187,680 steps), more with the deep
resnet110 / wrn_40_2 teachers; the teacher trains in the run unless
--config.teacher.checkpoint=DIR names one (`kd-jax reproduce` trains each once), or
--config.teacher.checkpoint=PATH.pth names a published teacher (RepDistiller's /
mdistiller's <teacher>_vanilla/ckpt_epoch_240.pth), imported without training
(docs/training.md).

`PAIR:METHOD:tiny` runs the same objective in under a minute on a CPU: the offline
kd_digits dataset, 1 epoch, batch 32, and the smallest model of each family.
"""
from __future__ import annotations

import dataclasses

import ml_collections

from kd_jax import configs, data

_CRD_METHODS = ("vanilla", "kd", "fitnet", "attention_transfer", "similarity_preserving",
                "correlation_congruence", "vid", "rkd", "pkt", "nst", "crd", "dkd",
                "activation_boundary", "factor_transfer", "fsp")
# Later methods, with the top-1 (%) their authors publish for the pairs they report
# (the others' published column stays empty): method -> (source, {pair: top-1}).
RECENT = {
    "dist": ("Huang et al., Knowledge Distillation from A Stronger Teacher, NeurIPS 2022 "
             "(hunto/DIST_KD README, mean of several runs)",
             {"resnet56-resnet20": 71.75, "resnet32x4-resnet8x4": 76.31,
              "resnet32x4-ShuffleV1": 76.34, "resnet32x4-ShuffleV2": 77.35}),
    "ctkd": ("Li et al., Curriculum Temperature for Knowledge Distillation, AAAI 2023 "
             "(zhengli97/CTKD README)",
             {"resnet56-resnet20": 71.19, "resnet110-resnet32": 73.52,
              "wrn_40_2-wrn_16_2": 75.45, "vgg13-vgg8": 73.52}),
    "wkd": ("Lv et al., Wasserstein Distance Rivals Kullback-Leibler Divergence for KD, "
            "NeurIPS 2024 (JiamingLv/WKD README; their cost is CKA-based, here the "
            "teacher classifier's, and their gamma decays after epoch 150)",
            {"resnet32x4-resnet8x4": 76.53}),
    "mlkd": ("Jin et al., Multi-Level Logit Distillation, CVPR 2023 (as listed in the "
             "logit-standardization README; their recipe adds a RandAugment view, "
             "this row trains MLKD on the one view)",
             {"resnet32x4-resnet8x4": 77.08, "vgg13-vgg8": 75.18,
              "wrn_40_2-wrn_16_2": 76.63, "resnet56-resnet20": 72.19,
              "resnet110-resnet32": 74.11, "resnet32x4-ShuffleV2": 78.44,
              "vgg13-MobileNetV2": 70.57}),
    "dot": ("Zhao et al., DOT: A Distillation-Oriented Trainer, ICCV 2023 "
            "(mdistiller README): KD with the dot optimizer",
            {"resnet32x4-resnet8x4": 75.12, "vgg13-vgg8": 73.77,
             "resnet32x4-ShuffleV2": 75.55}),
}
METHODS = (*_CRD_METHODS, *RECENT)

# The methods of `Pair.method_top1`, in order.
_METHOD_COLUMNS = _CRD_METHODS[1:]
_CRD_TABLE_1 = "Tian et al., Contrastive Representation Distillation, ICLR 2020, Table 1"
_CRD_TABLE_2 = "Tian et al., Contrastive Representation Distillation, ICLR 2020, Table 2"
_DKD_SOURCE = ("Zhao et al., Decoupled Knowledge Distillation, CVPR 2022 "
               "(CIFAR-100 results as listed in mdistiller's README)")


@dataclasses.dataclass(frozen=True)
class Pair:
  """A teacher→student pair of the benchmark.

  Attributes:
    teacher, student: model names of `kd_jax.models`.
    table: where the CRD paper publishes the pair (Table 1: same architecture family,
      Table 2: different families, whose embeddings differ in width).
    dkd_beta: DKD's NCKD weight for the pair (mdistiller configs/cifar100/dkd/*.yaml;
      8.0, its default, where a file sets none).
    baseline_top1: published top-1 (%) of the teacher and of the vanilla student.
    method_top1: published top-1 (%) of each method of `_METHOD_COLUMNS` (CRD paper
      for all but DKD; DKD paper, as in mdistiller's README, for DKD); None where the
      paper reports none (FSP across architectures).
    fitnet_student_tap: the student tap FitNet regresses onto the teacher's hint,
      `stage_2` (RepDistiller's hint_layer=2). ShuffleNets halve the resolution in
      their first stage, so their `stage_2` is half the size of resnet32x4's; where
      RepDistiller upsamples it with a transposed convolution, the 1x1 adapter here
      takes the student stage of the hint's resolution, `stage_1`.
  """
  teacher: str
  student: str
  table: str
  dkd_beta: float
  baseline_top1: tuple[float, float]
  method_top1: tuple[float | None, ...]
  fitnet_student_tap: str = "stage_2"

  @property
  def cross_architecture(self) -> bool:
    return self.table == _CRD_TABLE_2


PAIRS = {f"{p.teacher}-{p.student}": p for p in (
    # teacher, student, table, DKD beta, (teacher, vanilla student) top-1, then top-1 of
    # KD     FitNet AT     SP     CC     VID    RKD    PKT    NST    CRD    DKD    AB
    # FT     FSP
    Pair("resnet56", "resnet20", _CRD_TABLE_1, 2.0, (72.34, 69.06),
         (70.66, 69.21, 70.55, 69.67, 69.63, 70.38, 69.61, 70.34, 69.60, 71.16, 71.97, 69.47,
          69.84, 69.95)),
    Pair("resnet110", "resnet32", _CRD_TABLE_1, 2.0, (74.31, 71.14),
         (73.08, 71.06, 72.31, 72.69, 71.48, 72.61, 71.82, 72.61, 71.96, 73.48, 74.11, 70.98,
          72.37, 71.89)),
    Pair("resnet32x4", "resnet8x4", _CRD_TABLE_1, 8.0, (79.42, 72.50),
         (73.33, 73.50, 73.44, 72.94, 72.97, 73.09, 71.90, 73.64, 73.30, 75.51, 76.32, 73.17,
          72.86, 72.62)),
    Pair("wrn_40_2", "wrn_16_2", _CRD_TABLE_1, 6.0, (75.61, 73.26),
         (74.92, 73.58, 74.08, 73.83, 73.56, 74.11, 73.35, 74.54, 73.68, 75.48, 76.23, 72.50,
          73.25, 72.91)),
    Pair("vgg13", "vgg8", _CRD_TABLE_1, 6.0, (74.64, 70.36),
         (72.98, 71.02, 71.43, 72.68, 70.71, 71.23, 71.48, 72.88, 71.53, 73.94, 74.68, 70.94,
          70.58, 70.23)),
    Pair("vgg13", "MobileNetV2", _CRD_TABLE_2, 6.0, (74.64, 64.60),
         (67.37, 64.14, 59.40, 66.30, 64.86, 65.56, 64.52, 67.13, 58.16, 69.73, 69.71, 66.06,
          61.78, None)),
    Pair("resnet32x4", "ShuffleV1", _CRD_TABLE_2, 8.0, (79.42, 70.50),
         (74.07, 73.59, 71.73, 73.48, 71.14, 73.38, 72.28, 74.10, 74.12, 75.11, 76.45, 73.55,
          71.75, None),
         fitnet_student_tap="stage_1"),
    Pair("resnet32x4", "ShuffleV2", _CRD_TABLE_2, 8.0, (79.42, 71.82),
         (74.45, 73.54, 72.73, 74.56, 71.29, 73.40, 73.21, 74.69, 74.68, 75.65, 77.07, 74.31,
          72.50, None),
         fitnet_student_tap="stage_1"),
)}

# RepDistiller trains these students with lr 0.01 instead of 0.05.
_LOW_LR_STUDENTS = ("MobileNetV2", "ShuffleV1", "ShuffleV2")
# The tiny flavour's stand-in for each model: the smallest of its family, so that the
# taps the terms name exist and keep their layout.
_TINY_MODEL = {"resnet56": "resnet8", "resnet20": "resnet8", "resnet110": "resnet8",
               "resnet32": "resnet8", "resnet32x4": "resnet8x4", "resnet8x4": "resnet8x4",
               "wrn_40_2": "wrn_16_1", "wrn_16_2": "wrn_16_1", "vgg13": "vgg8",
               "vgg8": "vgg8"}


def _num_stages(model: str) -> int:
  """Stages (`stage_1..n` taps) of a benchmark model; RepDistiller's feat[1:-1]."""
  return 4 if model.startswith("vgg") or model == "MobileNetV2" else 3


# RepDistiller pre-trains FT's paraphraser at lr 0.01 for these students (else at the
# student's learning rate).
_FT_LOW_LR_STUDENTS = ("resnet8", "resnet14", "resnet20", "resnet32", "resnet44",
                       "resnet56", "resnet110", "resnet8x4", "resnet32x4", "wrn_16_1",
                       "wrn_16_2", "wrn_40_1", "wrn_40_2")


def unavailable(pair: Pair, method: str) -> str | None:
  """Why `method` has no run for `pair` (None: it has one). AB and FSP compare maps of
  equal shapes; across architectures RepDistiller adds connectors for AB (not
  implemented here) and the CRD paper reports no FSP."""
  if method in ("activation_boundary", "fsp") and pair.cross_architecture:
    return (f"{method} compares maps of equal shapes, which {pair.teacher} and "
            f"{pair.student} do not have; pick a same-architecture pair (Table 1)")
  return None


def _tap_term(method: str, weight: float, tap: str, **settings) -> dict:
  return dict(method=method, weight=weight, student_tap=tap, teacher_tap=tap, **settings)


def distill_terms(pair: Pair, method: str) -> tuple[float, list[dict]]:
  """`(ce_weight, terms)` of RepDistiller's (or, for dkd, mdistiller's) recipe."""
  stages = [f"stage_{k + 1}" for k in range(
      min(_num_stages(pair.teacher), _num_stages(pair.student)))]
  if unavailable(pair, method):
    raise ValueError(unavailable(pair, method))
  if method == "vanilla":
    return 1.0, []
  if method == "kd":
    return 0.1, [dict(method="kd", weight=0.9, temperature=4.0)]
  if method == "dkd":
    return 1.0, [dict(method="dkd", weight=1.0, alpha=1.0, beta=pair.dkd_beta,
                      temperature=4.0, schedule="linear_warmup", warmup_epochs=20)]
  if method == "fitnet":  # the teacher's hint, stage_2, regressed from the student
    return 1.0, [dict(method="fitnet", weight=100.0, student_tap=pair.fitnet_student_tap,
                      teacher_tap="stage_2", adapter="conv1x1")]
  if method in ("attention_transfer", "nst", "vid"):
    weight = {"attention_transfer": 1000.0, "nst": 50.0, "vid": 1.0}[method]
    return 1.0, [_tap_term(method, weight, tap) for tap in stages]
  if method == "similarity_preserving":
    return 1.0, [_tap_term(method, 3000.0, stages[-1])]
  if method == "correlation_congruence":
    # RepDistiller projects both embeddings linearly; across families their widths
    # differ, so the student's is mapped to the teacher's width.
    extra = dict(adapter="linear") if pair.cross_architecture else {}
    return 1.0, [_tap_term(method, 0.02, "embedding", **extra)]
  if method in ("rkd", "pkt", "crd"):
    weight = {"rkd": 1.0, "pkt": 30000.0, "crd": 0.8}[method]
    return 1.0, [_tap_term(method, weight, "embedding")]
  if method == "activation_boundary":  # RepDistiller's init-stage loss, weight 1
    return 1.0, [dict(method=method, weight=1.0,
                      student_tap=tuple(f"preact_{s}" for s in stages))]
  if method == "fsp":  # RepDistiller's init-stage loss (feat[:-1]), weight 1
    return 1.0, [dict(method=method, weight=1.0, student_tap=("stem", *stages))]
  if method == "factor_transfer":  # the last stage of each (feat[-2]), -b 200
    term = dict(method=method, weight=200.0, student_tap=f"stage_{_num_stages(pair.student)}",
                teacher_tap=f"stage_{_num_stages(pair.teacher)}")
    if pair.student in _FT_LOW_LR_STUDENTS:
      term["pretrain"] = dict(learning_rate=0.01)
    return 1.0, [term]
  if method == "dist":  # CE 1 + 2·DIST at tau 4 (dist_cifar.yaml)
    return 1.0, [dict(method="dist", weight=2.0, beta=1.0, gamma=1.0, temperature=4.0)]
  if method == "ctkd":  # 0.1·CE + 0.9·KD at the learned temperature
    return 0.1, [dict(method="ctkd", weight=0.9)]
  if method == "wkd":  # res32x4_res8x4.yaml: T 8, weight 600, sharpening 1
    return 1.0, [dict(method="wkd", weight=1.0, temperature=8.0, gamma=600.0, kappa=1.0)]
  if method == "mlkd":  # 0.1·CE + 0.9·MLKD (T 2..6)
    return 0.1, [dict(method="mlkd", weight=0.9)]
  if method == "dot":  # KD's objective; the optimizer is what differs (get_config)
    return 0.1, [dict(method="kd", weight=0.9, temperature=4.0)]
  raise ValueError(f"unknown method {method!r}; known methods: {', '.join(METHODS)}")


def published(pair: Pair, method: str) -> dict:
  """Published top-1 (%) of the pair's teacher, vanilla student and `method`."""
  teacher, student = pair.baseline_top1
  if method in RECENT:
    source, top1 = RECENT[method]
    return dict(teacher=teacher, student=student,
                method=top1.get(f"{pair.teacher}-{pair.student}"), source=source)
  top1 = dict(zip(_METHOD_COLUMNS, pair.method_top1), vanilla=student)
  return dict(teacher=teacher, student=student, method=top1[method],
              source=_DKD_SOURCE if method == "dkd" else pair.table)


def _recipe(learning_rate: float) -> dict:
  return dict(optimizer="sgd", learning_rate=learning_rate, momentum=0.9, nesterov=False,
              weight_decay=5e-4, schedule="step", decay_epochs=(150, 180, 210),
              decay_factor=0.1, warmup_epochs=0, batch_size=64, epochs=240,
              checkpoint_every_steps=2000)


def parse_variant(variant: str) -> tuple[str, str, bool]:
  """'PAIR:METHOD[:tiny]' -> (pair, method, tiny); one-line errors naming the choices."""
  parts = variant.split(":") if variant else ["resnet32x4-resnet8x4", "kd"]
  tiny = parts[-1] == "tiny"
  if tiny:
    parts = parts[:-1]
  if len(parts) != 2:
    raise ValueError(f"variant {variant!r} of experiments/cifar100_crd.py must be "
                     "PAIR:METHOD or PAIR:METHOD:tiny, e.g. resnet32x4-resnet8x4:kd")
  pair, method = parts
  if pair not in PAIRS:
    raise ValueError(f"unknown pair {pair!r}; known pairs: {', '.join(PAIRS)}")
  if method not in METHODS:
    raise ValueError(f"unknown method {method!r}; known methods: {', '.join(METHODS)}")
  return pair, method, tiny


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  pair_name, method, tiny = parse_variant(variant)
  pair = PAIRS[pair_name]
  c = configs.default_config()
  c.seed = 0
  c.log_every_steps = 100
  c.eval_batch_size = 256

  c.data.name = "cifar100"  # RepDistiller's normalisation, pad 4 + crop + flip

  c.teacher.name = pair.teacher
  c.teacher.train.update(_recipe(0.05))
  c.student.name = pair.student
  c.train.update(_recipe(0.01 if pair.student in _LOW_LR_STUDENTS else 0.05))
  c.train_vanilla = False  # the vanilla student is a run of its own (method 'vanilla')
  c.distill.ce_weight, c.distill.terms = distill_terms(pair, method)
  if method == "dot":  # task momentum 0.825, distillation momentum 0.975
    c.train.update(optimizer="dot", dot_delta=0.075)

  c.export.update(variants=("fp32", "int8"), num_calibration_images=512, latency_runs=100)
  c.published = ml_collections.ConfigDict(published(pair, method))

  if tiny:  # well under a minute per run on a CPU: for tests and smoke runs
    configs.shrink_to_tiny(c)
    for term in c.distill.terms:  # FT's paraphraser phase: 1 epoch too
      if term.get("method") == "factor_transfer":
        term["pretrain"] = dict(term.get("pretrain") or {}, epochs=1.0)
    c.teacher.name = _TINY_MODEL.get(pair.teacher, pair.teacher)
    c.student.name = _TINY_MODEL.get(pair.student, pair.student)
  return c
