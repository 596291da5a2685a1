"""Input pipeline at scale, simulated on one machine: what each host reads per epoch.

Writes an ImageNet-shaped dataset in a temporary folder (JPEGs of 224-500 px a side,
1000 classes; ArrayRecord when `array_record` is installed, else TFRecord), then for P
simulated hosts (P = 1, 2, 4, 8) runs one epoch of `kd_jax.data.train_iterator` as
each host `process_index=i, process_count=P` in its own process, with the ImageNet
augmentation at 224x224. Per host it measures the records and bytes it read in that
epoch, its peak resident memory and the pipeline's images/s per core. A row gives the
most any host of the P read (records, bytes) and the largest peak RSS.

With ArrayRecord, every host's reads are recorded (the data source's `__getitems__`):
a read is counted in the epoch when its indices are one of the host's batches of it,
the rest is read-ahead into the next epoch (`read_ahead_records`, not in the epoch's
figures). With TFRecord (per-host ranges), the records of the host's range are
counted, and the bytes are the file bytes the process read (/proc/self/io).

  python benchmarks/input_scaling.py                 # 2,000 images, table + results/
  python benchmarks/input_scaling.py --json --examples 4000 --processes 1,2,4,8
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILDER = "input_scaling_images"
NUM_CLASSES = 1000
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _builder_class():
  """A TFDS builder of synthetic ImageNet-shaped JPEGs (registered on first call)."""
  from etils import epath
  import numpy as np
  import tensorflow_datasets as tfds

  class InputScalingImages(tfds.core.GeneratorBasedBuilder):
    """Smooth random colour fields with mild noise, 224-500 px a side, as JPEG."""

    VERSION = tfds.core.Version("1.0.0")
    code_path = epath.Path(__file__)
    BUILDER_CONFIGS = []

    def __init__(self, *, num_train: int = 2000, **kwargs):
      self._num_train = num_train
      super().__init__(**kwargs)

    def _info(self):
      return tfds.core.DatasetInfo(
          builder=self,
          features=tfds.features.FeaturesDict({
              "image": tfds.features.Image(shape=(None, None, 3),
                                           encoding_format="jpeg"),
              "label": tfds.features.ClassLabel(num_classes=NUM_CLASSES),
          }),
          supervised_keys=("image", "label"))

    def _split_generators(self, dl_manager):
      del dl_manager
      return {"train": self._generate_examples(self._num_train, 0),
              "validation": self._generate_examples(8, 1)}

    def _generate_examples(self, n, seed):
      rng = np.random.default_rng(seed)
      for i in range(n):
        h, w = rng.integers(224, 501, size=2)
        coarse = rng.uniform(0, 255, size=(h // 32 + 2, w // 32 + 2, 3)).astype(
            np.float32)
        image = np.repeat(np.repeat(coarse, 32, 0), 32, 1)[:h, :w]
        image = image + 12 * rng.standard_normal(image.shape, dtype=np.float32)
        yield i, {"image": np.clip(image, 0, 255).astype(np.uint8),
                  "label": int(rng.integers(NUM_CLASSES))}

  return InputScalingImages


def _config(data_dir: str):
  from kd_jax import data
  config = data.default_data_config()
  config.update(name=BUILDER, data_dir=data_dir, augment="imagenet", image_size=224,
                flip=True, mean=IMAGENET_MEAN, std=IMAGENET_STD, cache=False)
  return config


def _io_bytes() -> int:
  """Bytes this process has read through read() calls (/proc/self/io rchar)."""
  try:
    with open("/proc/self/io") as f:
      return int(dict(line.split(": ") for line in f.read().splitlines())["rchar"])
  except OSError:
    return 0


def run_host(data_dir: str, process_index: int, process_count: int, batch: int,
             file_format: str) -> dict:
  """One epoch of host `process_index` of `process_count`: reads, bytes, RSS, speed."""
  from unittest import mock
  import numpy as np
  _builder_class()  # Registers the dataset.
  from kd_jax import data

  reads = []
  patch = None
  if file_format == "array_record":
    from tensorflow_datasets.core.data_sources import array_record
    original = array_record.ArrayRecordDataSource.__getitems__

    def getitems(self, keys):
      records = original(self, keys)
      reads.append((tuple(keys), sum(len(r["image"]) + 8 for r in records)))
      return records

    patch = mock.patch.object(array_record.ArrayRecordDataSource, "__getitems__",
                              getitems)
    patch.start()
  config = _config(data_dir)
  info = data.get_info(config)
  steps = info.steps_per_epoch(batch)
  rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  io_before = _io_bytes()
  iterator = data.train_iterator(config, global_batch_size=batch, seed=0,
                                 process_index=process_index,
                                 process_count=process_count)
  t0 = time.perf_counter()
  first = next(iterator)
  t1 = time.perf_counter()
  batches = [first] + [next(iterator) for _ in range(steps - 1)]
  t2 = time.perf_counter()
  io_bytes = _io_bytes() - io_before
  if patch is not None:
    patch.stop()
  per_host = batch // process_count
  own = {tuple(b["index"].tolist()) for b in batches}
  in_epoch = [(keys, size) for keys, size in list(reads) if keys in own]
  if file_format == "array_record":
    records = sum(len(keys) for keys, _ in in_epoch)
    bytes_read = sum(size for _, size in in_epoch)
    read_ahead = sum(len(keys) for keys, _ in reads) - records
  else:  # Per-host ranges: the host's slice of the split, read through its files.
    records, bytes_read, read_ahead = info.num_train // process_count, io_bytes, None
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
  images = per_host * (steps - 1)
  return {
      "process_index": process_index, "records_read": records,
      "bytes_read": bytes_read, "read_ahead_records": read_ahead,
      "io_bytes": io_bytes, "distinct_batches": len(own), "steps": steps,
      "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
      "rss_before_pipeline_mib": rss_before,
      "first_batch_s": t1 - t0,
      "images_per_s_per_core": images / max(t2 - t1, 1e-9) / cores,
      "examples": info.num_train, "cores": cores,
      "index_sum": int(sum(int(np.sum(b["index"])) for b in batches)),
  }


def prepare(data_dir: str, examples: int, file_format: str) -> int:
  """Writes the dataset; returns the bytes of its training files."""
  builder = _builder_class()(data_dir=data_dir, num_train=examples)
  with contextlib.redirect_stdout(sys.stderr):  # TFDS prints progress to stdout.
    builder.download_and_prepare(file_format=file_format)
  folder = builder.data_dir
  return sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder)
             if "-train." in f)


def _host_in_subprocess(args, data_dir, file_format, process_index, process_count):
  command = [sys.executable, os.path.abspath(__file__), "--_host",
             f"{process_index},{process_count}", "--_data_dir", data_dir,
             "--batch", str(args.batch), "--_format", file_format]
  env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
         "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""}
  out = subprocess.run(command, check=True, capture_output=True, text=True, env=env)
  return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--examples", type=int, default=2000)
  p.add_argument("--batch", type=int, default=128, help="global batch size")
  p.add_argument("--processes", default="1,2,4,8")
  p.add_argument("--format", default=None, choices=("array_record", "tfrecord"),
                 help="default: array_record when the package is installed")
  p.add_argument("--json", action="store_true")
  p.add_argument("--results", default=os.path.join(ROOT, "benchmarks", "results"),
                 help="folder for input_scaling.{json,md} ('' to write nothing)")
  p.add_argument("--_host", help=argparse.SUPPRESS)
  p.add_argument("--_data_dir", help=argparse.SUPPRESS)
  p.add_argument("--_format", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args._host:
    index, count = (int(v) for v in args._host.split(","))
    print(json.dumps(run_host(args._data_dir, index, count, args.batch, args._format)))
    return 0

  file_format = args.format or (
      "array_record" if importlib.util.find_spec("array_record") else "tfrecord")
  rows = []
  with tempfile.TemporaryDirectory() as data_dir:
    t0 = time.perf_counter()
    split_bytes = prepare(data_dir, args.examples, file_format)
    write_s = time.perf_counter() - t0
    for count in (int(v) for v in args.processes.split(",")):
      hosts = [_host_in_subprocess(args, data_dir, file_format, i, count)
               for i in range(count)]
      n = hosts[0]["examples"]
      rows.append({
          "processes": count, "format": file_format, "split_examples": n,
          "split_bytes": split_bytes, "global_batch": args.batch,
          "records_read_per_host": max(h["records_read"] for h in hosts),
          "records_read_share": max(h["records_read"] for h in hosts) / n,
          "records_read_all_hosts": sum(h["records_read"] for h in hosts),
          "bytes_read_per_host": max(h["bytes_read"] for h in hosts),
          "read_ahead_records_per_host": max((h["read_ahead_records"] or 0)
                                             for h in hosts),
          "peak_rss_mib": max(h["peak_rss_mib"] for h in hosts),
          "rss_before_pipeline_mib": max(h["rss_before_pipeline_mib"] for h in hosts),
          "images_per_s_per_core": min(h["images_per_s_per_core"] for h in hosts),
          "cores": hosts[0]["cores"],
          "same_examples_as_one_host": sum(h["index_sum"] for h in hosts),
      })
  one = rows[0]["same_examples_as_one_host"]
  for row in rows:  # The hosts together train on the single host's examples.
    row["same_examples_as_one_host"] = row["same_examples_as_one_host"] == one

  from kd_jax import machine
  lines = [f"Dataset: {args.examples} JPEGs of 224-500 px ({file_format}, "
           f"{split_bytes / 2**20:.0f} MiB, written in {write_s:.0f} s); global batch "
           f"{args.batch}; ImageNet augmentation at 224x224; one epoch per host.", "",
           "| hosts P | records read per host | share of split | bytes read per host | "
           "read-ahead records | peak RSS MiB (before pipeline) | images/s per core |",
           "|---" * 7 + "|"]
  lines += [f"| {r['processes']} | {r['records_read_per_host']} | "
            f"{r['records_read_share']:.3f} | {r['bytes_read_per_host'] / 2**20:.1f} MiB | "
            f"{r['read_ahead_records_per_host']} | {r['peak_rss_mib']:.0f} "
            f"({r['rss_before_pipeline_mib']:.0f}) | {r['images_per_s_per_core']:.1f} |"
            for r in rows]
  lines.append(f"\n(host: {machine.describe()}; every simulated host ran in its own "
               "process, one after another; images/s per core: the slowest host, "
               "excluding its first batch)")
  table = "\n".join(lines)
  if args.results:
    machine.write_results(args.results, "input_scaling", rows, table)
  print(json.dumps(rows, indent=2) if args.json else table)
  return 0


if __name__ == "__main__":
  sys.exit(main())
