"""Knowledge-distillation losses: pure, jit-able functions of arrays.

Optax style: every loss takes `(student, teacher, ...)` tensors, returns a
float32 scalar (float64 for float64 inputs under x64), treats the teacher as a
constant, and is reduced exactly as the reference implementation (RepDistiller,
mdistiller), so published loss weights carry over. Feature maps are NHWC.
"""
from kd_jax.losses._feature import attention_transfer
from kd_jax.losses._feature import fitnet
from kd_jax.losses._feature import nst
from kd_jax.losses._feature import similarity_preserving
from kd_jax.losses._logit import cross_entropy
from kd_jax.losses._logit import dkd
from kd_jax.losses._logit import kd
from kd_jax.losses._logit import lskd
from kd_jax.losses._logit import standardize_logits
from kd_jax.losses._relation import correlation_congruence
from kd_jax.losses._relation import pkt
from kd_jax.losses._relation import rkd

__all__ = [
    "attention_transfer",
    "correlation_congruence",
    "cross_entropy",
    "dkd",
    "fitnet",
    "kd",
    "lskd",
    "nst",
    "pkt",
    "rkd",
    "similarity_preserving",
    "standardize_logits",
]
