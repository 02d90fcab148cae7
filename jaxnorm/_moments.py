"""The statistics a layer normalizes with: mean and variance (or RMS norm's mean square) over some axes,
optionally of the positions a mask keeps, optionally combined across the devices of a named axis.

``moments`` and ``mean_square`` are what the layers call; the numerics are ``jaxnorm._statistics``, the
platform's choice of strategy ``jaxnorm._platform`` and the cross-device combination ``jaxnorm._combine``.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jaxnorm._combine import across_devices, group_psum
from jaxnorm._platform import own_moments
from jaxnorm._statistics import abs2, group_count, masked_moments, square_mean, stats_dtype, sum_over, variance

Array = jax.Array


def moments(
    x: Array,
    reduction_axes: Sequence[int],
    *,
    groups: tuple[int, int] | None = None,
    mask: Array | None = None,
    axis_name: Hashable | None = None,
    axis_index_groups: Any = None,
) -> tuple[Array, Array, Array]:
    """Mean, biased variance and element count over ``reduction_axes`` (kept as size-1 dims).

    Computed in ``stats_dtype(x.dtype)``, exact to a few eps whatever the data's offset. With ``mask`` only the
    True positions count. With ``axis_name`` every device's (count, mean, M2) is combined exactly (Chan et al.),
    so uneven per-device counts are weighted correctly. ``groups=(axis, G)`` also pools the channels on ``axis``
    in ``G`` contiguous groups (group norm); the statistics come back per channel (each channel gets its
    group's). Complex x: a complex mean and the real variance ``E|x - mean|^2``. Returns ``(mean, var, count)``;
    ``count`` broadcasts against ``mean`` and is float (0 where a mask keeps nothing).
    """
    axes = tuple(reduction_axes)
    if mask is None:
        count, mean, m2 = own_moments(x, axes, groups)
    else:
        count, mean, m2 = masked_moments(x, mask, axes, groups)
    if axis_name is not None:
        count, mean, m2 = across_devices(count, mean, m2, axis_name, axis_index_groups)
    return mean, variance(m2, count), count


def mean_square(
    x: Array,
    reduction_axes: Sequence[int],
    *,
    mask: Array | None = None,
    axis_name: Hashable | None = None,
    axis_index_groups: Any = None,
) -> Array:
    """Mean of ``x**2`` over ``reduction_axes`` (kept), in ``stats_dtype(x.dtype)`` (RMSNorm's statistic); with
    ``mask`` over the True positions only, with ``axis_name`` over every device's positions (one collective)."""
    axes = tuple(reduction_axes)
    if mask is None and axis_name is None:
        return square_mean(x, axes)
    sq = abs2(x.astype(stats_dtype(x.dtype)))
    if mask is None:
        total, count = jnp.sum(sq, axes, keepdims=True), jnp.full((1,) * x.ndim, group_count(x.shape, axes), sq.dtype)
    else:
        maskb = jnp.broadcast_to(mask, x.shape)
        total, count = jnp.sum(jnp.where(maskb, sq, 0), axes, keepdims=True), sum_over(maskb.astype(sq.dtype), axes)
    if axis_name is not None:
        count = jnp.broadcast_to(count, total.shape)
        total, count = group_psum(jnp.stack([total, count]), axis_name, axis_index_groups)
    return total / jnp.maximum(count, 1)
