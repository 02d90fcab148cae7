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
    row_axes,
)
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
    """Fresh params as PyTorch initializes them: scale 1, bias 0.

    Args:
      normalized_shape: the trailing dims normalized over: the params' shape.
      elementwise_affine: make the params (else ``{}``).
      bias: False (PyTorch 2.x's ``bias=False``) makes the scale alone.
      dtype: the params' dtype.

    Returns:
      ``{"scale": normalized_shape, "bias": normalized_shape}``.
    """
    shape = normalized_shape_tuple(normalized_shape, "layer_norm_init")
    return affine_init(shape, affine=elementwise_affine, bias=bias, dtype=dtype)


def rms_norm_init(
    normalized_shape: int | tuple[int, ...],
    *,
    elementwise_affine: bool = True,
    dtype: Any = jnp.float32,
) -> dict[str, Array]:
    """Fresh params as PyTorch initializes them: scale 1 (RMSNorm has no bias).

    Args:
      normalized_shape: the trailing dims normalized over: the scale's shape.
      elementwise_affine: make the scale (else ``{}``).
      dtype: the scale's dtype.

    Returns:
      ``{"scale": normalized_shape}``.
    """
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
    allowed = [[], ["scale"], ["bias"], ["bias", "scale"]]
    layout = next((k for k in allowed if k == keys), allowed[-1])
    check_state(params, {k: (pshape, "inexact") for k in layout}, arg="params", layer=layer,
                fix=f"Create matching params with {init}.")
    return x, axes, bshape, check_mask(mask, x, layer)


def layer_norm(params: dict[str, Array], x: Array, *, normalized_shape: int | tuple[int, ...] | None = None,
               eps: float = 1e-5, reduction_axes: int | Sequence[int] | None = None,
               feature_axes: int | Sequence[int] | None = None, mask: Array | None = None,
               axis_name: Hashable | None = None, axis_index_groups: Any = None) -> Array:
    """Layer normalization: ``(x - mean) * rsqrt(var + eps) * scale + bias`` with the mean and the biased variance
    over some axes.

    Args:
      params: ``layer_norm_init``'s: ``{"scale", "bias"}``, one of them, or ``{}``, shaped as the normalized dims.
      x: the input.
      normalized_shape: PyTorch's: the trailing dims to normalize over; the params have this shape.
      eps: added to the variance (> 0).
      reduction_axes: Flax's, instead of ``normalized_shape``: any axes to normalize over (e.g. ``1`` for a
        channels-first LayerNorm2d in NCHW).
      feature_axes: with ``reduction_axes``, the params' axes (default: the reduced axes).
      mask: bool, broadcastable to x: only the True positions enter the statistics (padded tokens); every position
        is still normalized.
      axis_name: combine the statistics exactly across this mapped or sharded axis, when the reduced axes are split
        over devices.
      axis_index_groups: as in ``jax.lax.psum``.

    Returns:
      y, with x's shape and dtype.
    """
    layer = "layer_norm"
    x, axes, bshape, mask = _layout(x, params, normalized_shape, reduction_axes, feature_axes, mask, layer)
    scale, bias = affine_arrays(params, bshape)
    return normalize_batch(x, axes, check_eps(eps, layer), scale, bias, mask=mask, axis_name=axis_name,
                           axis_index_groups=axis_index_groups)[0]


def rms_norm(params: dict[str, Array], x: Array, *, normalized_shape: int | tuple[int, ...] | None = None,
             eps: float | None = None, reduction_axes: int | Sequence[int] | None = None,
             feature_axes: int | Sequence[int] | None = None, mask: Array | None = None,
             axis_name: Hashable | None = None, axis_index_groups: Any = None) -> Array:
    """RMS normalization: ``x * rsqrt(mean(x**2) + eps) * scale`` over some axes.

    Args:
      params: ``rms_norm_init``'s ``{"scale"}`` or ``{}``; a ``"bias"`` may be added to the scale (as
        equinox.nn.RMSNorm's ``use_bias``; PyTorch's and Flax's RMSNorm have none).
      x: the input.
      normalized_shape, reduction_axes, feature_axes, mask, axis_name, axis_index_groups: as in ``layer_norm``.
      eps: added to the mean square (> 0); None (PyTorch's default) is ``finfo(x.dtype).eps``.

    Returns:
      y, with x's shape and dtype.
    """
    layer = "rms_norm"
    x, axes, bshape, mask = _layout(x, params, normalized_shape, reduction_axes, feature_axes, mask, layer)
    eps = float(jnp.finfo(x.dtype).eps) if eps is None else check_eps(eps, layer)  # finfo: the real dtype's eps
    scale, bias = affine_arrays(params, bshape)
    return normalize_rms(x, axes, eps, scale, bias=bias, mask=mask, axis_name=axis_name,
                         axis_index_groups=axis_index_groups)
