"""Batch-norm variants on the shared core: batch renormalization, frozen batch norm, folding BN into a layer.

State is batch norm's (``jaxnorm.batch_norm_init``).
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

import jax
import jax.numpy as jnp

from jaxnorm._channels import check_channel_state, check_cumulative, feature_layout
from jaxnorm._checks import (
    broadcast_shape,
    canonical_axis,
    channel_shape,
    check_eps,
    check_input,
    check_momentum,
    check_training,
)
from jaxnorm._moments import moments
from jaxnorm._normalize import normalize
from jaxnorm._running import empty_batch, running_arrays, update_running
from jaxnorm._statistics import stats_dtype, unbiased_variance
from jaxnorm._tree import get_path, set_path, walk

Array = jax.Array


def _prepare(params, batch_stats, x, axis, layer):
    x = check_input(x, layer, min_ndim=2, what="rank >= 2: (N, C, ...) with the channel on `axis`")
    ax = canonical_axis(axis, x.ndim, layer)
    c = x.shape[ax]
    check_channel_state(params, batch_stats, c, layer, "batch_norm_init")
    _needs_running(batch_stats, c, layer)
    return x, ax, c, channel_shape(x.ndim, ax, c)


def _needs_running(batch_stats, size, layer):
    if not batch_stats:
        raise ValueError(f"{layer}: needs running statistics; create them with jaxnorm.batch_norm_init({size}).")


def batch_renorm(
    params: dict[str, Array],
    batch_stats: dict[str, Array],
    x: Array,
    *,
    training: bool,
    r_max: float | Array = 3.0,
    d_max: float | Array = 5.0,
    axis: int | tuple[int, ...] = 1,
    momentum: float | None = 0.01,
    eps: float = 1e-5,
    warmup_steps: int = 0,
    relax_steps: int = 0,
    mask: Array | None = None,
    axis_name: Hashable | None = None,
    axis_index_groups: Any = None,
    running_var_unbiased: bool = True,
    batch_var_unbiased: bool = False,
) -> tuple[Array, dict[str, Array]]:
    """Batch renormalization (Ioffe, 2017): ``y = (x_hat * r + d) * scale + bias``; returns ``(y, new_batch_stats)``.

    In training, with the batch's mean ``mu_B`` and ``sigma_B = sqrt(var_B + eps)``, and the running ones ``mu``
    and ``sigma = sqrt(var + eps)``::

        x_hat = (x - mu_B) / sigma_B
        r = stop_gradient(clip(sigma_B / sigma, 1 / r_max, r_max))
        d = stop_gradient(clip((mu_B - mu) / sigma, -d_max, d_max))

    and the running statistics are updated exactly as ``batch_norm`` updates them (``count`` included). With
    ``r_max=1, d_max=0`` this is plain batch norm. Eval mode normalizes with the running statistics.

    Args:
      params: ``{"scale", "bias"}`` (either, or neither), as ``batch_norm_init`` makes them.
      batch_stats: ``{"mean", "var", "count"}`` from ``batch_norm_init``: renorm needs running statistics.
      x: ``(N, ..., C, ...)`` with the channels on ``axis`` (an int or a tuple of feature axes).
      training: a Python bool: batch statistics corrected by ``r`` and ``d``, or the running statistics.
      r_max, d_max: the final bounds (the paper's 3 and 5); floats or traced values.
      axis, momentum, eps, mask, axis_name, axis_index_groups, running_var_unbiased: as in ``batch_norm``
        (``momentum`` is the weight of the new batch; the paper's alpha is 0.01).
      warmup_steps, relax_steps: the paper's schedule, read from ``batch_stats["count"]`` (the training batches
        seen before this one, ``t``): plain batch norm (bounds 1 and 0) while ``t < warmup_steps``, then the
        bounds relaxed linearly to ``r_max`` and ``d_max``, which they reach at ``t = warmup_steps +
        relax_steps``; ``relax_steps=0`` switches at once (the RL implementations' warm-up). Both 0 (the
        default): the bounds are ``r_max`` and ``d_max`` from the first batch. The step is a traced value, so a
        jitted training step never recompiles as it advances.
      batch_var_unbiased: normalize with the unbiased batch variance ``var_B * n / (n - 1)`` (sb3-contrib's
        BatchRenorm; the paper, PyTorch and Flax use the biased one).

    Returns:
      ``(y, new_batch_stats)``: ``y`` of x's shape and dtype; in eval mode ``batch_stats`` unchanged.
    """
    layer = "batch_renorm"
    training = check_training(training, layer)
    x = check_input(x, layer, min_ndim=2, what="rank >= 2: (N, C, ...) with the channel on `axis`")
    feats, fshape, mask = feature_layout(x, axis, mask, layer)
    check_channel_state(params, batch_stats, fshape, layer, "batch_norm_init")
    _needs_running(batch_stats, fshape[0] if len(fshape) == 1 else fshape, layer)
    eps = check_eps(eps, layer)
    momentum = check_momentum(momentum, layer)
    check_cumulative(momentum, batch_stats, training, layer)
    for name, v, low in (("r_max", r_max, 1.0), ("d_max", d_max, 0.0)):
        if isinstance(v, (int, float)) and not v >= low:
            raise ValueError(f"{layer}: `{name}` must be >= {low}, got {v!r}.")
    scheduled = _check_schedule(warmup_steps, relax_steps, batch_stats, layer)
    bshape = broadcast_shape(x.shape, feats)
    dtype = stats_dtype(x.dtype)
    mu, run_var = running_arrays(batch_stats, dtype, bshape)
    scale = params["scale"].astype(dtype).reshape(bshape) if "scale" in params else jnp.ones(bshape, dtype)
    bias = params["bias"].astype(dtype).reshape(bshape) if "bias" in params else jnp.zeros(bshape, dtype)
    if not training:
        return normalize(x, mu, run_var, eps, scale, bias), batch_stats
    if scheduled:
        r_max, d_max = renorm_bounds(batch_stats["count"], r_max, d_max, warmup_steps, relax_steps)
    reduction_axes = tuple(i for i in range(x.ndim) if i not in feats)
    mean, var, count = moments(x, reduction_axes, mask=mask, axis_name=axis_name, axis_index_groups=axis_index_groups)
    var_b = unbiased_variance(var, count) if batch_var_unbiased else var
    sigma_b, sigma = jnp.sqrt(var_b + eps), jnp.sqrt(run_var + eps)
    r_max = jnp.asarray(r_max, dtype)
    r = jax.lax.stop_gradient(jnp.clip(sigma_b / sigma, 1 / r_max, r_max))
    d = jax.lax.stop_gradient(jnp.clip((mean - mu) / sigma, -d_max, d_max))
    y = normalize(x, mean, var_b, eps, scale * r, bias + scale * d)
    new = update_running(batch_stats, mean.reshape(fshape), var.reshape(fshape),
                         jnp.broadcast_to(count, mean.shape).reshape(fshape), momentum, running_var_unbiased,
                         empty=empty_batch(x, axis_name))
    return y, new


def renorm_bounds(step: Array, r_max: Any, d_max: Any, warmup_steps: int, relax_steps: int) -> tuple[Array, Array]:
    """The paper's schedule: ``(1, 0)`` for ``step < warmup_steps``, then linear to ``(r_max, d_max)`` over
    ``relax_steps`` steps (at once when it is 0)."""
    step = jnp.asarray(step, jnp.float32)
    if relax_steps:
        progress = jnp.clip((step - warmup_steps) / relax_steps, 0.0, 1.0)
    else:
        progress = (step >= warmup_steps).astype(jnp.float32)
    return 1.0 + progress * (jnp.asarray(r_max, jnp.float32) - 1.0), progress * jnp.asarray(d_max, jnp.float32)


def _check_schedule(warmup_steps: Any, relax_steps: Any, batch_stats: Any, layer: str) -> bool:
    """Whether the bounds follow the schedule (either steps > 0), after checking both."""
    for name, v in (("warmup_steps", warmup_steps), ("relax_steps", relax_steps)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{layer}: `{name}` must be an int >= 0, got {v!r}.")
    if (warmup_steps or relax_steps) and "count" not in batch_stats:
        raise ValueError(
            f"{layer}: the warm-up and relaxation schedule reads the step from `batch_stats['count']`, but this state "
            "has none (saved by flax.linen.BatchNorm?). Add it, e.g. batch_stats = {**batch_stats, 'count': "
            "jnp.zeros((), jnp.int32)}."
        )
    return bool(warmup_steps or relax_steps)


def frozen_batch_norm(
    params: dict[str, Array], batch_stats: dict[str, Array], x: Array, *, axis: int = 1, eps: float = 1e-5
) -> Array:
    """torchvision's ``FrozenBatchNorm2d``: ``y = x * scale + shift`` with ``scale = w * rsqrt(running_var + eps)``
    and ``shift = b - running_mean * scale``; no updates, no gradients to the statistics or the affine.

    Args:
      params: ``{"scale", "bias"}`` (torchvision's ``weight`` and ``bias``).
      batch_stats: ``{"mean", "var"}`` (a ``count`` is ignored).
      x: ``(N, C, ...)``, the channel on ``axis``.
      axis: the channel axis.
      eps: added to the running variance, where torchvision adds it.

    Returns:
      y, with x's shape and dtype.
    """
    layer = "frozen_batch_norm"
    x, ax, c, bshape = _prepare(params, batch_stats, x, axis, layer)
    eps = check_eps(eps, layer)
    params, batch_stats = jax.lax.stop_gradient((params, batch_stats))
    dtype = stats_dtype(x.dtype)
    w = params["scale"].astype(dtype) if "scale" in params else jnp.ones((c,), dtype)
    b = params["bias"].astype(dtype) if "bias" in params else jnp.zeros((c,), dtype)
    scale = w * jax.lax.rsqrt(batch_stats["var"].astype(dtype) + eps)
    shift = b - batch_stats["mean"].astype(dtype) * scale
    return (x.astype(dtype) * scale.reshape(bshape) + shift.reshape(bshape)).astype(x.dtype)


def fold(
    kernel: Array,
    bias: Array | None,
    params: dict[str, Array],
    batch_stats: dict[str, Array],
    *,
    eps: float = 1e-5,
    out_axis: int = -1,
) -> tuple[Array, Array]:
    """Fold an eval-mode BatchNorm into the layer before it: ``new_kernel = kernel * s`` and
    ``new_bias = (bias - mean) * s + beta``, with ``s = gamma * rsqrt(var + eps)``.

    Then ``BN_eval(layer(x)) == folded_layer(x)``.

    Args:
      kernel: a Flax ``Dense``/``Conv`` kernel (or a PyTorch ``(O, I, ...)`` weight with ``out_axis=0``).
      bias: the layer's bias, or None (``use_bias=False``).
      params: the BatchNorm's ``{"scale", "bias"}`` (gamma, beta), part of it, or ``{}``.
      batch_stats: the BatchNorm's ``{"mean", "var"}``.
      eps: the BatchNorm's eps.
      out_axis: the kernel's output-feature axis (Flax: the last).

    Returns:
      ``(new_kernel, new_bias)``.
    """
    layer = "fold"
    ax = canonical_axis(out_axis, kernel.ndim, layer, name="out_axis")
    c = kernel.shape[ax]
    check_channel_state(params, batch_stats, c, layer, "batch_norm_init")
    if not batch_stats:
        raise ValueError(f"{layer}: needs the BatchNorm's running statistics (batch_stats), got {{}}.")
    eps = check_eps(eps, layer)
    dtype = stats_dtype(kernel.dtype)
    gamma = params["scale"].astype(dtype) if "scale" in params else jnp.ones((c,), dtype)
    beta = params["bias"].astype(dtype) if "bias" in params else jnp.zeros((c,), dtype)
    s = gamma * jax.lax.rsqrt(batch_stats["var"].astype(dtype) + eps)
    b = jnp.zeros((c,), dtype) if bias is None else bias.astype(dtype)
    new_kernel = kernel.astype(dtype) * s.reshape(channel_shape(kernel.ndim, ax, c))
    new_bias = (b - batch_stats["mean"].astype(dtype)) * s + beta
    return new_kernel.astype(kernel.dtype), new_bias.astype(kernel.dtype)


def fold_variables(
    variables: dict[str, Any], pairs: dict[str, str], *, eps: float = 1e-5
) -> dict[str, Any]:
    """Fold whole models: every BatchNorm in ``pairs`` into the layer before it (``fold`` on each pair).

    Args:
      variables: the model's ``{"params", "batch_stats"}``.
      pairs: each layer's Flax path mapped to its BatchNorm's path ("/"-separated).
      eps: the BatchNorms' eps.

    Returns:
      ``params`` for the same model without those BatchNorms (the layers keep their names, given
      ``use_bias=True``), e.g. LeNet(norm="jaxnorm") -> LeNet(norm="none").
    """
    params, stats = variables["params"], variables["batch_stats"]
    out: dict[str, Any] = {}
    bn_paths = set(pairs.values())
    for path, leaf in walk(params):
        if path.rsplit("/", 1)[0] not in bn_paths:
            set_path(out, path, leaf)
    for layer_path, bn_path in pairs.items():
        lyr = get_path(params, layer_path)
        if lyr is None or get_path(stats, bn_path) is None:
            raise KeyError(f"fold_variables: no layer at {layer_path!r} or no BatchNorm statistics at {bn_path!r}.")
        kernel, bias = fold(lyr["kernel"], lyr.get("bias"), get_path(params, bn_path) or {},
                            get_path(stats, bn_path), eps=eps)
        set_path(out, f"{layer_path}/kernel", kernel)
        set_path(out, f"{layer_path}/bias", bias)
    return out
