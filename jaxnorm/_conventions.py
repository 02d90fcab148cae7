"""The conventions the wrappers share, resolved in one place: momentum, training mode, the affine keywords, dtypes.

PyTorch's ``momentum=0.1`` is the weight of the NEW batch; Flax's ``momentum=0.99`` is the decay of the OLD
average, and Flax updates the running variance with the biased batch variance where PyTorch uses the unbiased
one. ``flax_momentum`` therefore selects Flax's whole update rule. The wrappers have no field called plain
``momentum``: a Flax user writing ``BatchNorm(momentum=0.99)``
gets a TypeError instead of a silently wrong model, and must say which convention is meant.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

_TORCH_DEFAULT = 0.1


def resolve_momentum(torch_momentum: float | None, flax_momentum: float | None, layer: str) -> float | None:
    """Return the functional API's momentum (PyTorch convention; None = cumulative average)."""
    if flax_momentum is None:
        return torch_momentum
    if torch_momentum != _TORCH_DEFAULT:
        raise ValueError(
            f"{layer}: give either `torch_momentum` (weight of the new batch) or `flax_momentum` (decay of the old "
            f"average), not both; got torch_momentum={torch_momentum!r}, flax_momentum={flax_momentum!r}."
        )
    if isinstance(flax_momentum, bool) or not 0.0 <= flax_momentum <= 1.0:
        raise ValueError(f"{layer}: `flax_momentum` must be in [0, 1], got {flax_momentum!r} (Flax's default is 0.99).")
    return 1.0 - float(flax_momentum)


def resolve_training(use_running_average: bool | None, call_value: bool | None, layer: str) -> bool:
    """Flax's merge of the field and the call argument; returns ``training = not use_running_average``."""
    value = call_value if call_value is not None else use_running_average
    if value is None:
        raise ValueError(
            f"{layer}: no `use_running_average` was given. Pass it to the constructor or to the call, e.g. "
            f"{layer}(use_running_average=not train) or layer(x, use_running_average=not train)."
        )
    return not value


def resolve_affine(
    affine: bool | None, use_scale: bool | None, use_bias: bool | None, default: bool, layer: str,
    affine_name: str = "affine",
) -> tuple[bool, bool]:
    """``(use_scale, use_bias)`` from PyTorch's one switch or Flax's two, never both.

    Neither given: PyTorch's default for the layer. Given one of Flax's keywords, the other takes Flax's default
    (True), as it would in Flax.
    """
    if affine is not None and (use_scale is not None or use_bias is not None):
        flax_kw = ", ".join(f"`{k}`={v!r}" for k, v in (("use_scale", use_scale), ("use_bias", use_bias))
                            if v is not None)
        raise ValueError(
            f"{layer}: got both `{affine_name}`={affine!r} (PyTorch) and {flax_kw} (Flax); give one convention: "
            f"`{affine_name}` switches scale and bias together, `use_scale`/`use_bias` each one."
        )
    if use_scale is None and use_bias is None:
        on = default if affine is None else bool(affine)
        return on, on
    return (True if use_scale is None else bool(use_scale)), (True if use_bias is None else bool(use_bias))


def feature_axes(ndim: int, axes: Any) -> tuple[int, ...]:
    """Flax's canonical axes: an int or a sequence of ints -> sorted, distinct, non-negative."""
    return tuple(sorted({a % ndim for a in ((axes,) if isinstance(axes, int) else axes)}))


def running_dtype(param_dtype: Any, force_float32_reductions: bool) -> Any:
    """dtype of the running statistics: at least float32, or ``param_dtype`` as Flax stores them when
    ``force_float32_reductions=False``."""
    return jnp.promote_types(param_dtype, jnp.float32) if force_float32_reductions else param_dtype


def compute_dtype(x: Any, dtype: Any) -> Any:
    """x as the core sees it for an output ``dtype``: a wider dtype (e.g. float32 from a bfloat16 input) is the
    input's exact conversion, so the core computes and rounds once in it, as Flax does; ``dtype=None`` keeps x."""
    if dtype is None or not hasattr(x, "dtype"):
        return x
    wide = jnp.promote_types(x.dtype, dtype)
    return x if wide == x.dtype else x.astype(wide)


def output_dtype(y: Any, dtype: Any) -> Any:
    return y if dtype is None else y.astype(dtype)
