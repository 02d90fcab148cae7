"""Group normalization (torch.nn.GroupNorm) as pure functions.

State::

    params = {"scale": (C,), "bias": (C,)}   # {} when affine=False
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxnorm import _core

Array = jax.Array
_LAYER = "group_norm"


def _check_groups(num_groups: Any, num_channels: int, where: str) -> int:
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1:
        raise ValueError(f"{where}: `num_groups` must be a positive int, got {num_groups!r}.")
    if num_channels % num_groups:
        divisors = [g for g in range(1, num_channels + 1) if num_channels % g == 0]
        raise ValueError(
            f"{where}: `num_groups`={num_groups} must divide the number of channels {num_channels}; "
            f"valid choices are {divisors}."
        )
    return num_groups


def group_norm_init(
    num_groups: int, num_channels: int, *, affine: bool = True, dtype: Any = jnp.float32
) -> dict[str, Array]:
    """Fresh params as PyTorch initializes them: scale 1, bias 0 (per channel)."""
    if isinstance(num_channels, bool) or not isinstance(num_channels, int) or num_channels < 1:
        raise ValueError(f"group_norm_init: `num_channels` must be a positive int, got {num_channels!r}.")
    _check_groups(num_groups, num_channels, "group_norm_init")
    if not affine:
        return {}
    return {"scale": jnp.ones((num_channels,), dtype), "bias": jnp.zeros((num_channels,), dtype)}


def group_norm(params: dict[str, Array], x: Array, *, num_groups: int, axis: int = 1, eps: float = 1e-5) -> Array:
    """Split the channels on ``axis`` into ``num_groups`` contiguous groups and normalize each (example, group)
    over its channels and spatial positions; then a per-channel scale/shift. Axis 0 is the batch."""
    x = _core.check_input(x, _LAYER, min_ndim=2, what="rank >= 2: (N, C, ...) with the channel on `axis`")
    ax = _core.canonical_axis(axis, x.ndim, _LAYER)
    if ax == 0:
        raise ValueError(f"{_LAYER}: `axis`={axis} points at the batch axis 0; the channel axis must be another one.")
    c = x.shape[ax]
    g = _check_groups(num_groups, c, _LAYER)
    fix = f"Create matching params with jaxnorm.group_norm_init({g}, {c}, ...)."
    if isinstance(params, dict) and params:
        _core.check_state(
            params, {"scale": ((c,), "float"), "bias": ((c,), "float")}, arg="params", layer=_LAYER, fix=fix
        )
    else:
        _core.check_state(params, {}, arg="params", layer=_LAYER, fix=fix)
    eps = _core.check_eps(eps, _LAYER)

    # statistics per (example, group): a spatial reduction in x's own layout, then the channels of each group
    # (see _core.sum_over); the per-channel affine is applied in the same layout, in one fused normalize pass.
    bshape = _core.channel_shape(x.ndim, ax, c)
    spatial = tuple(i for i in range(1, x.ndim) if i != ax)
    scale = params["scale"].reshape(bshape) if params else None
    bias = params["bias"].reshape(bshape) if params else None
    return _core.normalize_batch(x, spatial, eps, scale, bias, groups=(ax, g))[0]
