"""Instance normalization (torch.nn.InstanceNorm1d/2d/3d) as pure functions.

State has the same structure as batch norm's, with PyTorch's defaults ``affine=False`` and
``track_running_stats=False``::

    params      = {"scale": (C,), "bias": (C,)}                          # {} when affine=False (default)
    batch_stats = {"mean": (C,), "var": (C,), "count": () int32}         # {} unless track_running_stats=True

PyTorch quirks kept on purpose so ported models behave identically: the running statistics are the batch average
of the per-instance statistics (unbiased over the spatial size), ``momentum=None`` leaves them unchanged (PyTorch
passes 0.0), and ``count`` is never incremented (InstanceNorm never touches ``num_batches_tracked``).
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

import jax
import jax.numpy as jnp

from jaxnorm._channels import channel_init, check_channel_state, feature_layout
from jaxnorm._checks import (
    broadcast_shape,
    canonical_axes,
    check_eps,
    check_flag,
    check_input,
    check_momentum,
    check_training,
)
from jaxnorm._derivative import normalize_batch
from jaxnorm._normalize import affine_arrays, normalize
from jaxnorm._running import empty_batch, running_arrays, update_running
from jaxnorm._statistics import group_count, stats_dtype, unbiased_variance

Array = jax.Array
_LAYER = "instance_norm"


def instance_norm_init(num_features: int, *, affine: bool = False, track_running_stats: bool = False,
                       dtype: Any = jnp.float32, nonfinite_guard: bool = False, bias: bool = True
                       ) -> tuple[dict[str, Array], dict[str, Array]]:
    """Fresh ``(params, batch_stats)`` with PyTorch's InstanceNorm defaults: no affine, no running statistics.

    Args:
      num_features, dtype, nonfinite_guard, bias: as in ``batch_norm_init``.
      affine: make ``params``: scale 1, bias 0.
      track_running_stats: make ``batch_stats``: mean 0, var 1, count 0.

    Returns:
      ``(params, batch_stats)``, each ``{}`` when not asked for.
    """
    return channel_init(num_features, affine=affine, track_running_stats=track_running_stats, dtype=dtype,
                        nonfinite_guard=nonfinite_guard, layer="instance_norm_init", bias=bias)


def instance_norm(
    params: dict[str, Array],
    batch_stats: dict[str, Array],
    x: Array,
    *,
    training: bool,
    axis: int | tuple[int, ...] = 1,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    mask: Array | None = None,
    axis_name: Hashable | None = None,
    axis_index_groups: Any = None,
    batch_axis_name: Hashable | None = None,
    batched: bool = True,
) -> tuple[Array, dict[str, Array]]:
    """Instance normalization: ``y = (x - mean) * rsqrt(var + eps) * scale + bias``, statistics per example and
    channel over the spatial axes.

    Args:
      params: ``instance_norm_init``'s params (``{}`` by default: PyTorch's ``affine=False``).
      batch_stats: running statistics (``{}`` by default: PyTorch's ``track_running_stats=False``).
      x: ``(N, ..., C, ...)``, the batch on axis 0, the channel on ``axis``.
      training: a Python bool, as in ``batch_norm``; PyTorch's InstanceNorm never counts batches.
      axis: the channel axis, or a tuple of feature axes (Flax's ``feature_axes``).
      momentum: as in ``batch_norm`` (None: the running statistics stay put, as PyTorch).
      eps: added to the variance (> 0).
      mask: bool, broadcastable to x: only the True positions enter the statistics.
      axis_name: combine the statistics exactly across a mapped or sharded axis (the spatial axes split over
        devices); axis_index_groups as in ``jax.lax.psum``.
      batch_axis_name: the named axis the examples are mapped over (a ``jax.vmap`` over examples, as Equinox calls
        a layer, or the batch split over devices): the running statistics average over all of them.
      batched: False takes one example with no batch axis, as PyTorch's InstanceNorm takes ``(C, L)``,
        ``(C, H, W)`` and ``(C, D, H, W)``; it is normalized as the batch ``x[None]`` of one and ``axis`` counts in
        that batched layout. The rank alone cannot tell ``(C, H, W)`` from a batch ``(N, C, L)``: where the params
        or running statistics say which one x is, the other reading is refused with the fix.

    Returns:
      ``(y, new_batch_stats)``: y with x's shape and dtype.
    """
    training = check_training(training, _LAYER)
    batched = check_flag(batched, "batched", _LAYER)
    layout = "(N, C, spatial...)" if batched else "(C, spatial...) with batched=False"
    x = check_input(
        x,
        _LAYER,
        min_ndim=3 if batched else 2,
        what=f"rank >= {3 if batched else 2}, {layout}: each (example, channel) normalized over its spatial values"
             + ("; a rank-2 (N, C) batch has one value per (example, channel). For one unbatched example (C, L), "
                "pass batched=False" if batched else ""),
        complex_ok=True,
    )
    _check_batch_layout(params, batch_stats, x, axis, batched)
    if not batched:  # one example: the batch of one, returned without its batch axis
        x = x[None]
    feats, fshape, mask = feature_layout(x, axis, mask, _LAYER)
    if 0 in feats:
        raise ValueError(f"{_LAYER}: `axis`={axis} points at the batch axis 0; the channel axis must be another one.")
    check_channel_state(params, batch_stats, fshape, _LAYER, "instance_norm_init")
    eps = check_eps(eps, _LAYER)
    momentum = check_momentum(momentum, _LAYER)

    spatial = tuple(i for i in range(1, x.ndim) if i not in feats)
    bshape = broadcast_shape(x.shape, feats)
    use_input_stats = training or not batch_stats
    scale, bias = affine_arrays(params, bshape)
    if use_input_stats:
        if training and mask is None and axis_name is None and group_count(x.shape, spatial) == 1:
            raise ValueError(
                f"{_LAYER}: expected more than 1 spatial element when training, got input shape {tuple(x.shape)}."
            )
        y, mean, var, count = normalize_batch(x, spatial, eps, scale, bias, mask=mask, axis_name=axis_name,
                                              axis_index_groups=axis_index_groups)
    else:
        mean, var = running_arrays(batch_stats, stats_dtype(x.dtype), bshape)
        y = normalize(x, mean, var, eps, scale, bias)

    # with momentum=None PyTorch passes momentum 0.0 here: the statistics stay put
    if training and batch_stats and momentum is not None:
        inst_mean, inst_var, valid = _batch_average(mean, var, count, feats, batch_axis_name)
        # PyTorch's InstanceNorm never counts batches
        batch_stats = update_running(batch_stats, inst_mean, inst_var, None, momentum, unbiased=False,
                                     count_batches=False, valid=valid, empty=empty_batch(x, batch_axis_name))
    return (y if batched else y[0]), batch_stats


def _batch_average(mean, var, count, feats, batch_axis_name):
    """PyTorch's running-statistics input: the batch average of the per-instance means and unbiased variances
    (``n / (n - 1)`` from each instance's own count). Under a mask, an instance with no value in a channel adds no
    mean there, one with a single value no variance; ``valid`` says which channels have any (over every device of
    ``batch_axis_name``: the examples mapped or split across devices)."""
    per_channel = tuple(i for i in range(mean.ndim) if i not in feats)
    count = jnp.broadcast_to(count, mean.shape)
    has_mean, has_var = (count > 0).astype(var.dtype), (count > 1).astype(var.dtype)
    unbiased = unbiased_variance(var, count)
    sums = [jnp.sum(t, per_channel) for t in (mean * has_mean, has_mean, unbiased * has_var, has_var)]
    if batch_axis_name is not None:
        sums = jax.lax.psum(sums, batch_axis_name)
    mean_sum, n_mean, var_sum, n_var = sums
    return mean_sum / jnp.maximum(n_mean, 1), var_sum / jnp.maximum(n_var, 1), (n_mean > 0, n_var > 0)


def _check_batch_layout(params: Any, batch_stats: Any, x: Array, axis: Any, batched: bool) -> None:
    """Refuse the reading of x that the state contradicts when the other reading fits it: a ``(C, H, W)`` example
    read as a batch ``(N, C, L)``, or a batch given with ``batched=False``."""
    state = [t[k] for t, k in ((params, "scale"), (params, "bias"), (batch_stats, "mean"))
             if isinstance(t, dict) and hasattr(t.get(k), "shape")]
    if not state or x.ndim < 3:
        return
    want = tuple(state[0].shape)

    def features(shape):  # the feature shape of an input of this shape, None where `axis` does not fit it
        try:
            return tuple(shape[a] for a in canonical_axes(axis, len(shape), _LAYER, name="axis"))
        except (TypeError, ValueError):
            return None

    as_batch, as_example = features(x.shape), features((1, *x.shape))
    if batched and as_batch != want and as_example == want:
        raise ValueError(
            f"{_LAYER}: x of shape {tuple(x.shape)} read as a batch (N, C, spatial...) has features {as_batch} on "
            f"axis={axis}, but the params/running statistics have {want}; read as one example without a batch axis "
            "it fits. Pass batched=False for an unbatched input (as PyTorch's InstanceNorm takes (C, L...)), or "
            "x[None]."
        )
    if not batched and as_example != want and as_batch == want:
        raise ValueError(
            f"{_LAYER}: x of shape {tuple(x.shape)} read as one example (batched=False) has features {as_example} "
            f"on axis={axis}, but the params/running statistics have {want}; read as a batch it fits. Drop "
            "batched=False."
        )
