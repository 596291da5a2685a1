"""An image folder of the bundled digits, written by tests (`data.name='folder:PATH'`)."""
import os

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds


def write_digits(root, counts=(("train", 240), ("test", 120)), inverted=False, shift=0):
  """The first `count` digits of each split as RGB PNGs in `root/<split>/<label>/`,
  optionally rendered differently: `inverted` (dark strokes on white), moved `shift`
  pixels right. Returns `root`."""
  for split, count in counts:
    examples = tfds.as_numpy(tfds.builder("kd_digits").as_dataset(split).take(count))
    for i, example in enumerate(examples):
      image = example["image"][..., 0]
      image = np.roll(255 - image if inverted else image, shift, axis=1)
      folder = os.path.join(root, split, str(int(example["label"])))
      os.makedirs(folder, exist_ok=True)
      tf.io.write_file(os.path.join(folder, f"{i}.png"),
                       tf.io.encode_png(np.repeat(image[..., None], 3, axis=-1)))
  return str(root)
