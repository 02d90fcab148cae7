"""XLA:CPU scheduling: how the statistics and the derivative are laid out so XLA:CPU compiles them well.

Nothing here changes a value; each helper only changes how XLA:CPU schedules the same arithmetic. Each was measured
on XLA:CPU (what it bought is in the performance page, "XLA:CPU scheduling"):

- ``cpu_barrier``: an optimization barrier, on CPU only, handing each full-size consumer its own copy of an
  operand, so XLA:CPU recomputes ``x - mean`` or converts bfloat16 inside each fusion instead of writing the shared
  value to memory;
- ``converted_copies``: one conversion of a narrow input per consumer, behind one barrier;
- ``ROW_FUSION_MIN_ROWS`` and ``contiguous_rows``: from 4096 contiguous rows on, XLA:CPU fuses the row statistics
  and the normalization into one row-wise kernel (layer norm's forward is one fusion: one read of x, one write of
  y); with fewer rows the checked one pass is faster;
- ``staged_sum``: a reduction over outer axes and a trailing block runs as two, the outer axes first.

``cpu_barrier`` is resolved when the program is lowered (``jax.lax.platform_dependent``): programs for GPUs and
TPUs, which fuse differently and where none of this was measured, hold no barrier. The other helpers are shapes
of the same reductions and apply everywhere.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array

ROW_FUSION_MIN_ROWS = 4096  # row statistics from this many rows on (see contiguous_rows)


def cpu_barrier(tree: Any) -> Any:
    """``jax.lax.optimization_barrier`` of ``tree`` where the program is compiled for CPU; ``tree`` elsewhere (a
    program lowered for one platform holds that platform's branch only; a multi-platform export holds both)."""
    return jax.lax.platform_dependent(tree, cpu=jax.lax.optimization_barrier, default=lambda t: t)


def converted_copies(t: Array, k: int, dtype: Any) -> Iterator[Array]:
    """An iterator over ``k`` copies of ``t`` in ``dtype``, one per full-size consumer; a narrower ``t`` is
    converted lazily from its own copy behind an optimization barrier."""
    if t.dtype == dtype:
        return iter((t,) * k)
    return (c.astype(dtype) for c in cpu_barrier((t,) * k))


def contiguous_rows(shape: Sequence[int], axes: tuple[int, ...], groups: tuple[int, int] | None):
    """``shape`` as ``(rows..., row_length)`` when each statistic pools one contiguous row, else None.

    Rows: the reduced axes are the trailing block (layer norm; instance norm in NCHW), or, with ``groups``, the
    trailing block right after the channel axis (group norm in NCHW: a group's channels are adjacent).
    """
    k = len(shape) - len(axes)
    if not axes or tuple(sorted(axes)) != tuple(range(k, len(shape))):
        return None
    row = math.prod(shape[k:])  # the row length, written out: a zero-size batch has no rows to infer it from
    if groups is None:
        return tuple(shape[:k]) + (row,)
    if groups[0] == k - 1:
        return tuple(shape[: k - 1]) + (groups[1], shape[k - 1] // groups[1] * row)
    return None


def staged_sum(t: Array, axes: tuple[int, ...]) -> Array:
    """``jnp.sum(t, axes, keepdims=True)``; over some outer axes *and* a trailing block, the outer axes first
    (keeping the contiguous minor dims), then the trailing block."""
    axes = tuple(sorted(axes))
    trailing = []
    for a in range(t.ndim - 1, -1, -1):
        if a not in axes:
            break
        trailing.append(a)
    rest = tuple(a for a in axes if a not in trailing)
    if not trailing or not rest:
        return jnp.sum(t, axes, keepdims=True)
    return jnp.sum(jnp.sum(t, rest, keepdims=True), tuple(trailing), keepdims=True)
