"""Argument checks, run at trace time before anything is computed: each error names the argument, the value
received and the fix. Also the small shape helpers the checks share (canonical axes, broadcast shapes)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def check_training(training: Any, layer: str) -> bool:
    if isinstance(training, (bool, np.bool_)):
        return bool(training)
    raise TypeError(
        f"{layer}: `training` must be a Python bool, got {training!r} (type {type(training).__name__}). "
        "It selects the code path at trace time, so it cannot be a traced value: pass True/False, or mark it "
        "static, e.g. jax.jit(f, static_argnames='training')."
    )


def check_flag(value: Any, name: str, layer: str) -> bool:
    """A static switch (it selects the program at trace time): a Python bool."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise TypeError(f"{layer}: `{name}` must be a Python bool, got {value!r} (type {type(value).__name__}).")


def check_input(x: Any, layer: str, *, min_ndim: int, what: str, complex_ok: bool = False) -> Array:
    """x as a JAX array of a floating-point dtype (or complex, for the layers that normalize complex arrays)."""
    if not hasattr(x, "dtype") or not hasattr(x, "shape"):
        raise TypeError(f"{layer}: `x` must be a JAX or NumPy array, got {type(x).__name__}.")
    if not (jnp.issubdtype(x.dtype, jnp.floating) or complex_ok and jnp.issubdtype(x.dtype, jnp.complexfloating)):
        kinds = "a floating-point or complex" if complex_ok else "a floating-point"
        raise TypeError(
            f"{layer}: `x` must have {kinds} dtype, got {x.dtype}. Cast it first, e.g. x.astype(jnp.float32)."
        )
    if x.ndim < min_ndim:
        raise ValueError(f"{layer}: `x` must have {what}, got shape {tuple(x.shape)} (rank {x.ndim}).")
    return jnp.asarray(x)


def canonical_axis(axis: Any, ndim: int, layer: str, *, name: str = "axis") -> int:
    if not isinstance(axis, (int, np.integer)) or isinstance(axis, bool):
        raise TypeError(f"{layer}: `{name}` must be an int, got {axis!r}.")
    if not -ndim <= axis < ndim:
        raise ValueError(
            f"{layer}: `{name}`={axis} is out of range for an input of rank {ndim}; use a value in [{-ndim}, {ndim})."
        )
    return int(axis) % ndim


def canonical_axes(axes: Any, ndim: int, layer: str, *, name: str) -> tuple[int, ...]:
    """An int or a sequence of ints -> sorted tuple of distinct non-negative axes (duplicates merged, as Flax)."""
    items = axes if isinstance(axes, Sequence) and not isinstance(axes, str) else (axes,)
    if not items:
        raise ValueError(f"{layer}: `{name}` must name at least one axis, got {axes!r}.")
    return tuple(sorted({canonical_axis(a, ndim, layer, name=name) for a in items}))


def broadcast_shape(shape: Sequence[int], axes: Sequence[int]) -> tuple[int, ...]:
    """``shape`` with every dim outside ``axes`` set to 1: how a per-feature array broadcasts against x."""
    return tuple(d if i in axes else 1 for i, d in enumerate(shape))


def check_eps(eps: Any, layer: str) -> float:
    if isinstance(eps, bool) or not isinstance(eps, (int, float, np.floating, np.integer)):
        raise TypeError(f"{layer}: `eps` must be a Python float > 0, got {eps!r}.")
    if not eps > 0:
        raise ValueError(f"{layer}: `eps` must be > 0, got {eps!r}; PyTorch's default is 1e-5.")
    return float(eps)


def check_momentum(momentum: Any, layer: str) -> float | None:
    if momentum is None:
        return None
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float, np.floating, np.integer)):
        raise TypeError(f"{layer}: `momentum` must be a float in [0, 1] or None, got {momentum!r}.")
    if not 0.0 <= momentum <= 1.0:
        hint = ""
        if momentum > 1.0:
            hint = " (it looks like a percentage)"
        raise ValueError(
            f"{layer}: `momentum` must be in [0, 1] or None (cumulative average), got {momentum!r}{hint}. "
            "jaxnorm uses PyTorch's convention: momentum is the weight of the NEW batch, "
            "new = (1 - momentum) * old + momentum * batch; PyTorch's default is 0.1."
        )
    return float(momentum)


def check_state(
    state: Any,
    expected: Mapping[str, tuple[tuple[int, ...], str]],
    *,
    arg: str,
    layer: str,
    fix: str,
) -> None:
    """Check that ``state`` is a dict with exactly ``expected`` keys, shapes and dtype kinds.

    ``expected`` maps key -> (shape, kind) with kind "float", "inexact" (floating or complex: a running mean of
    complex inputs) or "int". An empty ``expected`` means ``{}``.
    """
    if not isinstance(state, Mapping):
        raise TypeError(f"{layer}: `{arg}` must be a dict, got {type(state).__name__}. {fix}")
    want = {k: (shape, kind) for k, (shape, kind) in expected.items()}
    got_keys, want_keys = sorted(state.keys()), sorted(want.keys())
    if got_keys != want_keys:
        raise ValueError(
            f"{layer}: `{arg}` has keys {got_keys} but this layer expects {want_keys}. {fix}"
        )
    for key, (shape, kind) in want.items():
        value = state[key]
        vshape = tuple(getattr(value, "shape", ()))
        vdtype = getattr(value, "dtype", None)
        if vshape != tuple(shape):
            raise ValueError(
                f"{layer}: `{arg}['{key}']` has shape {vshape} but the input needs {tuple(shape)}. {fix}"
            )
        if vdtype is None or not jnp.issubdtype(vdtype, _KINDS[kind][0]):
            want_kind = _KINDS[kind][1]
            raise TypeError(f"{layer}: `{arg}['{key}']` must have {want_kind} dtype, got {vdtype}. {fix}")


