"""Statistics of several parts combined exactly: devices on a named axis, or batches one after another.

Chan et al.'s formula for disjoint parts with counts ``n_i``, means ``mean_i`` and ``M2_i`` (sums of squared
deviations): ``n = sum(n_i)``, ``mean = sum(n_i mean_i) / n``, ``M2 = sum(M2_i + n_i (mean_i - mean)^2)``. It
weights uneven parts (a mask, a short last batch) correctly, where averaging the parts' means and variances
does not. ``combine`` applies it to parts stacked on a leading axis (also how ``jaxnorm.precise_bn`` merges
batches); ``across_devices`` gathers every device's part for it. Complex means: ``|mean_i - mean|^2``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxnorm._statistics import abs2

Array = jax.Array

SLOTS_MAX_DEVICES = 64  # up to this many devices on the axis the parts are gathered in one collective


def combine(counts: Array, means: Array, m2s: Array) -> tuple[Array, Array, Array]:
    """(count, mean, M2) of the union of the parts stacked on axis 0 of each argument."""
    total = jnp.sum(counts, 0, keepdims=True)
    mean_all = jnp.sum(counts * means, 0, keepdims=True) / jnp.maximum(total, 1)
    return total[0], mean_all[0], jnp.sum(m2s + counts * abs2(means - mean_all), 0)


def across_devices(count: Array, mean: Array, m2: Array, axis_name: Any, groups: Any) -> tuple[Array, Array, Array]:
    """(count, mean, M2) of every device's part on ``axis_name`` (within its ``axis_index_groups`` group).

    Up to ``SLOTS_MAX_DEVICES`` devices (real devices): ONE collective gathers all parts (``device_slots``), whose
    payload grows as devices^2 but stays tiny. Beyond that (a ``jax.vmap`` over examples with ``axis_name``, as
    Equinox users write batch norm: thousands of "devices"), the gather would be quadratic, so two psums of
    per-device size do it in linear time: ``(n_i, n_i mean_i)`` gives the global mean, then the M2 terms about it.
    Both are the same exact formula.
    """
    count = jnp.broadcast_to(count, mean.shape)
    if jnp.iscomplexobj(mean):  # the collectives carry real parts: |d|^2 = re^2 + im^2, so the M2s add up
        total, re, m2_re = across_devices(count, mean.real, m2, axis_name, groups)
        _, im, m2_im = across_devices(count, mean.imag, jnp.zeros_like(m2), axis_name, groups)
        return total, jax.lax.complex(re, im), m2_re + m2_im
    if jax.lax.axis_size(axis_name) <= SLOTS_MAX_DEVICES:
        return combine(*device_slots(jnp.stack([count, mean, m2]), axis_name, groups))
    total, weighted = group_psum(jnp.stack([count, count * mean]), axis_name, groups)
    mean_all = weighted / jnp.maximum(total, 1)
    return total, mean_all, group_psum(m2 + count * jnp.square(mean - mean_all), axis_name, groups)


def group_psum(v: Array, axis_name: Any, groups: Any) -> Array:
    """``psum`` of ``v`` over the devices of this device's ``axis_index_groups`` group (all when None), in linear
    time and under vmap, shard_map and jit alike: each device writes ``v`` into its group's slot (``G`` slots, one
    psum) and reads its group's sum back."""
    if groups is None:
        return jax.lax.psum(v, axis_name)
    size, index = jax.lax.axis_size(axis_name), jax.lax.axis_index(axis_name)
    mine = jnp.asarray(_group_of(groups, size))[index]
    hot = jax.nn.one_hot(mine, len(groups), dtype=v.dtype).reshape((len(groups),) + (1,) * v.ndim)
    return jax.lax.psum(hot * v[None], axis_name)[mine]


def device_slots(mine: Array, axis_name: Any, axis_index_groups: Any) -> Array:
    """Every device's ``mine`` along a new leading axis, ONE collective (zeros for devices outside the group).

    Each device writes its array into its own slot and a ``psum`` gathers them (unlike ``all_gather``, psum's
    result is known to be replicated, so shard_map's checks pass). With ``axis_index_groups`` the slots of devices
    outside this device's group are zeroed afterwards (a static membership table), which works under shard_map,
    vmap and jit alike. Returns ``(devices, *mine.shape)``; the payload is devices x ``mine``, so callers use it
    for real device counts only (see ``across_devices``).
    """
    size, index = jax.lax.axis_size(axis_name), jax.lax.axis_index(axis_name)
    lift = lambda v: v.reshape(v.shape + (1,) * mine.ndim)
    stacked = jax.lax.psum(lift(jax.nn.one_hot(index, size, dtype=mine.dtype)) * mine[None], axis_name)
    if axis_index_groups is not None:
        stacked = stacked * lift(jnp.asarray(_group_membership(axis_index_groups, size), mine.dtype)[index])
    return jnp.moveaxis(stacked, 1, 0)


def _group_of(groups: Any, size: int) -> np.ndarray:
    """Each device's group index (``(size,)`` ints); the groups must partition range(size)."""
    flat = sorted(int(i) for g in groups for i in g)
    if flat != list(range(size)):
        raise ValueError(
            f"`axis_index_groups`={groups!r} must split the {size} devices of the axis into disjoint groups that "
            f"cover each index 0..{size - 1} exactly once."
        )
    group_of = np.zeros(size, np.int32)
    for g, members in enumerate(groups):
        group_of[list(members)] = g
    return group_of


def _group_membership(groups: Any, size: int) -> np.ndarray:
    """(size, size) table: row i marks the devices in device i's group."""
    group_of = _group_of(groups, size)
    return (group_of[:, None] == group_of[None, :]).astype(np.float64)
