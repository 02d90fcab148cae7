"""The statistics a layer normalizes with: mean and variance (or RMS norm's mean square) over some axes,
optionally of the positions a mask keeps, optionally combined across the devices of a named axis.

``moments`` and ``mean_square`` are what the layers call when the statistics carry a mask or a named axis (and what
the variants call); without either, ``jaxnorm._derivative.normalize_batch`` computes them inside its derivative
rule. The formulas are ``jaxnorm._statistics``', the platform's choice among them ``jaxnorm._platform``'s, and the
cross-device combination ``jaxnorm._combine``'s.
"""

from __future__ import annotations

import functools
from collections.abc import Hashable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jaxnorm._combine import across_devices, group_psum
from jaxnorm._platform import moment_strategies
from jaxnorm._statistics import (
    abs2,
    element_count,
    group_count,
    masked_moments,
    square_mean,
    stats_dtype,
    sum_over,
    two_pass,
    variance,
)

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
    if mask is not None:
        count, mean, m2 = masked_moments(x, mask, axes, groups)
    elif jnp.iscomplexobj(x):  # complex: the two-pass formula everywhere (nothing measured for it)
        count = element_count(x, axes, groups)
        n = max(group_count(x.shape, axes, groups), 1.0)
        mean, m2 = two_pass(x, stats_dtype(x.dtype), functools.partial(sum_over, axes=axes, groups=groups), n)
    else:
        count = element_count(x, axes, groups)
        mean, m2 = jax.lax.platform_dependent(x, **moment_strategies(x, axes, groups))
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
        total, count = jnp.sum(sq, axes, keepdims=True), element_count(x, axes)
    else:
        maskb = jnp.broadcast_to(mask, x.shape)
        total, count = jnp.sum(jnp.where(maskb, sq, 0), axes, keepdims=True), sum_over(maskb.astype(sq.dtype), axes)
    if axis_name is not None:
        count = jnp.broadcast_to(count, total.shape)
        total, count = group_psum(jnp.stack([total, count]), axis_name, axis_index_groups)
    return total / jnp.maximum(count, 1)
