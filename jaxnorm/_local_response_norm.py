"""Local response normalization (torch.nn.LocalResponseNorm, AlexNet's LRN) as a pure function.

No parameters and no state: each value is divided by ``(k + alpha * mean of x**2 over the `size` neighbouring
channels) ** beta``. PyTorch's window: channels ``c - size // 2`` to ``c + (size - 1) // 2``, zero-padded at the
ends and always averaged over ``size`` (the padding counts).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxnorm._checks import canonical_axis, check_input
from jaxnorm._statistics import stats_dtype

Array = jax.Array
_LAYER = "local_response_norm"


def _check_positive_float(value: Any, name: str, *, allow_zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
            value >= 0 if allow_zero else value > 0):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{_LAYER}: `{name}` must be a float {bound}, got {value!r}.")
    return float(value)


def local_response_norm(
    x: Array, *, size: int, alpha: float = 1e-4, beta: float = 0.75, k: float = 1.0, axis: int = 1
) -> Array:
    """Local response normalization: ``y = x / (k + alpha / size * sum(x**2 over the channel window)) ** beta``.

    PyTorch's ``LocalResponseNorm(size, alpha, beta, k)``: the window holds ``size`` channels, from ``size // 2``
    before a channel to ``(size - 1) // 2`` after it, zero-padded at the edges. Computed in at least float32.

    Args:
      x: ``(N, C, ...)``, the channels on ``axis``.
      size: the channels in the window.
      alpha, beta, k: the formula's constants.
      axis: the channel axis.

    Returns:
      y, with x's shape and dtype.
    """
    x = check_input(x, _LAYER, min_ndim=3, what="rank >= 3: (N, C, spatial...) as torch's LocalResponseNorm")
    ax = canonical_axis(axis, x.ndim, _LAYER)
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"{_LAYER}: `size` (channels in the window) must be a positive int, got {size!r}.")
    alpha = _check_positive_float(alpha, "alpha", allow_zero=True)
    beta = _check_positive_float(beta, "beta", allow_zero=True)
    k = _check_positive_float(k, "k")
    xf = x.astype(stats_dtype(x.dtype))
    window = tuple(size if i == ax else 1 for i in range(x.ndim))
    pads = tuple((size // 2, (size - 1) // 2) if i == ax else (0, 0) for i in range(x.ndim))
    sums = jax.lax.reduce_window(jnp.square(xf), 0.0, jax.lax.add, window, (1,) * x.ndim, pads)
    return (xf * (k + (alpha / size) * sums) ** -beta).astype(x.dtype)
