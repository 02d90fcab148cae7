"""Batch-norm variants on the shared core: batch renormalization, frozen batch norm, folding BN into a layer.

State is batch norm's (``jaxnorm.batch_norm_init``).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxnorm._channels import check_channel_state
from jaxnorm._checks import canonical_axis, channel_shape, check_eps, check_input, check_momentum, check_training
from jaxnorm._moments import moments
from jaxnorm._normalize import normalize
from jaxnorm._running import empty_batch, running_arrays, update_running
from jaxnorm._statistics import stats_dtype
from jaxnorm._tree import get_path, set_path, walk

Array = jax.Array


def _prepare(params, batch_stats, x, axis, layer, *, need_stats=True):
    x = check_input(x, layer, min_ndim=2, what="rank >= 2: (N, C, ...) with the channel on `axis`")
    ax = canonical_axis(axis, x.ndim, layer)
    c = x.shape[ax]
    check_channel_state(params, batch_stats, c, layer, "batch_norm_init")
    if need_stats and not batch_stats:
        raise ValueError(f"{layer}: needs running statistics; create them with jaxnorm.batch_norm_init({c}).")
    return x, ax, c, channel_shape(x.ndim, ax, c)


def batch_renorm(
    params: dict[str, Array],
    batch_stats: dict[str, Array],
    x: Array,
    *,
    training: bool,
    r_max: float | Array = 3.0,
    d_max: float | Array = 5.0,
    axis: int = 1,
    momentum: float | None = 0.01,
    eps: float = 1e-5,
) -> tuple[Array, dict[str, Array]]:
    """Batch Renormalization (Ioffe, 2017). Returns ``(y, new_batch_stats)``.

    Training: ``x_hat = (x - mu_B) / sigma_B * r + d`` with ``sigma = sqrt(var + eps)`` of the running statistics,
    ``r = stop_gradient(clip(sigma_B / sigma, 1 / r_max, r_max))`` and
    ``d = stop_gradient(clip((mu_B - mu) / sigma, -d_max, d_max))``; then scale/shift, and the running statistics
    are updated exactly as ``batch_norm`` does. ``r_max``/``d_max`` may be traced values, so a schedule (the paper
    ramps them up from 1 and 0) works inside ``jit``. With ``r_max=1, d_max=0`` this is plain batch norm. Eval
    mode normalizes with the running statistics.
    """
    layer = "batch_renorm"
    training = check_training(training, layer)
    x, ax, c, bshape = _prepare(params, batch_stats, x, axis, layer)
    eps = check_eps(eps, layer)
    momentum = check_momentum(momentum, layer)
    for name, v, low in (("r_max", r_max, 1.0), ("d_max", d_max, 0.0)):
        if isinstance(v, (int, float)) and not v >= low:
            raise ValueError(f"{layer}: `{name}` must be >= {low}, got {v!r}.")
    dtype = stats_dtype(x.dtype)
    mu, run_var = running_arrays(batch_stats, dtype, bshape)
    scale = params["scale"].astype(dtype).reshape(bshape) if "scale" in params else jnp.ones(bshape, dtype)
    bias = params["bias"].astype(dtype).reshape(bshape) if "bias" in params else jnp.zeros(bshape, dtype)
    if not training:
        return normalize(x, mu, run_var, eps, scale, bias), batch_stats
    reduction_axes = tuple(i for i in range(x.ndim) if i != ax)
    mean, var, count = moments(x, reduction_axes)
    sigma_b, sigma = jnp.sqrt(var + eps), jnp.sqrt(run_var + eps)
    r_max = jnp.asarray(r_max, dtype)
    r = jax.lax.stop_gradient(jnp.clip(sigma_b / sigma, 1 / r_max, r_max))
    d = jax.lax.stop_gradient(jnp.clip((mean - mu) / sigma, -d_max, d_max))
    y = normalize(x, mean, var, eps, scale * r, bias + scale * d)
    new = update_running(batch_stats, mean.reshape(c), var.reshape(c), count.reshape(-1)[0], momentum,
                         empty=empty_batch(x))
    return y, new


def frozen_batch_norm(
    params: dict[str, Array], batch_stats: dict[str, Array], x: Array, *, axis: int = 1, eps: float = 1e-5
) -> Array:
    """torchvision's ``FrozenBatchNorm2d``: fixed statistics and affine, no updates, no gradients to them.

    Same formula and eps placement as torchvision: ``scale = w * rsqrt(running_var + eps)``,
    ``shift = b - running_mean * scale``, ``y = x * scale + shift``.
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
    """Fold an eval-mode BatchNorm into the layer before it: returns ``(new_kernel, new_bias)``.

    ``kernel`` is a Flax ``Dense``/``Conv`` kernel whose output features lie on ``out_axis`` (Flax: the last
    axis; a PyTorch ``(O, I, ...)`` weight: ``out_axis=0``); ``bias`` may be None (``use_bias=False``). Then
    ``BN_eval(layer(x)) == folded_layer(x)`` with ``new_kernel = kernel * s``, ``new_bias = (bias - mean) * s + beta``
    and ``s = gamma / sqrt(var + eps)``.
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
    """Fold whole models: ``pairs`` maps each layer's Flax path to its BatchNorm's path ("/"-separated).

    Returns ``params`` for the same model without those BatchNorms (the layers keep their names, given
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
