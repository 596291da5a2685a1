"""Compression for edge deployment: quantization-aware training, channel pruning, early exits.

Each module takes a trained student (a zoo model and its variables) and returns a
smaller or cheaper one that the framework trains, evaluates and exports to TFLite:

  quantize     fake-quantised (int8) student for quantization-aware distillation
  prune        structured channel pruning to a FLOPs target, channels physically removed
  early_exit   exit heads after chosen stages, confidence-thresholded inference
"""
