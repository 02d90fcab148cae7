"""Layer normalization (torch.nn.LayerNorm) and RMS normalization (torch.nn.RMSNorm) as pure functions.

Both normalize over the trailing ``normalized_shape`` dims, like PyTorch. State::

    layer_norm params = {"scale": normalized_shape, "bias": normalized_shape}
                        # {"scale": ...} when bias=False, {} when elementwise_affine=False
    rms_norm params   = {"scale": normalized_shape}   # {} when elementwise_affine=False
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxnorm import _core

Array = jax.Array


def layer_norm_init(
    normalized_shape: int | tuple[int, ...],
    *,
    elementwise_affine: bool = True,
    bias: bool = True,
    dtype: Any = jnp.float32,
) -> dict[str, Array]:
    """Fresh params as PyTorch initializes them: scale 1, bias 0."""
    shape = _core.normalized_shape_tuple(normalized_shape, "layer_norm_init")
    if not elementwise_affine:
        return {}
    params = {"scale": jnp.ones(shape, dtype)}
    if bias:
        params["bias"] = jnp.zeros(shape, dtype)
    return params


def rms_norm_init(
    normalized_shape: int | tuple[int, ...],
    *,
    elementwise_affine: bool = True,
    dtype: Any = jnp.float32,
) -> dict[str, Array]:
    """Fresh params as PyTorch initializes them: scale 1 (RMSNorm has no bias)."""
    shape = _core.normalized_shape_tuple(normalized_shape, "rms_norm_init")
    return {"scale": jnp.ones(shape, dtype)} if elementwise_affine else {}


def _check_trailing_params(params: Any, shape: tuple[int, ...], layer: str, allowed: list[list[str]]) -> None:
    init = f"jaxnorm.{layer}_init({shape if len(shape) > 1 else shape[0]}, ...)"
    keys = sorted(params.keys()) if isinstance(params, dict) else None
    layout = next((k for k in allowed if k == keys), allowed[-1])
    _core.check_state(
        params,
        {k: (shape, "float") for k in layout},
        arg="params",
        layer=layer,
        fix=f"Create matching params with {init}.",
    )


def _lift(p: Array | None, ndim: int) -> Array | None:
    """Give a normalized-shape parameter the input's rank (leading size-1 dims), so no rank promotion happens."""
    return None if p is None else p.reshape((1,) * (ndim - p.ndim) + p.shape)


def layer_norm(
    params: dict[str, Array], x: Array, *, normalized_shape: int | tuple[int, ...], eps: float = 1e-5
) -> Array:
    """Normalize over the trailing ``normalized_shape`` dims with the biased variance, then scale/shift."""
    layer = "layer_norm"
    shape = _core.normalized_shape_tuple(normalized_shape, layer)
    x = _core.check_input(x, layer, min_ndim=len(shape), what=f"at least {len(shape)} dims")
    _core.check_trailing_shape(x, shape, layer)
    _check_trailing_params(params, shape, layer, [[], ["scale"], ["bias", "scale"]])
    eps = _core.check_eps(eps, layer)
    axes = tuple(range(x.ndim - len(shape), x.ndim))
    scale, bias = (_lift(params.get(k), x.ndim) for k in ("scale", "bias"))
    return _core.normalize_batch(x, axes, eps, scale, bias)[0]


def rms_norm(
    params: dict[str, Array], x: Array, *, normalized_shape: int | tuple[int, ...], eps: float | None = None
) -> Array:
    """``x * rsqrt(mean(x**2) + eps) * scale`` over the trailing dims; ``eps=None`` is ``finfo(x.dtype).eps``."""
    layer = "rms_norm"
    shape = _core.normalized_shape_tuple(normalized_shape, layer)
    x = _core.check_input(x, layer, min_ndim=len(shape), what=f"at least {len(shape)} dims")
    _core.check_trailing_shape(x, shape, layer)
    _check_trailing_params(params, shape, layer, [[], ["scale"]])
    eps = float(jnp.finfo(x.dtype).eps) if eps is None else _core.check_eps(eps, layer)
    axes = tuple(range(x.ndim - len(shape), x.ndim))
    return _core.normalize_rms(x, axes, eps, _lift(params.get("scale"), x.ndim))
