"""Helpers shared by the losses: dtypes, safe normalisation, spatial pooling."""
from typing import Tuple

import jax
import jax.numpy as jnp


def as_student_and_teacher(student: jax.typing.ArrayLike,
                           teacher: jax.typing.ArrayLike
                           ) -> Tuple[jax.Array, jax.Array]:
  """Casts both inputs to at least float32 and makes the teacher a constant.

  Reduced-precision inputs (bfloat16, float16) are promoted so that every loss
  returns a float32 scalar; float64 inputs stay float64. The teacher is wrapped
  in `jax.lax.stop_gradient`, as the reference implementations compute it under
  `torch.no_grad()`.

  Args:
    student: student tensor.
    teacher: teacher tensor.

  Returns:
    `(student, teacher)` as floating arrays.
  """
  return as_float(student), jax.lax.stop_gradient(as_float(teacher))


def as_float(x: jax.typing.ArrayLike) -> jax.Array:
  """Returns `x` as a floating array of at least float32 precision."""
  x = jnp.asarray(x)
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-12) -> jax.Array:
  """`x / max(||x||_2, eps)` along `axis` (torch `F.normalize`), safe at 0.

  `max(sqrt(s), eps) == sqrt(max(s, eps**2))`; taking the maximum before the
  square root keeps the gradient finite for all-zero vectors.

  Args:
    x: array to normalise.
    axis: axis holding the vectors.
    eps: lower bound on the norm.

  Returns:
    An array shaped like `x`.
  """
  squared_norm = jnp.sum(jnp.square(x), axis=axis, keepdims=True)
  return x * jax.lax.rsqrt(jnp.maximum(squared_norm, eps * eps))


def safe_sqrt(x: jax.Array) -> jax.Array:
  """`sqrt(x)` for `x >= 0`, with a zero (not inf/NaN) gradient at `x == 0`."""
  positive = x > 0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, x, 1.0)), 0.0)


def average_pool_to(x: jax.Array, height: int, width: int) -> jax.Array:
  """Average-pools an NHWC map down to `height` x `width` by integer factors.

  Equals PyTorch's `adaptive_avg_pool2d` when the sizes divide exactly.

  Args:
    x: `[B, H, W, C]` map with `H % height == 0` and `W % width == 0`.
    height: output height.
    width: output width.

  Returns:
    A `[B, height, width, C]` map.

  Raises:
    ValueError: if a spatial size is not an integer multiple of the target.
  """
  batch, in_height, in_width, channels = x.shape
  if (in_height, in_width) == (height, width):
    return x
  if in_height % height or in_width % width:
    raise ValueError(
        f"cannot average-pool a {in_height}x{in_width} map to "
        f"{height}x{width}: the spatial sizes must be integer multiples of "
        "each other")
  x = x.reshape(batch, height, in_height // height, width, in_width // width,
                channels)
  return x.mean(axis=(2, 4))


def match_spatial(student: jax.Array,
                  teacher: jax.Array) -> Tuple[jax.Array, jax.Array]:
  """Average-pools the larger of two NHWC maps to the other's spatial size."""
  if student.ndim != 4 or teacher.ndim != 4:
    raise ValueError("expected NHWC feature maps, got shapes "
                     f"{student.shape} and {teacher.shape}")
  height = min(student.shape[1], teacher.shape[1])
  width = min(student.shape[2], teacher.shape[2])
  return (average_pool_to(student, height, width),
          average_pool_to(teacher, height, width))
