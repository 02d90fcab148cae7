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

import math
from typing import Any

import jax
import jax.numpy as jnp

from jaxnorm import _core
from jaxnorm._batch_norm import _check_num_features, check_channel_state, running_stats_init

Array = jax.Array
_LAYER = "instance_norm"


def instance_norm_init(
    num_features: int,
    *,
    affine: bool = False,
    track_running_stats: bool = False,
    dtype: Any = jnp.float32,
    nonfinite_guard: bool = False,
) -> tuple[dict[str, Array], dict[str, Array]]:
    """Fresh ``(params, batch_stats)`` with PyTorch's InstanceNorm defaults (no affine, no running stats);
    ``nonfinite_guard`` as in ``batch_norm_init``."""
    c = _check_num_features(num_features, "instance_norm_init")
    params = {"scale": jnp.ones((c,), dtype), "bias": jnp.zeros((c,), dtype)} if affine else {}
    stats = running_stats_init(c, dtype, nonfinite_guard) if track_running_stats else {}
    return params, stats


def instance_norm(
    params: dict[str, Array],
    batch_stats: dict[str, Array],
    x: Array,
    *,
    training: bool,
    axis: int = 1,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
) -> tuple[Array, dict[str, Array]]:
    """Normalize each (example, channel) over its spatial axes; returns ``(y, new_batch_stats)``.

    ``x`` is ``(N, ..., C, ...)`` with the batch on axis 0 and channels on ``axis``; for an unbatched
    ``(C, L)`` input use ``x[None]`` or ``jax.vmap``.
    """
    training = _core.check_training(training, _LAYER)
    x = _core.check_input(
        x,
        _LAYER,
        min_ndim=3,
        what="rank >= 3: (N, C, spatial...). For an unbatched (C, L) input use x[None] or jax.vmap",
    )
    ax = _core.canonical_axis(axis, x.ndim, _LAYER)
    if ax == 0:
        raise ValueError(f"{_LAYER}: `axis`={axis} points at the batch axis 0; the channel axis must be another one.")
    c = x.shape[ax]
    check_channel_state(params, batch_stats, c, _LAYER, "instance_norm_init")
    eps = _core.check_eps(eps, _LAYER)
    momentum = _core.check_momentum(momentum, _LAYER)

    spatial = tuple(i for i in range(1, x.ndim) if i != ax)
    bshape = _core.channel_shape(x.ndim, ax, c)
    use_input_stats = training or not batch_stats
    scale = params["scale"].reshape(bshape) if params else None
    bias = params["bias"].reshape(bshape) if params else None
    if use_input_stats:
        if training and math.prod(x.shape[i] for i in spatial) == 1:
            raise ValueError(
                f"{_LAYER}: expected more than 1 spatial element when training, got input shape {tuple(x.shape)}."
            )
        y, mean, var, count = _core.normalize_batch(x, spatial, eps, scale, bias)
    else:
        dtype = _core.stats_dtype(x.dtype)
        mean = batch_stats["mean"].astype(dtype).reshape(bshape)
        var = batch_stats["var"].astype(dtype).reshape(bshape)
        y = _core.normalize(x, mean, var, eps, scale, bias)

    if training and batch_stats:
        if momentum is None:  # PyTorch passes momentum 0.0 here: statistics stay put
            return y, batch_stats
        per_channel = tuple(i for i in range(x.ndim) if i != ax)
        inst_mean = jnp.mean(mean, per_channel)
        inst_var = jnp.mean(var, per_channel)  # the unbiased factor n/(n-1) is the same for every instance
        new_stats = _core.update_running(batch_stats, inst_mean, inst_var, count.reshape(-1)[0], momentum)
        new_stats["count"] = batch_stats["count"]  # PyTorch's InstanceNorm never counts batches
        return y, new_stats
    return y, batch_stats
