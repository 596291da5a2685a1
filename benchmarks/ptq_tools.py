"""Post-training quantisers compared: the TFLite converter's (what kd_jax exports) and
litert-quantizer's recipes, on the same fp32 flatbuffers.

For each model: the converter's fp32, fp16, dynamic-range and full-int8 variants
(`kd_jax.export.to_tflite`), and litert-quantizer's `static_wi8_ai8` (full int8),
`static_wi8_ai16` (int16 activations), `dynamic_wi8_afp32` and `weight_only_wi8_afp32`
applied to the converter's fp32 flatbuffer (with a `serving_default` signature added,
which the quantizer needs), calibrated on the same images. Reported: bytes, latency at
1 thread (median of alternating single-image invokes, all variants of a model timed in
one loop), the ratio to fp32, max |logit − fp32 logit| / max |fp32 logit|, agreement of
the top-1 with fp32, and top-1 on the eval split when a run is given.

Models: resnet8x4 and MobileNetV2 at 32×32×3 (100 classes, random weights, BatchNorm
statistics from one train-mode batch; calibration and probe images standard normal),
plus the distilled student of a finished run (`--workdir`, e.g. the default's
runs/digits; its eval split gives top-1).

litert-quantizer is not a dependency of kd_jax: install it beside it to run this
(`pip install litert-quantizer`; it pins the same ai-edge-litert).

Run:
  python benchmarks/ptq_tools.py --workdir=runs/digits
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

CONVERTER = ("fp32", "fp16", "dynamic", "int8")
RECIPES = ("static_wi8_ai8", "static_wi8_ai16", "dynamic_wi8_afp32", "weight_only_wi8_afp32")


def with_signature(flatbuffer: bytes) -> bytes:
  """The flatbuffer with a `serving_default` signature over its one input and output."""
  import flatbuffers
  from ai_edge_litert import schema_py_generated as schema
  model = schema.ModelT.InitFromPackedBuf(bytearray(flatbuffer), 0)
  graph = model.subgraphs[0]

  def tensor_map(index, name):
    entry = schema.TensorMapT()
    entry.name, entry.tensorIndex = name, index
    return entry

  signature = schema.SignatureDefT()
  signature.signatureKey, signature.subgraphIndex = "serving_default", 0
  signature.inputs = [tensor_map(graph.inputs[0], "images")]
  signature.outputs = [tensor_map(graph.outputs[0], "logits")]
  model.signatureDefs = [signature]
  builder = flatbuffers.Builder(1024)
  builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
  return bytes(builder.Output())


def quantize_with_recipes(fp32: bytes, calibration) -> dict[str, bytes]:
  """litert-quantizer's recipes applied to `fp32`; {recipe: flatbuffer or error text}."""
  from litert_quantizer import quantizer, recipe
  out = {}
  with tempfile.TemporaryDirectory() as tmp:
    source = os.path.join(tmp, "fp32.tflite")
    with open(source, "wb") as f:
      f.write(with_signature(fp32))
    data = {"serving_default": [{"images": calibration[i:i + 1]}
                                for i in range(len(calibration))]}
    for name in RECIPES:
      q = quantizer.Quantizer(source)
      q.load_quantization_recipe(getattr(recipe, name)())
      result = q.calibrate(data, num_threads=1) if name.startswith("static") else None
      target = os.path.join(tmp, f"{name}.tflite")
      q.quantize(result, enable_progress_report=False).export_model(target, overwrite=True)
      with open(target, "rb") as f:
        out[name] = f.read()
  return out


def compare(label, flatbuffers_by_variant, probe, eval_images=None, eval_labels=None,
            rounds=200):
  import numpy as np
  from kd_jax import export
  models = {v: export.TFLiteModel(fb) for v, fb in flatbuffers_by_variant.items()}
  image = probe[:1]
  times = {v: [] for v in models}
  for m in models.values():
    for _ in range(10):
      m.invoke(image)
  for _ in range(rounds):
    for v, m in models.items():
      start = time.perf_counter()
      m.invoke(image)
      times[v].append((time.perf_counter() - start) * 1e3)
  reference = models["fp32"](probe)
  base = float(np.median(times["fp32"]))
  rows = {}
  for v, m in models.items():
    logits = m(probe)
    row = dict(model=label, variant=v, bytes=len(flatbuffers_by_variant[v]),
               latency_ms=float(np.median(times[v])),
               ratio=float(np.median(times[v])) / base,
               rel_logit_diff=float(np.abs(logits - reference).max()
                                    / np.abs(reference).max()),
               top1_agreement=float(np.mean(logits.argmax(-1) == reference.argmax(-1))),
               accuracy=None)
    if eval_images is not None:
      row["accuracy"] = float(np.mean(m(eval_images).argmax(-1) == eval_labels))
    rows[f"{label} {v}"] = row
  return rows


