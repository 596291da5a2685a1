"""The digits default (experiments/digits.py) with one of the logit methods of 2022–2026.

Variants `METHOD` or `METHOD:tiny`, METHOD one of:
  kd             the default's 0.1·CE + 0.9·KD (T=4), for comparison
  dist           CE + 2·DIST (β=γ=1, T=4): the authors' CIFAR-100 weights
  srd            CE + SRD: linear projector of the student's embedding to the teacher's
                 width, both batch-standardised, p=4, T=1 (the authors' recipe)
  skd            0.1·CE + 0.9·T²·instance (T=4) + 0.9·direction (λ=0.1): the authors'
                 CE/KD weights, their KL's T² folded into the weight
  nkd            CE + NKD (T=3, γ=3.5): the authors' CIFAR-100 config
  wkd            CE + WKD-L (T=8, γ=600, κ=1): the authors' resnet32x4→resnet8x4
                 weights, with the cost from the teacher's classifier (their "fc" cost;
                 their released configs load a CKA cost) and without their cosine
                 decay of γ after epoch 150
  mlkd           0.1·CE + 0.9·MLKD on the one view (T = 2..6): the authors' CIFAR-100
                 weights, without their second, strongly augmented view
                 (experiments/digits_views.py:mlkd has both)
  ctkd           0.1·CE + 0.9·KD at a learned temperature with a gradient-reversal
                 curriculum over 10 epochs (the authors' CIFAR-100 recipe)
  dot            the default's KD objective with the dot optimizer: the task gradient's
                 momentum 0.825, the distillation gradient's 0.975 (δ = 0.075)
  dist_plus      CE + 2·DIST+: DIST (β=γ=1, T=4) on the logits plus its channel and
                 spatial relations (weights 1, T=1) on stage_3, whose channels the
                 teacher (resnet20) shares with resnet8; DIST+'s teacher acclimation is
                 not done
  ft             CE + 200·FT on stage_3 (RepDistiller's weight, k=0.5): the paraphraser
                 trains 30 epochs (1 in the tiny variant) on the teacher's stage_3 in
                 its own phase (`distilled_pretrain_factor_transfer_stage_3`) first, then
                 stays frozen while the translator trains with the student
  fsp, ab        CE + FSP (stem → stage_1 → stage_2 → stage_3, weight 1) or
                 CE + AB (preact_stage_1..3, margin 1, weight 1), with a resnet20
                 teacher (channels equal to resnet8's; no connectors). RepDistiller uses
                 either loss alone in a 30-epoch stage before CE training, which is not
                 done here: the loss is a term like any other

Each method is a term of `distill.terms` (kd_jax/objective.py); the losses are in
kd_jax/losses/_recent.py. Reuse one teacher for all (about 1 minute each on 2 CPU cores):
  kd-jax train-teacher --workdir=runs/digits_teacher
  kd-jax distill --config=experiments/digits_recent.py:dist --workdir=runs/digits_dist \\
      --config.teacher.checkpoint=runs/digits_teacher --config.train_vanilla=False
"""
import copy

import ml_collections

from kd_jax import configs

# method -> (CE weight, terms)
METHODS = {
    "kd": (0.1, [dict(method="kd", weight=0.9, temperature=4.0)]),
    "dist": (1.0, [dict(method="dist", weight=2.0, beta=1.0, gamma=1.0, temperature=4.0)]),
    "srd": (1.0, [dict(method="srd", weight=1.0, adapter="linear", exponent=4.0,
                       temperature=1.0)]),
    "skd": (0.1, [dict(method="skd_instance", weight=0.9 * 4.0**2, temperature=4.0),
                  dict(method="skd_direction", weight=0.9, tikhonov=0.1)]),
    "nkd": (1.0, [dict(method="nkd", weight=1.0, temperature=3.0, gamma=3.5)]),
    "wkd": (1.0, [dict(method="wkd", weight=1.0, temperature=8.0, gamma=600.0, kappa=1.0)]),
    "mlkd": (0.1, [dict(method="mlkd", weight=0.9)]),
    "ctkd": (0.1, [dict(method="ctkd", weight=0.9)]),
    "dot": (0.1, [dict(method="kd", weight=0.9, temperature=4.0)]),
    "dist_plus": (1.0, [dict(method="dist_plus", weight=2.0, beta=1.0, gamma=1.0,
                             temperature=4.0, student_tap="stage_3")]),
    "ft": (1.0, [dict(method="factor_transfer", weight=200.0, student_tap="stage_3")]),
    "fsp": (1.0, [dict(method="fsp", weight=1.0,
                       student_tap=("stem", "stage_1", "stage_2", "stage_3"))]),
    "ab": (1.0, [dict(method="activation_boundary", weight=1.0,
                      student_tap=("preact_stage_1", "preact_stage_2", "preact_stage_3"))]),
}
_EQUAL_CHANNELS_TEACHER = {"fsp": "resnet20", "ab": "resnet20", "dist_plus": "resnet20"}


def get_config(variant: str = "kd") -> ml_collections.ConfigDict:
  method, flavour = configs.choice_variant(variant, METHODS, "experiments/digits_recent.py")
  c = configs.experiment_config("digits", flavour)
  ce_weight, terms = copy.deepcopy(METHODS[method])
  if method == "ft" and flavour:  # the paraphraser's phase shrunk like the others
    terms[0]["pretrain"] = dict(epochs=3.0, learning_rate=0.5)
  c.distill.ce_weight, c.distill.terms = ce_weight, terms
  if method == "dot":
    c.train.update(optimizer="dot", dot_delta=0.075)
  if method in _EQUAL_CHANNELS_TEACHER and not flavour:
    c.teacher.name = _EQUAL_CHANNELS_TEACHER[method]

  return c
