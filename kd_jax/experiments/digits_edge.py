"""The digits default, then every edge phase: QAT, 50%-FLOPs pruning, early exits.

After the teacher, the vanilla and the distilled resnet8 student of
experiments/digits.py, the distilled student is
- fine-tuned for 15 epochs with int8 weights and activations simulated (QAT) and
  exported to full-int8 TFLite, beside the post-training-quantised (PTQ) int8 one;
- pruned to half its MACs (inner channels of its residual blocks, ranked by BatchNorm
  scale), then distilled again for 30 epochs to recover, and exported;
- given exit heads after stages 1 and 2, trained against the teacher's logits, with
  the accuracy vs average MACs of the exit cascade per confidence threshold.
`<workdir>/export/export.md` tabulates every exported model (bytes, accuracy in the
LiteRT interpreter, parity with JAX, latency at 1 and all threads, MACs, params);
`benchmarks/edge_table.py` prints the same table with the CIFAR-shaped latencies.

Run (about 5 minutes on 2 CPU cores):
  kd-jax distill --config=experiments/digits_edge.py --workdir=runs/digits_edge
The tests run `get_config('tiny')`.
"""
from kd_jax import configs


def get_config(variant: str = ""):
  if variant not in ("", "tiny"):
    raise ValueError(f"unknown variant {variant!r} of experiments/digits_edge.py; "
                     "use '' or 'tiny'")
  c = configs.experiment_config("digits", variant)
  c.export.variants = ("fp32", "fp16", "dynamic", "int8")
  for phase in ("qat", "prune", "exits"):
    c.edge[phase].enabled = True
  if variant == "tiny":
    c.train_vanilla = False
    c.export.variants = ("fp32", "int8")
    c.edge.qat.train.epochs = 1
    c.edge.prune.train.epochs = 1
    c.edge.exits.steps = 10
    # Heads trained 10 steps are near chance and rarely confident: at 0.2 about half the
    # digits leave early (0.9 keeps every one to the final classifier).
    c.edge.exits.threshold = 0.2
  return c
