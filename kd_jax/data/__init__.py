"""Input pipeline: TFDS datasets or image folders -> deterministic, resumable,
host-sharded batches.

Importing this package registers the offline `kd_digits` TFDS builder. See `pipeline`
for how batch order, augmentation randomness and per-host slices are defined,
`preprocess` for the ops and augmentation presets, `augment` for the edge-condition
ops (low light, motion blur, sensor noise, JPEG, reduced colour, occlusion) and
`curriculum` for pacing and curriculum sampling over difficulty scores (the teacher
scores them in `kd_jax.teacher_pass`).
"""

from kd_jax.data import augment
from kd_jax.data import curriculum
from kd_jax.data import kd_digits
from kd_jax.data import preprocess
from kd_jax.data.pipeline import DatasetInfo
from kd_jax.data.pipeline import default_data_config
from kd_jax.data.pipeline import eval_dataset
from kd_jax.data.pipeline import eval_datasets
from kd_jax.data.pipeline import eval_iterator
from kd_jax.data.pipeline import host_eval_iterator
from kd_jax.data.pipeline import view_names
from kd_jax.data.pipeline import get_info
from kd_jax.data.pipeline import label_key
from kd_jax.data.pipeline import label_names
from kd_jax.data.pipeline import representative_images
from kd_jax.data.pipeline import train_dataset
from kd_jax.data.pipeline import train_iterator
from kd_jax.data.pipeline import train_label_features
from kd_jax.data.pipeline import train_labels

__all__ = [
    "DatasetInfo",
    "augment",
    "curriculum",
    "default_data_config",
    "eval_dataset",
    "eval_datasets",
    "eval_iterator",
    "host_eval_iterator",
    "view_names",
    "get_info",
    "kd_digits",
    "label_key",
    "label_names",
    "preprocess",
    "representative_images",
    "train_dataset",
    "train_iterator",
    "train_label_features",
    "train_labels",
]
