"""The statistics numerics: every way jaxnorm computes a mean and a variance, side by side.

Statistics are computed in ``stats_dtype(x.dtype)`` (float32 for float16/bfloat16/float32 inputs, float64 for
float64 inputs) and never lose digits to ``E[x^2] - E[x]^2`` cancellation when the data sit far from zero
against their spread. Each strategy returns ``(mean, M2)``, ``M2`` the sum of squared deviations, over the
reduced axes (kept as size-1 dims); ``variance`` turns ``M2`` and the count into the biased variance.

- ``row_moments``: contiguous rows, the exact two-pass formula ``M2 = sum((x - mean)^2)``;
- ``two_pass``: the same formula over any axes;
- ``checked_one_pass``: ``sum(x)`` and ``sum(x^2)`` in one pass where that is provably accurate, else shifted
  sums behind a ``lax.cond``;
- ``shifted_sums``: deviations from a shift near the mean (Chan, Golub & LeVeque);
- ``masked_moments``: only the positions a mask keeps, by shifted sums around the masked mean;
- ``square_mean``: RMS normalization's statistic, the mean of ``x**2``.

Complex inputs (as Flax): a complex mean and a real variance ``E|x - mean|^2`` (``abs2``), by the two-pass formula
or the masked shifted sums; the count and the variance have the real dtype (``real_dtype``).

Which strategy runs where is ``jaxnorm._platform.moment_strategies``' choice; ``jaxnorm._moments`` adds masks and
devices.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxnorm._xla_cpu import converted_copies, cpu_barrier, staged_sum

Array = jax.Array


def stats_dtype(dtype: Any) -> np.dtype:
    """dtype statistics are computed and stored in: float32, or float64 for float64 inputs (complex64 or
    complex128 for complex inputs)."""
    return jnp.promote_types(dtype, jnp.float32)


def real_dtype(dtype: Any) -> np.dtype:
    """The real dtype of a statistics dtype: a variance's and a count's (float32 for complex64)."""
    return jnp.finfo(dtype).dtype


def in_stats_dtype(t: Array, dtype: Any) -> Array:
    """``t`` in the statistics dtype ``dtype``; a complex ``t`` in the complex dtype of both (its complex mean or
    params stay complex where the variance is real)."""
    return t.astype(jnp.promote_types(t.dtype, dtype) if jnp.iscomplexobj(t) else dtype)


def abs2(d: Array) -> Array:
    """``|d|^2``: ``d^2`` for real ``d``, ``re^2 + im^2`` (real) for complex ``d``."""
    if jnp.iscomplexobj(d):
        return jnp.square(d.real) + jnp.square(d.imag)
    return jnp.square(d)


# --------------------------------------------------------------------------------------------- reductions


def kept_shape(shape: Sequence[int], axes: Sequence[int]) -> tuple[int, ...]:
    """The shape of a statistic over ``axes`` of an array of ``shape``: the reduced axes kept as size-1 dims."""
    return tuple(1 if i in axes else d for i, d in enumerate(shape))


def group_count(shape: Sequence[int], axes: Sequence[int], groups: tuple[int, int] | None = None) -> float:
    """Number of elements each statistic of ``sum_over(t, axes, groups)`` pools."""
    n = float(np.prod([shape[a] for a in axes])) if axes else 1.0
    return n * (shape[groups[0]] // groups[1]) if groups else n


def element_count(x: Array, axes: Sequence[int], groups: tuple[int, int] | None = None) -> Array:
    """The count every layer reports with its statistics: ``group_count`` as an array of x's rank, in the real
    statistics dtype (the masked count, per statistic, is ``masked_moments``')."""
    return jnp.full((1,) * x.ndim, group_count(x.shape, axes, groups), real_dtype(stats_dtype(x.dtype)))


def sum_over(t: Array, axes: tuple[int, ...], groups: tuple[int, int] | None = None) -> Array:
    """``jnp.sum(t, axes, keepdims=True)``; ``groups=(axis, G)`` also sums the channels on ``axis`` within each of
    ``G`` contiguous groups and gives every channel its group's sum (group norm reduces spatially in the input's
    own layout first, which XLA:CPU runs much faster than one reduction over a ``(..., G, C/G)`` view)."""
    if groups is not None:
        return group_combine(sum_over(t, axes), groups)
    return staged_sum(t, axes)


def group_combine(s: Array, groups: tuple[int, int] | None) -> Array:
    """Sum the channels on ``groups[0]`` within each of ``groups[1]`` contiguous groups, per channel."""
    if groups is None:
        return s
    ax, g = groups
    c = s.shape[ax]
    s = jnp.sum(s.reshape(s.shape[:ax] + (g, c // g) + s.shape[ax + 1 :]), ax + 1)
    return jnp.repeat(s, c // g, axis=ax)


def unbiased_variance(var: Array, count: Array) -> Array:
    """The unbiased variance ``var * n / (n - 1)`` from the biased one and the count (``var`` itself for one
    value, which has no spread)."""
    return var * (count / jnp.maximum(count - 1, 1))


def variance(m2: Array, count: Array) -> Array:
    """The biased variance ``M2 / n`` (0 where nothing was counted), never below 0."""
    var = m2 / jnp.maximum(count, 1)
    return jnp.maximum(var, 0)


# --------------------------------------------------------------------------------------------- the strategies


def row_moments(x: Array, dtype: Any, rows: tuple[int, ...], groups: tuple[int, int] | None) -> tuple[Array, Array]:
    """(mean, M2) of contiguous rows (``x.reshape(rows)``, one statistic per row) by the exact two-pass formula.

    No cancellation to guard against: the mean's rounding (eps * log2(n) * |mean|) enters M2 only squared, below
    the rounding already in x itself. A row is contiguous, so XLA fuses both reductions and the normalization that
    follows into one kernel that walks the rows.
    """
    x1, x2 = (c.reshape(rows) for c in converted_copies(x, 2, dtype))
    n = max(x1.shape[-1], 1)  # an empty row (a zero-size batch): sums of nothing, statistics 0
    mean = jnp.sum(x1, -1, keepdims=True) / n
    m2 = jnp.sum(jnp.square(x2 - cpu_barrier(mean)), -1, keepdims=True)
    if groups is not None:  # one statistic per group -> one per channel: (..., G, 1) -> (..., C, 1)
        ax, g = groups
        mean, m2 = (jnp.repeat(t, x.shape[ax] // g, axis=ax) for t in (mean, m2))
    keep = x.shape[: len(rows) - 1] if groups is None else x.shape[: groups[0] + 1]
    shape = tuple(keep) + (1,) * (x.ndim - len(keep))
    return mean.reshape(shape), m2.reshape(shape)


def two_pass(x: Array, dtype: Any, red: Callable[[Array], Array], n: float) -> tuple[Array, Array]:
    """(mean, M2) by the exact two-pass formula: the mean, then ``sum((x - mean)^2)``; no data-dependent branch."""
    xf = x.astype(dtype)
    mean = red(xf) / n
    return mean, red(abs2(xf - mean))


ONE_PASS_MAX_RATIO = 16.0  # the one-pass statistics stand when every group's mean^2 <= 16 x its variance


def checked_one_pass(x: Array, dtype: Any, red: Callable[[Array], Array], n: float) -> tuple[Array, Array]:
    """(mean, M2) from one fused pass when that is provably accurate, else from shifted sums around its mean.

    One pass: ``sum(x)`` and ``sum(x^2)``, two independent reductions of x that XLA fuses into one loop or runs
    side by side. ``E[x^2] - E[x]^2`` loses digits when |mean| >> std: with sums accurate to g = eps * log2(n)
    relative to sum(|x|), the variance's error is at most g * (2 * var + 4 * mean^2). So the pass is kept only when
    every group has ``mean^2 <= 16 * var`` (and a finite variance), which bounds the error by 66 * g (~1e-4
    relative in float32 for a million values; random rounding makes it far smaller in practice); the test cannot
    be fooled by the cancellation itself, because that error is far below ``mean^2``.
    Otherwise (data far off zero, or sums of squares that overflow) a ``lax.cond`` runs two more passes: shifted
    sums around the one-pass mean m, exact to a few eps because m is within a few std of the mean (float32 with
    mean 1e6 and std 1 keeps its digits). Under ``vmap`` the predicate is batched and the cond becomes a select:
    both branches run, still exact.
    """
    x1, x2 = converted_copies(x, 2, dtype)
    s1, s2 = red(x1), red(jnp.square(x2))
    m = s1 / n
    var = s2 / n - jnp.square(m)
    one_pass_ok = jnp.all(jnp.isfinite(var) & (jnp.square(m) <= ONE_PASS_MAX_RATIO * var))

    def shifted(m):  # x is converted inside the branch, so the fast path never pays for it
        (x_a, x_b), (m_a, m_b) = cpu_barrier(((x, x), (m, m)))
        return shifted_sums(red, x_a.astype(dtype) - m_a, x_b.astype(dtype) - m_b, m, n)

    return jax.lax.cond(one_pass_ok, lambda m: (m, var * n), shifted, m)


def shifted_sums(red: Callable[[Array], Array], d_a: Array, d_b: Array, shift: Array, count: Any):
    """(mean, M2) from deviations ``d = x - shift``: ``mean = shift + sum(d)/n``, ``M2 = sum(d^2) - sum(d)^2/n``;
    ``sum(d)`` repairs the shift's offset. ``d_a`` and ``d_b`` are the same deviations, given twice so each
    reduction can fuse its own copy."""
    t1, t2 = red(d_a), red(abs2(d_b))
    return shift + t1 / count, t2 - abs2(t1) / count


def masked_moments(x: Array, mask: Array, axes: tuple[int, ...], groups: tuple[int, int] | None):
    """(count, mean, M2) over the positions where ``mask`` (broadcast to x) is True: shifted sums around the
    masked mean. ``count`` is per statistic (float)."""
    red = functools.partial(sum_over, axes=axes, groups=groups)
    dtype = stats_dtype(x.dtype)
    xf, maskb = x.astype(dtype), jnp.broadcast_to(mask, x.shape)
    count = red(maskb.astype(real_dtype(dtype)))
    safe = jnp.maximum(count, 1)
    shift = red(jnp.where(maskb, xf, 0)) / safe
    d = jnp.where(maskb, xf - shift, 0)
    mean, m2 = shifted_sums(red, d, d, shift, safe)
    return count, mean, m2


def square_mean(x: Array, axes: tuple[int, ...]) -> Array:
    """Mean of ``x**2`` over ``axes`` (kept), in ``stats_dtype(x.dtype)``: RMS normalization's statistic."""
    xf = x.astype(stats_dtype(x.dtype))
    if group_count(x.shape, axes) == 0:  # an empty reduction: nothing to average
        return jnp.zeros(kept_shape(x.shape, axes), real_dtype(xf.dtype))
    return jnp.mean(abs2(xf), axes, keepdims=True)
