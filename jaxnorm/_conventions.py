"""The conventions the wrappers share, resolved in one place: momentum, training mode, the affine keywords, the
running state, the axes of each layer family, the groups, dtypes. linen, nnx and equinox call these and the
functional core; none of them decides a convention on its own.

PyTorch's ``momentum=0.1`` is the weight of the NEW batch; Flax's ``momentum=0.99`` is the decay of the OLD
average, and Flax updates the running variance with the biased batch variance where PyTorch uses the unbiased
one. ``flax_momentum`` therefore selects Flax's whole update rule. The wrappers have no field called plain
``momentum``: a Flax user writing ``BatchNorm(momentum=0.99)``
gets a TypeError instead of a silently wrong model, and must say which convention is meant.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from jaxnorm._running import running_stats_init
from jaxnorm._statistics import stats_dtype

_TORCH_DEFAULT = 0.1
DEFAULT_GROUPS = 32  # GroupNorm's num_groups when neither it nor group_size is given (Flax's default)


@dataclasses.dataclass(frozen=True)
class Momentum:
    """A wrapper's momentum keywords resolved.

    ``momentum``: the functional API's (PyTorch's convention: the weight of the new batch; None = the cumulative
    average). ``unbiased``: whether the running variance takes the unbiased batch variance (PyTorch) or the
    biased one (Flax). ``keeps_count``: whether the state has PyTorch's ``num_batches_tracked`` (Flax's has not).
    """

    momentum: float | None
    unbiased: bool
    keeps_count: bool


def resolve_momentum(torch_momentum: float | None, flax_momentum: float | None, layer: str,
                     torch_default: float = _TORCH_DEFAULT) -> Momentum:
    """``torch_momentum`` (PyTorch's whole update rule) or ``flax_momentum`` (Flax's), never both (a
    ``torch_momentum`` left at the layer's ``torch_default`` is not given)."""
    if flax_momentum is None:
        return Momentum(torch_momentum, unbiased=True, keeps_count=True)
    if torch_momentum != torch_default:
        raise ValueError(
            f"{layer}: give either `torch_momentum` (weight of the new batch) or `flax_momentum` (decay of the old "
            f"average), not both; got torch_momentum={torch_momentum!r}, flax_momentum={flax_momentum!r}."
        )
    if isinstance(flax_momentum, bool) or not 0.0 <= flax_momentum <= 1.0:
        raise ValueError(f"{layer}: `flax_momentum` must be in [0, 1], got {flax_momentum!r} (Flax's default is 0.99).")
    return Momentum(1.0 - float(flax_momentum), unbiased=False, keeps_count=False)


def no_plain_momentum(momentum: Any, layer: str, unset: Any = None) -> None:
    """A plain ``momentum`` (Flax's and Equinox's keyword, the decay of the old average; PyTorch's, the weight of
    the new batch) is refused: the convention must be said."""
    if momentum is not unset:
        raise TypeError(
            f"{layer}: `momentum`={momentum!r} is ambiguous (Flax and equinox.nn mean the decay of the old average, "
            f"PyTorch the weight of the new batch). Give `flax_momentum`={momentum!r} for Flax's meaning or "
            "`torch_momentum`= for PyTorch's (default 0.1)."
        )


def running_state(fshape: tuple[int, ...], *, param_dtype: Any, force_float32_reductions: bool, count: bool,
                  nonfinite_guard: bool) -> dict[str, Any]:
    """A wrapper's fresh running statistics for features of shape ``fshape``: PyTorch's initial values, in
    ``running_dtype``, with ``count`` when asked for and ``skipped`` with the non-finite guard."""
    stats = running_stats_init(fshape, nonfinite_guard=nonfinite_guard, count=count)
    dtype = running_dtype(param_dtype, force_float32_reductions)
    return {k: v.astype(dtype) if k in ("mean", "var") else v for k, v in stats.items()}


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


def instance_axes(axis: Any, feature_axes: Any, layer: str) -> Any:
    """InstanceNorm's channel axes: ``axis`` (PyTorch's, default -1 channels-last) or Flax's ``feature_axes``."""
    if feature_axes is not None and axis != -1:
        raise ValueError(
            f"{layer}: got both `axis`={axis!r} and `feature_axes`={feature_axes!r}; they name the same thing (the "
            "channel axes), give one."
        )
    return axis if feature_axes is None else feature_axes


def groups(num_groups: int | None, group_size: int | None) -> dict[str, int | None]:
    """GroupNorm's group keywords for the functional API: Flax's default of 32 groups when neither is given."""
    if num_groups is None and group_size is None:
        return {"num_groups": DEFAULT_GROUPS, "group_size": None}
    return {"num_groups": num_groups, "group_size": group_size}


def feature_axes(ndim: int, axes: Any) -> tuple[int, ...]:
    """Flax's canonical axes: an int or a sequence of ints -> sorted, distinct, non-negative."""
    return tuple(sorted({a % ndim for a in ((axes,) if isinstance(axes, int) else axes)}))


def running_dtype(param_dtype: Any, force_float32_reductions: bool) -> Any:
    """dtype of the running statistics: at least float32, or ``param_dtype`` as Flax stores them when
    ``force_float32_reductions=False``."""
    return stats_dtype(param_dtype) if force_float32_reductions else param_dtype


def compute_dtype(x: Any, dtype: Any) -> Any:
    """x as the core sees it for an output ``dtype``: a wider dtype (e.g. float32 from a bfloat16 input) is the
    input's exact conversion, so the core computes and rounds once in it, as Flax does; ``dtype=None`` keeps x."""
    if dtype is None or not hasattr(x, "dtype"):
        return x
    wide = jnp.promote_types(x.dtype, dtype)
    return x if wide == x.dtype else x.astype(wide)


def output_dtype(y: Any, dtype: Any) -> Any:
    return y if dtype is None else y.astype(dtype)