_KINDS = {"float": (jnp.floating, "a floating-point"), "inexact": (jnp.inexact, "a floating-point or complex"),
          "int": (jnp.integer, "an integer")}


def normalized_shape_tuple(normalized_shape: Any, layer: str) -> tuple[int, ...]:
    shape: tuple[int, ...]
    if isinstance(normalized_shape, (int, np.integer)) and not isinstance(normalized_shape, bool):
        shape = (int(normalized_shape),)
    elif isinstance(normalized_shape, Sequence) and all(
        isinstance(d, (int, np.integer)) and not isinstance(d, bool) for d in normalized_shape
    ):
        shape = tuple(int(d) for d in normalized_shape)
    else:
        raise TypeError(
            f"{layer}: `normalized_shape` must be an int or a tuple of ints, got {normalized_shape!r}."
        )
    if not shape or any(d < 1 for d in shape):
        raise ValueError(f"{layer}: `normalized_shape` must be non-empty with positive sizes, got {shape}.")
    return shape


def check_trailing_shape(x: Array, normalized_shape: tuple[int, ...], layer: str) -> None:
    k = len(normalized_shape)
    if x.ndim < k or tuple(x.shape[x.ndim - k :]) != normalized_shape:
        raise ValueError(
            f"{layer}: `normalized_shape`={normalized_shape} must equal the trailing dims of `x`, but x has shape "
            f"{tuple(x.shape)}. Normalize the last {k} dim(s) of an input whose shape ends in {normalized_shape}, "
            "or move the axes to the end first (jnp.moveaxis)."
        )


def check_mask(mask: Any, x: Array, layer: str) -> Array | None:
    """A boolean mask that broadcasts to x as NumPy broadcasts (a lower rank lines up with x's trailing dims, as in
    Flax), returned at x's rank (size-1 dims where it is shared)."""
    if mask is None:
        return None
    mask = jnp.asarray(mask)
    if mask.dtype != jnp.bool_:
        raise TypeError(f"{layer}: `mask` must be a boolean array (True = use this value), got dtype {mask.dtype}.")
    full = (1,) * (x.ndim - mask.ndim) + tuple(mask.shape)
    if mask.ndim > x.ndim or any(m not in (1, d) for m, d in zip(full, x.shape, strict=True)):
        raise ValueError(
            f"{layer}: `mask` has shape {tuple(mask.shape)}, which does not broadcast to x's shape "
            f"{tuple(x.shape)}: it lines up with x's trailing dims, each of size 1 or x's, e.g. "
            f"{(x.shape[0],) + (1,) * (x.ndim - 1)} for one flag per example or {tuple(x.shape[1:])} for one per "
            "position of every example."
        )
    return mask.reshape(full)


def channel_shape(ndim: int, axis: int, size: int) -> tuple[int, ...]:
    """Shape that broadcasts a (size,) per-channel vector along ``axis`` of a rank-``ndim`` array."""
    return tuple(size if i == axis else 1 for i in range(ndim))


def row_axes(normalized_shape: Any, reduction_axes: Any, feature_axes: Any, layer: str,
             default: Any = None) -> dict[str, Any]:
    """Layer/RMS norm's axes as the functional API takes them: PyTorch's ``normalized_shape`` (the trailing dims,
    params of that shape) or Flax's ``reduction_axes`` with ``feature_axes`` (the params' axes), never both.
    Neither given: ``default`` for both of Flax's (the wrappers: -1, as Flax), or an error when it is None."""
    if normalized_shape is not None and reduction_axes is not None:
        raise ValueError(
            f"{layer}: got both `normalized_shape`={normalized_shape!r} (PyTorch: the trailing dims) and "
            f"`reduction_axes`={reduction_axes!r} (Flax: any axes); give one of them."
        )
    if normalized_shape is not None:
        if feature_axes is not None:
            raise ValueError(
                f"{layer}: `feature_axes`={feature_axes!r} goes with `reduction_axes`; with `normalized_shape` "
                "the params have the normalized shape."
            )
        return {"normalized_shape": normalized_shape}
    if reduction_axes is None and default is None:
        raise TypeError(
            f"{layer}: give `normalized_shape` (the trailing dims, as torch.nn.LayerNorm) or `reduction_axes` "
            "(the axes to normalize over, as flax.linen.LayerNorm), e.g. normalized_shape=x.shape[-1]."
        )
    reduction_axes = default if reduction_axes is None else reduction_axes
    return {"reduction_axes": reduction_axes, "feature_axes": default if feature_axes is None else feature_axes}
