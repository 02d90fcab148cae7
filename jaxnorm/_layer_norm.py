"""Layer normalization (torch.nn.LayerNorm) and RMS normalization (torch.nn.RMSNorm) as pure functions.

Both normalize over the trailing ``normalized_shape`` dims, like PyTorch, or over any ``reduction_axes`` with
params over ``feature_axes``, like Flax. State::

    layer_norm params = {"scale": normalized_shape, "bias": normalized_shape}
                        # {"scale": ...} when bias=False, {} when elementwise_affine=False
    rms_norm params   = {"scale": normalized_shape}   # {} when elementwise_affine=False; {"scale", "bias"} too
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jaxnorm._channels import affine_init
from jaxnorm._checks import (
    broadcast_shape,
    canonical_axes,
    check_eps,
    check_input,
    check_mask,
    check_state,
    check_trailing_shape,
    normalized_shape_tuple,
)
from jaxnorm._conventions import row_axes
from jaxnorm._derivative import normalize_batch, normalize_rms
from jaxnorm._normalize import affine_arrays

Array = jax.Array


def layer_norm_init(
    normalized_shape: int | tuple[int, ...],
    *,
    elementwise_affine: bool = True,
    bias: bool = True,
    dtype: Any = jnp.float32,
) -> dict[str, Array]:
    """Fresh params as PyTorch initializes them: scale 1, bias 0."""
    shape = normalized_shape_tuple(normalized_shape, "layer_norm_init")
    return affine_init(shape, affine=elementwise_affine, bias=bias, dtype=dtype)


def rms_norm_init(
    normalized_shape: int | tuple[int, ...],
    *,
    elementwise_affine: bool = True,
    dtype: Any = jnp.float32,
) -> dict[str, Array]:
    """Fresh params as PyTorch initializes them: scale 1 (RMSNorm has no bias)."""
    shape = normalized_shape_tuple(normalized_shape, "rms_norm_init")
    return {"scale": jnp.ones(shape, dtype)} if elementwise_affine else {}


def _layout(
    x: Any,
    params: Any,
    normalized_shape: Any,
    reduction_axes: Any,
    feature_axes: Any,
    mask: Any,
    layer: str,
    allowed: list[list[str]],
) -> tuple[Array, tuple[int, ...], tuple[int, ...], Array | None]:
    """Check the inputs; return ``(x, reduced axes, broadcast shape of the params, mask)``.

    Either PyTorch's ``normalized_shape`` (the trailing dims, params of that shape) or Flax's ``reduction_axes``
    (any axes; params over ``feature_axes``, which default to the reduced axes), never both.
    """
    if "normalized_shape" in row_axes(normalized_shape, reduction_axes, feature_axes, layer):
        shape = normalized_shape_tuple(normalized_shape, layer)
        x = check_input(x, layer, min_ndim=len(shape), what=f"at least {len(shape)} dims", complex_ok=True)
        check_trailing_shape(x, shape, layer)
        axes = tuple(range(x.ndim - len(shape), x.ndim))
        pshape = shape
        bshape = (1,) * (x.ndim - len(shape)) + shape
    else:
        x = check_input(x, layer, min_ndim=1, what="at least 1 dim", complex_ok=True)
        axes = canonical_axes(reduction_axes, x.ndim, layer, name="reduction_axes")
        feats = axes if feature_axes is None else canonical_axes(feature_axes, x.ndim, layer, name="feature_axes")
        pshape = tuple(x.shape[a] for a in feats)
        bshape = broadcast_shape(x.shape, feats)
    init = f"jaxnorm.{layer}_init({pshape if len(pshape) > 1 else pshape[0]}, ...)"
    keys = sorted(params.keys()) if isinstance(params, dict) else None
    layout = next((k for k in allowed if k == keys), allowed[-1])
    check_state(params, {k: (pshape, "inexact") for k in layout}, arg="params", layer=layer,
                fix=f"Create matching params with {init}.")
    return x, axes, bshape, check_mask(mask, x, layer)


def layer_norm(params: dict[str, Array], x: Array, *, normalized_shape: int | tuple[int, ...] | None = None,
               eps: float = 1e-5, reduction_axes: int | Sequence[int] | None = None,
               feature_axes: int | Sequence[int] | None = None, mask: Array | None = None,
               axis_name: Hashable | None = None, axis_index_groups: Any = None) -> Array:
    """Normalize with the mean and biased variance over some axes, then scale/shift.

    The axes: PyTorch's ``normalized_shape`` (the trailing dims; params of that shape), or Flax's
    ``reduction_axes`` (any axes, e.g. ``1`` for channels-first LayerNorm2d in NCHW) with the params over
    ``feature_axes`` (default: the reduced axes). ``mask`` (bool, broadcastable to ``x``) excludes positions from
    the statistics (padded tokens); every position is still normalized. ``axis_name`` combines the statistics
    exactly across a mapped/sharded axis, when the reduced axes are split over devices (``axis_index_groups``
    as in ``jax.lax.psum``).
    """
    return _row_norm("layer_norm", params, x, normalized_shape, eps, reduction_axes, feature_axes, mask, axis_name,
                     axis_index_groups)


def rms_norm(params: dict[str, Array], x: Array, *, normalized_shape: int | tuple[int, ...] | None = None,
             eps: float | None = None, reduction_axes: int | Sequence[int] | None = None,
             feature_axes: int | Sequence[int] | None = None, mask: Array | None = None,
             axis_name: Hashable | None = None, axis_index_groups: Any = None) -> Array:
    """``x * rsqrt(mean(x**2) + eps) * scale`` over some axes; ``eps=None`` is ``finfo(x.dtype).eps``.

    Axes, ``mask`` and ``axis_name`` as in ``layer_norm``. ``params`` may add a ``bias`` to the scale (as
    equinox.nn.RMSNorm's ``use_bias``; PyTorch's and Flax's RMSNorm have none).
    """
    return _row_norm("rms_norm", params, x, normalized_shape, eps, reduction_axes, feature_axes, mask, axis_name,
                     axis_index_groups)


def _row_norm(layer, params, x, normalized_shape, eps, reduction_axes, feature_axes, mask, axis_name,
              axis_index_groups) -> Array:
    x, axes, bshape, mask = _layout(x, params, normalized_shape, reduction_axes, feature_axes, mask, layer,
                                    [[], ["scale"], ["bias"], ["bias", "scale"]])
    rms = layer == "rms_norm"
    eps = float(jnp.finfo(x.dtype).eps) if rms and eps is None else check_eps(eps, layer)  # finfo: real eps
    scale, bias = affine_arrays(params, bshape)
    named = {"mask": mask, "axis_name": axis_name, "axis_index_groups": axis_index_groups}
    if rms:
        return normalize_rms(x, axes, eps, scale, bias=bias, **named)
    return normalize_batch(x, axes, eps, scale, bias, **named)[0]
