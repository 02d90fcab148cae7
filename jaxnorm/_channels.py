"""What every per-channel layer (batch, instance and group norm, the batch-norm variants) checks and builds the
same way: the channel count, the feature axes and mask, and the params and state against the feature shape."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxnorm._checks import canonical_axes, check_mask, check_state
from jaxnorm._running import running_stats_init

Array = jax.Array


def check_num_features(num_features: Any, layer: str) -> int:
    if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features < 1:
        raise ValueError(f"{layer}: `num_features` must be a positive int, got {num_features!r}.")
    return num_features


def channel_init(num_features: Any, *, affine: bool, track_running_stats: bool, dtype: Any, nonfinite_guard: bool,
                 layer: str, bias: bool = True) -> tuple[dict[str, Array], dict[str, Array]]:
    """PyTorch's fresh per-channel ``(params, batch_stats)``: scale 1, bias 0 (``affine``; ``bias=False``: the
    scale alone, as PyTorch 2.x's ``bias=False``), and the running statistics of ``jaxnorm._running``
    (``track_running_stats``)."""
    c = check_num_features(num_features, layer)
    params = affine_init((c,), affine=affine, bias=bias, dtype=dtype)
    stats = running_stats_init(c, dtype, nonfinite_guard) if track_running_stats else {}
    return params, stats


def affine_init(shape: tuple[int, ...], *, affine: bool, bias: bool, dtype: Any) -> dict[str, Array]:
    """PyTorch's fresh affine params of ``shape``: scale 1 and bias 0, the scale alone with ``bias=False``, none
    without ``affine``."""
    if not affine:
        return {}
    return {"scale": jnp.ones(shape, dtype), **({"bias": jnp.zeros(shape, dtype)} if bias else {})}


def feature_layout(x: Array, axis: Any, mask: Any, layer: str) -> tuple[tuple[int, ...], tuple[int, ...], Any]:
    """``(feature axes, feature shape, mask)`` for a per-channel layer whose ``axis`` is an int or a tuple; the
    mask may differ between channels (each channel then has its own count, as in Flax)."""
    feats = canonical_axes(axis, x.ndim, layer, name="axis")
    return feats, tuple(x.shape[a] for a in feats), check_mask(mask, x, layer)


def check_channel_state(params: Any, batch_stats: Any, fshape: int | tuple[int, ...], layer: str, init: str) -> None:
    """Validate (params, batch_stats) of a per-channel layer against the feature shape (``(C,)`` for one axis).

    ``count`` is optional (a state saved by flax.linen.BatchNorm has only mean and var); ``skipped`` is present when
    the state was made with ``nonfinite_guard=True``.
    """
    fshape = (fshape,) if isinstance(fshape, int) else tuple(fshape)
    size = fshape[0] if len(fshape) == 1 else fshape
    fix = f"Create matching state with jaxnorm.{init}({size}, ...)."
    check_affine(params, fshape, layer, fix)
    if isinstance(batch_stats, dict) and batch_stats:
        expected = {"mean": (fshape, "inexact"), "var": (fshape, "float")}  # complex inputs: a complex mean
        for key in ("count", "skipped"):
            if key in batch_stats:
                expected[key] = ((), "int")
        check_state(batch_stats, expected, arg="batch_stats", layer=layer, fix=fix)
    else:
        check_state(batch_stats, {}, arg="batch_stats", layer=layer, fix=fix)


def check_affine(params: Any, fshape: tuple[int, ...], layer: str, fix: str) -> None:
    """Per-channel params: {"scale", "bias"}, either one alone (Flax's use_scale/use_bias), or {}."""
    keys = [k for k in ("scale", "bias") if isinstance(params, dict) and k in params] if params else []
    check_state(params, {k: (fshape, "inexact") for k in keys or ["scale", "bias"]} if params else {},
                arg="params", layer=layer, fix=fix)


def check_cumulative(momentum: float | None, batch_stats: Any, training: bool, layer: str) -> None:
    if momentum is None and training and isinstance(batch_stats, dict) and batch_stats and "count" not in batch_stats:
        raise ValueError(
            f"{layer}: `momentum`=None (the cumulative average) needs `batch_stats['count']`, the number of batches "
            "seen, but this state has none (saved by flax.linen.BatchNorm?). Add it, e.g. "
            "batch_stats = {**batch_stats, 'count': jnp.zeros((), jnp.int32)}, or give a momentum."
        )
