"""Weight reparametrizations: spectral normalization and weight normalization, as pure functions of a weight.

Both act on a layer's weight, not on activations; the Flax wrappers (``jaxnorm.linen.SpectralNorm`` /
``WeightNorm`` and their NNX twins) apply them to the variables of any wrapped layer.

State of spectral normalization: ``u``, the running estimate of the leading left-singular vector (one entry per
output feature), which each training call refines by ``n_steps`` power iterations, as Miyato et al. (2018),
PyTorch's ``spectral_norm`` and Flax's ``SpectralNorm`` do.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jaxnorm._checks import broadcast_shape, canonical_axes, canonical_axis, check_eps, check_input
from jaxnorm._statistics import stats_dtype

Array = jax.Array


def _l2_normalize(v: Array, axes: Any, eps: float) -> Array:
    return v * jax.lax.rsqrt(jnp.sum(v * v, axis=axes, keepdims=True) + eps)


def _matrix(w: Array, axis: int) -> Array:
    """``w`` as a ``(-1, out)`` matrix with the output-feature ``axis`` last (Flax's kernel layout)."""
    return jnp.moveaxis(w, axis, -1).reshape(-1, w.shape[axis])


def spectral_norm(
    w: Array, u: Array, *, n_steps: int = 1, eps: float = 1e-12, axis: int = -1, torch_order: bool = False
) -> tuple[Array, Array, Array]:
    """Spectral normalization: ``w / sigma``, ``sigma`` the largest singular value of ``w``, by power iteration.

    ``w`` is viewed as a matrix with the output features on ``axis`` and everything else flattened. Each of
    ``n_steps`` iterations sets ``v = normalize(W u)``, ``u = normalize(W^T v)``; then ``sigma = v^T W u``
    (Flax's order). ``u`` and ``v`` are constants for differentiation (as in PyTorch and Flax), so the gradient
    flows through ``sigma``'s dependence on ``w``. A weight with fewer than 2 dims is returned unchanged, with
    ``sigma = 1``.

    Args:
      w: the weight.
      u: the power iteration's vector, one entry per output feature.
      n_steps: the iterations (0: PyTorch's eval mode, with ``torch_order``).
      eps: added inside each normalization.
      axis: the output-feature axis (``-1`` for Flax kernels, ``0`` for PyTorch weights, as ``spectral_norm(dim=0)``).
      torch_order: end the iteration on ``v = normalize(W u)`` before ``sigma``, as PyTorch's ``spectral_norm``
        (whose stored ``v`` is always that of its ``u``): training calls then equal PyTorch's.

    Returns:
      ``(w / sigma, new_u, sigma)``.
    """
    layer = "spectral_norm"
    w = check_input(w, layer, min_ndim=0, what="any rank")
    if isinstance(n_steps, bool) or not isinstance(n_steps, int) or n_steps < 0:
        raise ValueError(f"{layer}: `n_steps` must be an int >= 0, got {n_steps!r}.")
    eps = check_eps(eps, layer)
    if w.ndim < 2:
        return w, u, jnp.ones((), stats_dtype(w.dtype))
    ax = canonical_axis(axis, w.ndim, layer)
    out = w.shape[ax]
    if getattr(u, "shape", None) != (out,):
        raise ValueError(
            f"{layer}: `u` must have shape ({out},), one entry per output feature on axis {axis} of w "
            f"{tuple(w.shape)}; got {getattr(u, 'shape', type(u).__name__)}. Start from a random normal vector."
        )
    dtype = stats_dtype(w.dtype)
    mat = _matrix(w, ax).astype(dtype)
    const = jax.lax.stop_gradient(mat)
    u = jax.lax.stop_gradient(u.astype(dtype))
    # full float32 products: the default precision is TF32 on NVIDIA GPUs (bfloat16 passes on TPUs), which moves
    # sigma by ~1e-3 relative; these are matrix-vector products, bound by reading w, so the precision is free
    dot = functools.partial(jnp.matmul, precision=jax.lax.Precision.HIGHEST)
    for _ in range(n_steps):
        v = _l2_normalize(dot(const, u), None, eps)
        u = _l2_normalize(dot(v, const), None, eps)
    if n_steps == 0 or torch_order:
        v = _l2_normalize(dot(const, u), None, eps)
    u, v = jax.lax.stop_gradient(u), jax.lax.stop_gradient(v)
    sigma = dot(dot(v, mat), u)  # (v W) u: Flax's grouping (and PyTorch's u^T (W v) in its layout)
    w_bar = w.astype(dtype) / jnp.where(sigma != 0, sigma, 1)
    return w_bar.astype(w.dtype), u, sigma


def weight_norm(
    v: Array, scale: Array | None = None, *, feature_axes: int | Sequence[int] | None = -1, eps: float = 1e-12
) -> Array:
    """Weight normalization (Salimans & Kingma, 2016): ``scale * v / ||v||``, the norm over every axis except
    ``feature_axes``, as ``v * rsqrt(sum(v**2) + eps)`` (Flax's eps placement).

    Args:
      v: the direction.
      scale: the norm per feature, shaped as ``v`` on the feature axes (PyTorch's ``g``, squeezed; ``()`` for one
        norm); None leaves unit-norm directions.
      feature_axes: ``-1`` (Flax kernels: one norm per output feature), ``0`` (PyTorch's ``weight_norm(dim=0)``),
        or None / ``()`` (one norm for the whole tensor: PyTorch's ``dim=None``, Flax's ``feature_axes=None``).
      eps: added to the sum of squares.

    Returns:
      The normalized weight, with ``v``'s shape.
    """
    layer = "weight_norm"
    v = check_input(v, layer, min_ndim=0, what="any rank")
    eps = check_eps(eps, layer)
    no_features = feature_axes is None or v.ndim == 0 or (isinstance(feature_axes, (tuple, list)) and not feature_axes)
    feats = () if no_features else canonical_axes(feature_axes, v.ndim, layer, name="feature_axes")
    reduce = tuple(i for i in range(v.ndim) if i not in feats)
    dtype = stats_dtype(v.dtype)
    w = _l2_normalize(v.astype(dtype), reduce, eps)
    if scale is not None:
        fshape = tuple(v.shape[a] for a in feats)
        if tuple(getattr(scale, "shape", ())) != fshape:
            raise ValueError(
                f"{layer}: `scale` must have shape {fshape} (v's feature axes {feats}), got "
                f"{tuple(getattr(scale, 'shape', ()))}."
            )
        w = w * scale.astype(dtype).reshape(broadcast_shape(v.shape, feats))
    return w.astype(v.dtype)