def zoo_model(name, shape, classes, rng):
  import jax
  import jax.numpy as jnp
  from kd_jax import export, models
  model = models.create(name, classes, cpu_ops=False)
  images = rng.normal(size=(64, *shape)).astype("float32")
  variables = model.init(jax.random.key(0), jnp.zeros((1, *shape)))
  _, stats = model.apply(variables, images, train=True, mutable=["batch_stats"])
  variables = {**variables, **stats}
  calibration, probe = images[:32], images[32:]
  return {q: export.to_tflite(model, variables, shape, q, calibration)
          for q in CONVERTER}, calibration, probe


def run_model(workdir):
  """The converter's variants of a finished run's distilled student, its calibration
  images and its eval split."""
  import numpy as np
  import jax.numpy as jnp
  from kd_jax import configs, export, parallel, rundir
  from kd_jax.data import pipeline as data_lib
  config = configs.validate(configs.load_run_config(workdir))
  info = data_lib.get_info(config.data)
  student, variables = rundir.load_phase(config, workdir, rundir.DISTILLED, info)
  student = student.clone(dtype=jnp.float32)
  variables = parallel.to_host(variables)
  calibration = data_lib.representative_images(
      config.data, int(config.export.num_calibration_images))
  images, labels = [], []
  for batch in data_lib.host_eval_iterator(config.data, batch_size=256):
    keep = np.asarray(batch.get("mask", np.ones(len(batch["label"]))), bool)
    images.append(batch["image"][keep])
    labels.append(np.asarray(batch["label"])[keep])
  shape = tuple(info.image_shape)
  fbs = {q: export.to_tflite(student, variables, shape, q, calibration) for q in CONVERTER}
  return fbs, calibration, np.concatenate(images), np.concatenate(labels)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", default="", help="a finished run (e.g. runs/digits)")
  parser.add_argument("--rounds", type=int, default=200)
  parser.add_argument("--results", default=os.path.join(
      os.path.dirname(os.path.abspath(__file__)), "results"),
                      help="folder for ptq_tools.{json,md} ('' to write nothing)")
  args = parser.parse_args(argv)
  try:
    import litert_quantizer  # noqa: F401
  except ImportError:
    sys.exit("benchmarks/ptq_tools.py needs litert-quantizer: pip install litert-quantizer")
  import numpy as np
  from kd_jax import machine, runtime
  runtime.configure()
  rng = np.random.default_rng(0)
  rows = {}
  for name in ("resnet8x4", "MobileNetV2"):
    fbs, calibration, probe = zoo_model(name, (32, 32, 3), 100, rng)
    fbs.update({f"lq {k}": v for k, v in quantize_with_recipes(fbs["fp32"],
                                                                calibration).items()})
    rows.update(compare(name, fbs, probe, rounds=args.rounds))
  if args.workdir:
    fbs, calibration, images, labels = run_model(args.workdir)
    fbs.update({f"lq {k}": v for k, v in quantize_with_recipes(fbs["fp32"],
                                                                calibration).items()})
    rows.update(compare(os.path.basename(os.path.normpath(args.workdir)), fbs,
                        images[:64], images, labels, rounds=args.rounds))
  lines = ["| model | variant | bytes | latency ms (1 thread) | × fp32 | max rel logit diff "
           "| top-1 agrees with fp32 | top-1 |", "|---|---|---|---|---|---|---|---|"]
  for r in rows.values():
    accuracy = "–" if r["accuracy"] is None else f"{r['accuracy']:.4f}"
    lines.append(f"| {r['model']} | {r['variant']} | {r['bytes']:,} | {r['latency_ms']:.3f} "
                 f"| {r['ratio']:.2f} | {r['rel_logit_diff']:.1e} | "
                 f"{r['top1_agreement']:.3f} | {accuracy} |")
  table = ("\n".join(lines) + f"\n\nLatency {machine.describe(threads=1)}; 'lq' rows are "
           "litert-quantizer recipes applied to the converter's fp32 flatbuffer.\n")
  if args.results:
    machine.write_results(args.results, "ptq_tools", rows, table)
  print(table)


if __name__ == "__main__":
  main()
