"""Batch normalization (torch.nn.BatchNorm1d/2d/3d, SyncBatchNorm) as pure functions.

State (dicts, ready for Flax's "params" / "batch_stats" collections)::

    params      = {"scale": (C,) dtype, "bias": (C,) dtype}              # {} when affine=False
    batch_stats = {"mean": (C,) float, "var": (C,) float, "count": () int32}  # {} when not tracked

``count`` mirrors PyTorch's ``num_batches_tracked``.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

import jax
import jax.numpy as jnp

from jaxnorm._channels import channel_init, check_channel_state, check_cumulative, feature_layout
from jaxnorm._checks import broadcast_shape, check_eps, check_input, check_momentum, check_training
from jaxnorm._derivative import normalize_batch
from jaxnorm._moments import moments
from jaxnorm._normalize import affine_arrays, normalize
from jaxnorm._running import empty_batch, running_arrays, update_running
from jaxnorm._statistics import group_count, stats_dtype

Array = jax.Array
_LAYER = "batch_norm"


def batch_norm_init(num_features: int, *, affine: bool = True, track_running_stats: bool = True,
                    dtype: Any = jnp.float32, nonfinite_guard: bool = False, bias: bool = True
                    ) -> tuple[dict[str, Array], dict[str, Array]]:
    """Fresh ``(params, batch_stats)`` as PyTorch initializes them: scale 1, bias 0, mean 0, var 1, count 0.

    Args:
      num_features: the channels C.
      affine: make ``params`` (else ``{}``).
      track_running_stats: make ``batch_stats`` (else ``{}``).
      dtype: the params' dtype; the statistics are kept in at least float32.
      nonfinite_guard: add ``batch_stats["skipped"]`` (``()`` int32): a training batch whose statistics are
        NaN/inf then leaves mean, var and count unchanged and increments ``skipped`` instead (its output is still
        computed from it).
      bias: False (PyTorch 2.x's ``bias=False``) makes the scale alone.

    Returns:
      ``(params, batch_stats)``: ``{"scale": (C,), "bias": (C,)}`` and ``{"mean": (C,), "var": (C,), "count": ()}``.
    """
    return channel_init(num_features, affine=affine, track_running_stats=track_running_stats, dtype=dtype,
                        nonfinite_guard=nonfinite_guard, layer="batch_norm_init", bias=bias)


def _check_virtual_batch(v: Any, x: Array, feats: tuple[int, ...], mask: Any, axis_name: Any) -> int | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < 2:
        raise ValueError(f"{_LAYER}: `virtual_batch_size` must be an int >= 2 or None, got {v!r}.")
    if 0 in feats:
        raise ValueError(f"{_LAYER}: `virtual_batch_size` splits axis 0 (the batch), but `axis` is 0 (the channel).")
    if x.shape[0] % v:
        raise ValueError(
            f"{_LAYER}: `virtual_batch_size`={v} must divide the batch size {x.shape[0]}; use a batch that is a "
            f"multiple of {v}, or a divisor of {x.shape[0]}."
        )
    if mask is not None or axis_name is not None:
        raise ValueError(f"{_LAYER}: `virtual_batch_size` cannot be combined with `mask` or `axis_name`.")
    return v


def batch_norm(
    params: dict[str, Array],
    batch_stats: dict[str, Array],
    x: Array,
    *,
    training: bool,
    axis: int = 1,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    axis_name: Hashable | None = None,
    axis_index_groups: Any = None,
    mask: Array | None = None,
    running_var_unbiased: bool = True,
    virtual_batch_size: int | None = None,
) -> tuple[Array, dict[str, Array]]:
    """Batch normalization: ``y = (x - mean) * rsqrt(var + eps) * scale + bias``, statistics over every axis but
    ``axis``.

    PyTorch's semantics. In training (or with no running statistics) x is normalized with the batch's mean and
    biased variance, and a non-empty ``batch_stats`` is updated: ``new = (1 - momentum) * old + momentum * batch``,
    with the unbiased batch variance ``var * n / (n - 1)``. In eval mode with running statistics, those normalize
    and ``batch_stats`` comes back unchanged.

    Args:
      params: ``batch_norm_init``'s ``{"scale", "bias"}`` (or part of it, or ``{}``), shaped as the features.
      batch_stats: ``{"mean", "var", "count"}`` (``count``: PyTorch's ``num_batches_tracked``), or ``{}``.
      x: ``(N, C, ...)``, the channel on ``axis``.
      training: a Python bool: normalize with the batch's statistics and update the running ones.
      axis: the channel axis, or a tuple of feature axes.
      momentum: the weight of the new batch (PyTorch's); None is the cumulative average over ``count`` batches.
      eps: added to the variance (> 0).
      axis_name: SyncBatchNorm: the statistics over every device of this mapped or sharded axis.
      axis_index_groups: as in ``jax.lax.psum``.
      mask: bool, broadcastable to x: only the True positions enter the statistics.
      running_var_unbiased: False updates the running variance with the biased batch variance
        (flax.linen.BatchNorm's).
      virtual_batch_size: ghost batch norm (Hoffer et al., 2017): in training, each consecutive sub-batch of this
        size (along axis 0) is normalized with its own statistics; the running statistics get one update with
        their average, as Keras does.

    Returns:
      ``(y, new_batch_stats)``: y with x's shape and dtype.
    """
    training = check_training(training, _LAYER)
    x = check_input(x, _LAYER, min_ndim=2, what="rank >= 2: (N, C, ...) with the channel on `axis`", complex_ok=True)
    feats, fshape, mask = feature_layout(x, axis, mask, _LAYER)
    check_channel_state(params, batch_stats, fshape, _LAYER, "batch_norm_init")
    eps = check_eps(eps, _LAYER)
    momentum = check_momentum(momentum, _LAYER)
    check_cumulative(momentum, batch_stats, training, _LAYER)

    reduction_axes = tuple(i for i in range(x.ndim) if i not in feats)
    bshape = broadcast_shape(x.shape, feats)
    use_batch = training or not batch_stats
    scale, bias = affine_arrays(params, bshape)
    ghost = _check_virtual_batch(virtual_batch_size, x, feats, mask, axis_name) if training else None
    if use_batch:
        if training and mask is None and axis_name is None and group_count(x.shape, reduction_axes) == 1:
            raise ValueError(
                f"{_LAYER}: expected more than 1 value per channel when training, got input shape "
                f"{tuple(x.shape)} (one value per channel along axis={axis}). Use a batch of at least 2, or "
                "training=False with running statistics."
            )
        if ghost and x.size:  # (an empty batch has no sub-batches: its statistics are the plain ones, unused)
            # (N, ...) -> (N / v, v, ...): statistics per sub-batch, broadcast back over its rows
            xg = x.reshape((x.shape[0] // ghost, ghost) + x.shape[1:])
            gmean, gvar, count = moments(xg, tuple(i + 1 for i in reduction_axes))
            y_ghost = normalize(xg, gmean, gvar, eps, *(
                None if p is None else p.reshape((1,) + bshape) for p in (scale, bias)))
            y = y_ghost.reshape(x.shape)
            mean, var, count = jnp.mean(gmean, 0), jnp.mean(gvar, 0), count[0]  # count: one sub-batch's
        else:
            y, mean, var, count = normalize_batch(
                x, reduction_axes, eps, scale, bias, mask=mask, axis_name=axis_name,
                axis_index_groups=axis_index_groups,
            )
    else:
        mean, var = running_arrays(batch_stats, stats_dtype(x.dtype), bshape)
        y = normalize(x, mean, var, eps, scale, bias)

    if training and batch_stats:
        new_stats = update_running(
            batch_stats, mean.reshape(fshape), var.reshape(fshape),
            jnp.broadcast_to(count, mean.shape).reshape(fshape), momentum, running_var_unbiased,
            empty=empty_batch(x, axis_name),
        )
        return y, new_stats
    return y, batch_stats
