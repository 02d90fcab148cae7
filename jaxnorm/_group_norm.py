"""Group normalization (torch.nn.GroupNorm) as pure functions.

State::

    params = {"scale": (C,), "bias": (C,)}   # {} when affine=False; either one alone is accepted too
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jaxnorm._channels import affine_init, check_affine
from jaxnorm._checks import canonical_axes, canonical_axis, channel_shape, check_eps, check_input, check_mask
from jaxnorm._derivative import normalize_batch
from jaxnorm._normalize import affine_arrays

Array = jax.Array
_LAYER = "group_norm"


def _check_groups(num_groups: Any, num_channels: int, layer: str) -> int:
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1:
        raise ValueError(f"{layer}: `num_groups` must be a positive int, got {num_groups!r}.")
    if num_channels % num_groups:
        divisors = [g for g in range(1, num_channels + 1) if num_channels % g == 0]
        raise ValueError(
            f"{layer}: `num_groups`={num_groups} must divide the number of channels {num_channels}; "
            f"valid choices are {divisors}."
        )
    return num_groups


def group_norm_init(
    num_groups: int, num_channels: int, *, affine: bool = True, dtype: Any = jnp.float32, bias: bool = True
) -> dict[str, Array]:
    """Fresh params as PyTorch initializes them: scale 1, bias 0, per channel.

    Args:
      num_groups: the groups; must divide ``num_channels``.
      num_channels: the channels C.
      affine: make the params (else ``{}``).
      dtype: the params' dtype.
      bias: False (PyTorch 2.x's ``bias=False``) makes the scale alone.

    Returns:
      ``{"scale": (C,), "bias": (C,)}``.
    """
    if isinstance(num_channels, bool) or not isinstance(num_channels, int) or num_channels < 1:
        raise ValueError(f"group_norm_init: `num_channels` must be a positive int, got {num_channels!r}.")
    _check_groups(num_groups, num_channels, "group_norm_init")
    return affine_init((num_channels,), affine=affine, bias=bias, dtype=dtype)


def resolve_groups(num_groups: Any, group_size: Any, c: int, layer: str = _LAYER) -> int:
    """The number of groups of ``c`` channels from ``num_groups`` (PyTorch, Flax) or ``group_size`` (Flax)."""
    if num_groups is not None and group_size is not None:
        raise ValueError(
            f"{layer}: got both `num_groups`={num_groups!r} and `group_size`={group_size!r}; give one of them "
            "(Flax users: pass num_groups=None with group_size)."
        )
    if group_size is None:
        if num_groups is None:
            raise TypeError(f"{layer}: give `num_groups` (as torch.nn.GroupNorm) or `group_size` (channels a group).")
        return _check_groups(num_groups, c, layer)
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1 or c % group_size:
        sizes = [g for g in range(1, c + 1) if c % g == 0]
        raise ValueError(
            f"{layer}: `group_size`={group_size!r} must be a positive int that divides the number of channels {c}; "
            f"valid choices are {sizes}."
        )
    return c // group_size


def group_norm(
    params: dict[str, Array],
    x: Array,
    *,
    num_groups: int | None = None,
    axis: int = 1,
    eps: float = 1e-5,
    group_size: int | None = None,
    reduction_axes: int | Sequence[int] | None = None,
    mask: Array | None = None,
    axis_name: Hashable | None = None,
    axis_index_groups: Any = None,
) -> Array:
    """Group normalization: ``y = (x - mean) * rsqrt(var + eps) * scale + bias``, statistics per example and group
    of contiguous channels.

    Args:
      params: ``group_norm_init``'s ``{"scale", "bias"}`` (per channel), part of it, or ``{}``.
      x: ``(N, C, ...)``, the channel on ``axis``.
      num_groups: the groups (PyTorch's and Flax's); or give ``group_size``.
      axis: the channel axis.
      eps: added to the variance (> 0).
      group_size: the channels per group (Flax's), instead of ``num_groups``.
      reduction_axes: the axes pooled with each group's channels (default: every axis but the batch axis 0 and
        ``axis``; listing ``axis`` itself is allowed, as in Flax).
      mask: bool, broadcastable to x (it may vary along the channels): only the True positions enter the
        statistics.
      axis_name: combine the statistics exactly across a mapped or sharded axis; axis_index_groups as in
        ``jax.lax.psum``.

    Returns:
      y, with x's shape and dtype.
    """
    x = check_input(x, _LAYER, min_ndim=2, what="rank >= 2: (N, C, ...) with the channel on `axis`", complex_ok=True)
    ax = canonical_axis(axis, x.ndim, _LAYER)
    if ax == 0 and reduction_axes is None:
        raise ValueError(f"{_LAYER}: `axis`={axis} points at the batch axis 0; the channel axis must be another one.")
    c = x.shape[ax]
    g = resolve_groups(num_groups, group_size, c)
    fix = f"Create matching params with jaxnorm.group_norm_init({g}, {c}, ...)."
    check_affine(params, (c,), _LAYER, fix)
    eps = check_eps(eps, _LAYER)
    mask = check_mask(mask, x, _LAYER)
    if reduction_axes is None:
        spatial = tuple(i for i in range(1, x.ndim) if i != ax)
    else:
        spatial = tuple(i for i in canonical_axes(reduction_axes, x.ndim, _LAYER, name="reduction_axes") if i != ax)

    # statistics per (example, group): a spatial reduction in x's own layout, then the channels of each group
    # (jaxnorm._statistics.sum_over); the per-channel affine in the same layout, in one fused normalize pass
    bshape = channel_shape(x.ndim, ax, c)
    scale, bias = affine_arrays(params, bshape)
    return normalize_batch(x, spatial, eps, scale, bias, groups=(ax, g), mask=mask, axis_name=axis_name,
                           axis_index_groups=axis_index_groups)[0]
