"""Normalize and affine: ``(x - mean) * rsqrt(var + eps) * scale + bias``, the one elementwise step of every
layer, and the params shaped for it."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxnorm._statistics import in_stats_dtype

Array = jax.Array


def normalize(
    x: Array,
    mean: Array | None,
    var: Array,
    eps: float,
    scale: Array | None = None,
    bias: Array | None = None,
) -> Array:
    """``(x - mean) * rsqrt(var + eps) * scale + bias`` in the statistics' dtype, returned in ``x.dtype``.

    ``mean``/``var``/``scale``/``bias`` must already broadcast against ``x`` at equal rank; ``mean=None`` skips
    centring (RMSNorm, where ``var`` is the mean square). The per-element work is one subtract and one fused
    multiply-add: the scale is folded into the per-statistic ``rsqrt(var + eps)`` first. Complex x: a complex
    mean, a real variance; complex params make the result complex.
    """
    dtype = var.dtype
    mul = jax.lax.rsqrt(var + jnp.asarray(eps, dtype))
    if scale is not None:
        mul = mul * in_stats_dtype(scale, dtype)
    xf = in_stats_dtype(x, dtype)
    if mean is not None:
        xf = xf - mean
    y = xf * mul
    if bias is not None:
        y = y + in_stats_dtype(bias, dtype)
    if jnp.iscomplexobj(y) and not jnp.iscomplexobj(x):  # complex params on real x: a complex result, as Flax
        return y.astype(jnp.result_type(x.dtype, jnp.complex64))
    return y.astype(x.dtype)


def affine_arrays(params: dict, bshape: tuple[int, ...]) -> tuple[Array | None, Array | None]:
    """(scale, bias) of ``params`` reshaped to broadcast against x (``bshape``); None for an absent one."""
    scale, bias = (params[k].reshape(bshape) if k in params else None for k in ("scale", "bias"))
    return scale, bias
