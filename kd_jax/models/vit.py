"""DeiT-Tiny: a small vision transformer student with a distillation token.

Touvron et al., "Training data-efficient image transformers & distillation through
attention", ICML 2021, as timm's ``deit_tiny_distilled_patch16_224`` defines it (whose
parameter count the tests check): the image cut into ``p x p`` patches, each linearly
embedded (a ``p x p`` convolution of stride ``p``, with bias) to width ``D``; a learned
class token and a learned distillation token put before the ``N`` patch tokens; a
learned position embedding for all ``N + 2`` tokens; ``depth`` pre-norm blocks

    x = x + proj(MHSA(LN(x))),   x = x + fc2(GELU(fc1(LN(x))))

with ``softmax(q k^T / sqrt(D / h))`` attention over ``h`` heads (one ``D -> 3D`` dense
for queries, keys and values, with biases); a final LayerNorm (``eps=1e-6``, as timm's);
and two linear heads, the class head on the class token and the distillation head on
the distillation token.

Outputs follow the official code: in training the logits are the class head's,
``z_cls``, and the distillation head's ``z_dist`` is the tap ``distill_logits`` (the
`deit` objective term trains it on the teacher's predictions); in evaluation the
logits are the mean of the two heads, ``(z_cls + z_dist) / 2``.

GELU is the tanh approximation ``0.5 x (1 + tanh(sqrt(2/pi)(x + 0.044715 x^3)))``
(the reference uses the erf form; they differ by less than 5e-4 everywhere): erf has no
TFLite builtin, the tanh form converts to builtins only. Stochastic depth
(``drop_path_rate``, 0.1 as the DeiT-Tiny recipe, growing linearly over the blocks
from 0) applies in training when the apply gets a ``'dropout'`` rng.

``deit_tiny_cifar`` takes 32x32 images with 4x4 patches (64 patch tokens), otherwise
the same. There is no reference CIFAR definition of DeiT; this one only changes the
patch size, so its parameters differ from ``deit_tiny``'s by the patch embedding and
the position embedding alone.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from kd_jax.models.layers import Classifier, quant_point, torch_default_init

# timm initialises the tokens, the position embedding and every dense kernel from a
# normal truncated at two standard deviations, std 0.02, and the biases at zero.
trunc_normal = nn.initializers.truncated_normal(0.02)
LN_EPSILON = 1e-6
DISTILL_LOGITS = "distill_logits"  # the tap holding the distillation head's logits


def drop_path(x: jax.Array, rate: float, module: nn.Module, train: bool) -> jax.Array:
  """Stochastic depth: each example's branch kept with probability ``1 - rate`` and
  then scaled by ``1 / (1 - rate)``; the identity outside training, at rate 0, or
  without a ``'dropout'`` rng."""
  if not train or rate == 0.0 or not module.has_rng("dropout"):
    return x
  keep = jax.random.bernoulli(module.make_rng("dropout"), 1.0 - rate,
                              (x.shape[0],) + (1,) * (x.ndim - 1))
  return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


class Attention(nn.Module):
  """Multi-head self-attention over ``[B, T, D]`` tokens.

  ``q, k, v = split(x W_qkv + b)``, per head ``softmax(q k^T / sqrt(d)) v`` with
  ``d = D / heads``, heads concatenated, then a ``D -> D`` projection.
  """
  num_heads: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    batch, tokens, width = x.shape
    head_dim = width // self.num_heads
    qkv = nn.Dense(3 * width, dtype=self.dtype, kernel_init=trunc_normal, name="qkv")(x)
    qkv = qkv.reshape(batch, tokens, 3, self.num_heads, head_dim)
    q, k, v = (jnp.transpose(qkv[:, :, i], (0, 2, 1, 3)) for i in range(3))  # [B,h,T,d]
    scores = jnp.einsum("bhqd,bhkd->bhqk", q, k) * (head_dim ** -0.5)
    weights = quant_point(jax.nn.softmax(scores.astype(jnp.float32), axis=-1)
                          .astype(self.dtype), "weights")
    out = jnp.einsum("bhqk,bhkd->bhqd", weights, v)
    out = quant_point(jnp.transpose(out, (0, 2, 1, 3)).reshape(batch, tokens, width),
                      "heads")
    return nn.Dense(width, dtype=self.dtype, kernel_init=trunc_normal, name="proj")(out)


class Block(nn.Module):
  """A pre-norm transformer block: attention and an MLP (``D -> mlp_dim -> D``, GELU),
  each on a LayerNorm of its input and added back to it."""
  num_heads: int
  mlp_dim: int
  drop_path_rate: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    width = x.shape[-1]
    y = nn.LayerNorm(LN_EPSILON, dtype=self.dtype, name="norm1")(x)
    y = Attention(self.num_heads, self.dtype, name="attn")(quant_point(y, "norm1_out"))
    x = quant_point(x + drop_path(y, self.drop_path_rate, self, train), "attn_sum")
    y = nn.LayerNorm(LN_EPSILON, dtype=self.dtype, name="norm2")(x)
    y = nn.Dense(self.mlp_dim, dtype=self.dtype, kernel_init=trunc_normal,
                 name="fc1")(quant_point(y, "norm2_out"))
    y = quant_point(nn.gelu(y, approximate=True), "gelu")
    y = nn.Dense(width, dtype=self.dtype, kernel_init=trunc_normal, name="fc2")(y)
    return quant_point(x + drop_path(y, self.drop_path_rate, self, train), "mlp_sum")


class DeiT(Classifier):
  """DeiT with a distillation token (defaults: DeiT-Tiny, timm's definition).

  Attributes:
    patch_size: side ``p`` of the square patches; the image sides must be multiples.
    width: token width ``D``.
    depth: number of transformer blocks.
    num_heads: attention heads ``h`` (``D`` divisible by ``h``).
    mlp_dim: hidden width of each block's MLP.
    drop_path_rate: stochastic-depth rate of the last block (linear from 0).

  Taps: ``block_k`` (k = 1..depth), block k's output tokens ``[B, N + 2, D]`` (class
  token, distillation token, then the patches in row-major order; not NHWC maps);
  ``embedding``, the class token after the final LayerNorm ``[B, D]`` (the class head's
  input); ``distill_embedding``, the distillation token after it; ``distill_logits``,
  the distillation head's float32 logits ``[B, num_classes]``.
  """
  patch_size: int = 16
  width: int = 192
  depth: int = 12
  num_heads: int = 3
  mlp_dim: int = 768
  drop_path_rate: float = 0.1

  @nn.compact
  def __call__(self, x, train: bool = False):
    height, side = x.shape[1:3]
    p = self.patch_size
    if height % p or side % p:
      raise ValueError(f"a {height}x{side} image does not split into {p}x{p} patches; "
                       "set the model's kwargs patch_size (student.kwargs.patch_size or "
                       "teacher.kwargs.patch_size) to a divisor of both sides")
    if self.width % self.num_heads:
      raise ValueError(f"width={self.width} is not divisible by num_heads="
                       f"{self.num_heads}; set the model's kwargs num_heads to a divisor")
    x = nn.Conv(self.width, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype,
                kernel_init=torch_default_init, name="patch_embed")(x.astype(self.dtype))
    batch = x.shape[0]
    x = x.reshape(batch, -1, self.width)
    tokens = [self.param(name, trunc_normal, (1, 1, self.width))
              for name in ("cls_token", "dist_token")]
    x = jnp.concatenate([jnp.broadcast_to(t, (batch, 1, self.width)).astype(self.dtype)
                         for t in tokens] + [x], axis=1)
    position = self.param("pos_embed", trunc_normal, (1, x.shape[1], self.width))
    x = quant_point(x + position.astype(self.dtype), "tokens")
    taps = {}
    for k in range(self.depth):
      rate = self.drop_path_rate * k / max(1, self.depth - 1)
      x = Block(self.num_heads, self.mlp_dim, rate, self.dtype, name=f"block{k}")(x, train)
      taps[f"block_{k + 1}"] = x
    x = nn.LayerNorm(LN_EPSILON, dtype=self.dtype, name="norm")(x)
    taps["embedding"] = quant_point(x[:, 0], "embedding")
    taps["distill_embedding"] = quant_point(x[:, 1], "distill_embedding")
    logits = self.head(taps["embedding"], kernel_init=trunc_normal)
    taps[DISTILL_LOGITS] = nn.Dense(
        self.num_classes, dtype=self.dtype, kernel_init=trunc_normal,
        name="distill_classifier")(taps["distill_embedding"]).astype(jnp.float32)
    if train:
      return logits, taps
    return (logits + taps[DISTILL_LOGITS]) / 2, taps
