"""Running statistics: their fresh state, how a layer reads them, and PyTorch's update after a training batch.

State (``batch_stats``)::

    {"mean": (C,) float32, "var": (C,) float32, "count": () int32}   # count = PyTorch's num_batches_tracked
    # + "skipped": () int32 with nonfinite_guard=True; without "count": a state saved by flax.linen.BatchNorm

float64 for a float64 layer. Batch norm, instance norm (with running statistics), batch renorm and every wrapper
use these three functions.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from jaxnorm._statistics import in_stats_dtype, real_dtype, stats_dtype, unbiased_variance

Array = jax.Array


def running_stats_init(num_features: int | tuple[int, ...], dtype: Any = jnp.float32,
                       nonfinite_guard: bool = False, *, count: bool = True) -> dict[str, Array]:
    """PyTorch's fresh running statistics: mean 0, var 1 (of ``stats_dtype(dtype)``; the variance real for a
    complex dtype), count 0; ``count=False`` leaves the counter out (Flax's layout)."""
    shape = (num_features,) if isinstance(num_features, int) else tuple(num_features)
    sdtype = stats_dtype(dtype)
    stats = {"mean": jnp.zeros(shape, sdtype), "var": jnp.ones(shape, real_dtype(sdtype))}
    if count:
        stats["count"] = jnp.zeros((), jnp.int32)
    if nonfinite_guard:
        stats["skipped"] = jnp.zeros((), jnp.int32)
    return stats


def running_arrays(batch_stats: Mapping[str, Array], dtype: Any, bshape: tuple[int, ...]) -> tuple[Array, Array]:
    """The running mean and variance in the statistics dtype ``dtype``, real (a complex running mean stays
    complex), shaped to broadcast against x (``bshape``)."""
    dtype = real_dtype(dtype)
    mean = in_stats_dtype(batch_stats["mean"], dtype).reshape(bshape)
    var = batch_stats["var"].astype(dtype).reshape(bshape)
    return mean, var


def empty_batch(x: Array, axis_name: Any = None) -> bool:
    """Whether a training batch is empty on every device, known from the shapes: a zero-size ``x`` (every device
    of a mapped or sharded axis holds the same shape), or a ``jax.vmap`` over zero examples."""
    return x.size == 0 or (axis_name is not None and jax.lax.axis_size(axis_name) == 0)


def update_running(
    batch_stats: Mapping[str, Array],
    batch_mean: Array,
    batch_var: Array,
    count: Array | None,
    momentum: float | None,
    unbiased: bool = True,
    *,
    count_batches: bool = True,
    valid: tuple[Array, Array] | None = None,
    empty: bool = False,
) -> dict[str, Array]:
    """PyTorch's running-statistics update from per-channel batch statistics.

    ``momentum`` is the weight of the new batch; ``None`` is the cumulative average over ``count`` batches.
    The running variance takes the unbiased batch variance ``var * n / (n - 1)`` (``unbiased=False``: the batch
    variance as given, e.g. biased as flax.linen.BatchNorm's), ``count`` being the values behind each channel's
    statistics (per channel, or one number for all: after a mask, or across devices, the global count).

    Where a mask left a channel too few values (``valid``: which channels have a mean and which a variance, by
    default ``count > 0`` and ``count > 1``), the update does not invent them: no value keeps the channel's mean and
    variance, one value updates only its mean (a single value has no spread). A batch in which no channel has a
    value is not counted. A zero-size batch (``empty``: ``empty_batch``, known from the shapes) follows PyTorch
    instead: the statistics stay and the batch is counted. A state without ``count`` stays without it;
    ``count_batches=False`` leaves it unchanged (PyTorch's InstanceNorm never counts). A state made with
    ``nonfinite_guard=True`` (a ``skipped`` counter) keeps its statistics when the batch's are not finite and counts
    the skipped batch instead. A complex batch mean makes the running mean complex (as Flax); the running variance
    stays real.
    """
    if empty:
        counted = "count" in batch_stats and count_batches
        return {**batch_stats, **({"count": batch_stats["count"] + 1} if counted else {})}
    batch_mean = in_stats_dtype(batch_mean, batch_stats["mean"].dtype)
    mean_dtype, var_dtype = batch_mean.dtype, batch_stats["var"].dtype
    if valid is None and count is not None:
        valid = (count > 0, count > 1)
    new_count = batch_stats["count"] + 1 if "count" in batch_stats else None
    if new_count is not None and valid is not None:
        new_count = jnp.where(jnp.any(valid[0]), new_count, batch_stats["count"])
    if momentum is None:  # the callers check that "count" is there
        assert new_count is not None
        factor = 1.0 / new_count.astype(var_dtype)
    else:
        factor = jnp.asarray(momentum, var_dtype)
    if unbiased:
        assert count is not None, "the unbiased update needs the batch's element count"
        batch_var = unbiased_variance(batch_var, count)
    mean = (1 - factor) * batch_stats["mean"] + factor * batch_mean
    var = (1 - factor) * batch_stats["var"] + factor * batch_var.astype(var_dtype)
    if valid is not None:
        mean = jnp.where(valid[0], mean, batch_stats["mean"])
        var = jnp.where(valid[1], var, batch_stats["var"])
    new = {"mean": mean.astype(mean_dtype), "var": var.astype(var_dtype)}
    if new_count is not None:
        new["count"] = new_count if count_batches else batch_stats["count"]
    if "skipped" in batch_stats:  # non-finite guard: a NaN/inf batch leaves the statistics as they were
        ok = jnp.all(jnp.isfinite(batch_mean)) & jnp.all(jnp.isfinite(batch_var))
        new = {k: jnp.where(ok, v, batch_stats[k]) for k, v in new.items()}
        new["skipped"] = batch_stats["skipped"] + jnp.where(ok, 0, 1).astype(batch_stats["skipped"].dtype)
    return new
