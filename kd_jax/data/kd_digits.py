"""`kd_digits`: an offline TFDS dataset built from scikit-learn's bundled 8x8 digits.

The default `kd-jax distill` run must work without network access, so its dataset is
built from `sklearn.datasets.load_digits` (shipped inside scikit-learn, 1797 images of
handwritten digits, 10 classes) instead of being downloaded. Importing this module
registers the builder, so `tfds.builder('kd_digits', data_dir=...)` works and
`download_and_prepare()` reads nothing from the network.

Reference: E. Alpaydin, C. Kaynak, "Optical Recognition of Handwritten Digits",
UCI Machine Learning Repository (1998).
"""

from __future__ import annotations

from etils import epath
import numpy as np
import tensorflow_datasets as tfds

SPLIT_SEED = 0
TEST_FRACTION = 0.2
_MAX_PIXEL = 16  # load_digits pixels are integers in 0..16.


def stratified_split(
    labels: np.ndarray, test_fraction: float = TEST_FRACTION, seed: int = SPLIT_SEED
) -> tuple[np.ndarray, np.ndarray]:
  """Splits example indices into (train, test), keeping each class's proportion.

  For every class, its indices are permuted with a seeded generator and the first
  `round(test_fraction * class_count)` go to test. Both returned arrays are sorted.

  Args:
    labels: int array [N] of class ids.
    test_fraction: share of each class that goes to the test split.
    seed: seed of the permutation; the split is a pure function of the arguments.

  Returns:
    (train_indices, test_indices), disjoint, covering range(N).
  """
  rng = np.random.default_rng(seed)
  test = []
  for label in np.unique(labels):
    members = rng.permutation(np.flatnonzero(labels == label))
    test.append(members[: round(test_fraction * len(members))])
  test = np.sort(np.concatenate(test))
  train = np.setdiff1d(np.arange(len(labels)), test)
  return train, test


def to_uint8(pixels: np.ndarray) -> np.ndarray:
  """Rescales load_digits pixel values 0..16 to uint8 0..255 (rounded)."""
  return np.round(pixels * (255.0 / _MAX_PIXEL)).astype(np.uint8)


class KdDigits(tfds.core.GeneratorBasedBuilder):
  """8x8 grayscale handwritten digits (scikit-learn's copy of UCI optdigits)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release: seeded stratified 80/20 split."}
  # TFDS locates a builder's checksums file next to its code; its own lookup of this
  # path needs the `importlib_resources` backport, which a download-free builder does
  # not need, so the path is given directly.
  code_path = epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description=(
            "The 1797 8x8 handwritten digits bundled with scikit-learn "
            "(sklearn.datasets.load_digits), pixel values 0..16 rescaled to 0..255. "
            f"Split per class into train/test "
            f"{1 - TEST_FRACTION:.0%}/{TEST_FRACTION:.0%} with seed {SPLIT_SEED}. "
            "Built offline: no download."
        ),
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(8, 8, 1)),
            "label": tfds.features.ClassLabel(num_classes=10),
        }),
        supervised_keys=("image", "label"),
        homepage="https://archive.ics.uci.edu/dataset/80",
    )

  def _arrays(self):
    """uint8 images [N, 8, 8, 1], int64 labels [N] and {split: indices}."""
    from sklearn import datasets  # pylint: disable=g-import-not-at-top

    digits = datasets.load_digits()
    labels = digits.target.astype(np.int64)
    return (to_uint8(digits.images)[..., None], labels,
            dict(zip(("train", "test"), stratified_split(labels))))

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    del dl_manager  # The data ships with scikit-learn.
    images, labels, splits = self._arrays()
    return {name: self._generate_examples(images, labels, indices)
            for name, indices in splits.items()}

  def _generate_examples(self, images, labels, indices):
    for i in indices:
      yield int(i), {"image": images[i], "label": labels[i]}
