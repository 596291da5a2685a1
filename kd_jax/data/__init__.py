"""Input pipeline: TFDS datasets -> deterministic, resumable, host-sharded batches.

Importing this package registers the offline `kd_digits` TFDS builder. See `pipeline`
for how batch order, augmentation randomness and per-host slices are defined, and
`preprocess` for the ops and augmentation presets.
"""

from kd_jax.data import kd_digits
from kd_jax.data import preprocess
from kd_jax.data.pipeline import DatasetInfo
from kd_jax.data.pipeline import default_data_config
from kd_jax.data.pipeline import eval_dataset
from kd_jax.data.pipeline import eval_iterator
from kd_jax.data.pipeline import get_info
from kd_jax.data.pipeline import representative_images
from kd_jax.data.pipeline import train_dataset
from kd_jax.data.pipeline import train_iterator

__all__ = [
    "DatasetInfo",
    "default_data_config",
    "eval_dataset",
    "eval_iterator",
    "get_info",
    "kd_digits",
    "preprocess",
    "representative_images",
    "train_dataset",
    "train_iterator",
]
