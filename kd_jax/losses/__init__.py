"""Knowledge-distillation losses: pure, jit-able functions of arrays.

Optax style: every loss takes `(student, teacher, ...)` tensors, returns a
float32 scalar (float64 for float64 inputs under x64), treats the teacher as a
constant, and is reduced exactly as the reference implementation (RepDistiller,
mdistiller), so published loss weights carry over. Feature maps are NHWC.

Methods with learned parameters or state (VID, CRD, ReviewKD, ClassPrior) are
Flax modules called as `module(student, teacher, labels=..., index=..., train=...)`;
their parameters train with the student and their state lives in the train state.
"""
from kd_jax.losses._domain import coral
from kd_jax.losses._domain import mmd
from kd_jax.losses._domain import pseudo_label
from kd_jax.losses._domain import pseudo_label_per_example
from kd_jax.losses._feature import attention_transfer
from kd_jax.losses._feature import fitnet
from kd_jax.losses._feature import nst
from kd_jax.losses._feature import similarity_preserving
from kd_jax.losses._learned import CRD
from kd_jax.losses._learned import ClassPrior
from kd_jax.losses._learned import ReviewKD
from kd_jax.losses._learned import VID
from kd_jax.losses._learned import adaptive_average_pool
from kd_jax.losses._learned import contrast_loss
from kd_jax.losses._learned import hierarchical_context_loss
from kd_jax.losses._logit import cross_entropy
from kd_jax.losses._logit import cross_entropy_per_example
from kd_jax.losses._logit import deit
from kd_jax.losses._logit import deit_per_example
from kd_jax.losses._logit import dkd
from kd_jax.losses._logit import dkd_per_example
from kd_jax.losses._logit import kd
from kd_jax.losses._logit import kd_per_example
from kd_jax.losses._logit import lskd
from kd_jax.losses._logit import lskd_per_example
from kd_jax.losses._logit import standardize_logits
from kd_jax.losses._recent import CTKD
from kd_jax.losses._recent import FactorTransfer
from kd_jax.losses._recent import PARAPHRASER
from kd_jax.losses._recent import Paraphraser
from kd_jax.losses._recent import ParaphraserOnTeacher
from kd_jax.losses._recent import Translator
from kd_jax.losses._recent import activation_boundary
from kd_jax.losses._recent import batch_standardize
from kd_jax.losses._recent import dist
from kd_jax.losses._recent import dist_feature_relations
from kd_jax.losses._recent import dist_plus
from kd_jax.losses._recent import factor
from kd_jax.losses._recent import factor_transfer
from kd_jax.losses._recent import fsp
from kd_jax.losses._recent import fsp_matrix
from kd_jax.losses._recent import gradient_reversal
from kd_jax.losses._recent import mlkd
from kd_jax.losses._recent import nkd
from kd_jax.losses._recent import skd_direction
from kd_jax.losses._recent import skd_instance
from kd_jax.losses._recent import srd
from kd_jax.losses._recent import srd_standardized
from kd_jax.losses._recent import wkd_cost_matrix
from kd_jax.losses._recent import wkd_logit
from kd_jax.losses._relation import correlation_congruence
from kd_jax.losses._relation import pkt
from kd_jax.losses._relation import rkd

__all__ = [
    "CRD",
    "CTKD",
    "ClassPrior",
    "FactorTransfer",
    "PARAPHRASER",
    "Paraphraser",
    "ParaphraserOnTeacher",
    "ReviewKD",
    "Translator",
    "VID",
    "activation_boundary",
    "adaptive_average_pool",
    "attention_transfer",
    "batch_standardize",
    "contrast_loss",
    "coral",
    "correlation_congruence",
    "cross_entropy",
    "cross_entropy_per_example",
    "deit",
    "deit_per_example",
    "dist",
    "dist_feature_relations",
    "dist_plus",
    "dkd",
    "dkd_per_example",
    "factor",
    "factor_transfer",
    "fitnet",
    "fsp",
    "fsp_matrix",
    "gradient_reversal",
    "hierarchical_context_loss",
    "kd",
    "kd_per_example",
    "lskd",
    "lskd_per_example",
    "mlkd",
    "mmd",
    "nkd",
    "nst",
    "pkt",
    "pseudo_label",
    "pseudo_label_per_example",
    "rkd",
    "similarity_preserving",
    "skd_direction",
    "skd_instance",
    "srd",
    "srd_standardized",
    "standardize_logits",
    "wkd_cost_matrix",
    "wkd_logit",
]
