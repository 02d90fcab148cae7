"""Textbook normalization formulas in plain ``jax.numpy``: no jaxnorm code and no custom derivative rules.

The transformation tests differentiate these with JAX's own autodiff and compare with jaxnorm's closed-form
derivative rule. Every function has the functional API's shape, ``(params, batch_stats, x) -> (y, new_stats)``,
with PyTorch's semantics written out the long way (two-pass statistics, the unbiased running variance).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def _channel(v, ndim, axis):
    """A per-channel vector shaped to broadcast along ``axis`` at rank ``ndim``."""
    return v.reshape(tuple(-1 if i == axis % ndim else 1 for i in range(ndim)))


def _affine(y, params, axis):
    if "scale" in params:
        y = y * _channel(params["scale"], y.ndim, axis)
    if "bias" in params:
        y = y + _channel(params["bias"], y.ndim, axis)
    return y


def abs2(v):
    """|v|^2: the square of a real v, re^2 + im^2 of a complex one (a real variance, as Flax)."""
    return jnp.square(v.real) + jnp.square(v.imag) if jnp.iscomplexobj(v) else jnp.square(v)


def moments(x, axes, mask=None):
    """Two-pass mean and biased variance E|x - mean|^2 over ``axes`` (kept), and the element count; masked
    positions excluded."""
    if mask is None:
        n = math.prod(x.shape[a] for a in axes)
        m = jnp.mean(x, axes, keepdims=True)
        return m, jnp.mean(abs2(x - m), axes, keepdims=True), n
    w = jnp.broadcast_to(mask, x.shape).astype(x.real.dtype)
    n = jnp.sum(w, axes, keepdims=True)
    m = jnp.sum(w * x, axes, keepdims=True) / n
    return m, jnp.sum(w * abs2(x - m), axes, keepdims=True) / n, n


def running_update(stats, mean, var, n, momentum, count_batches=True):
    """PyTorch: ``new = (1 - f) * old + f * batch`` with the unbiased batch variance; f = momentum or 1/count."""
    if not stats:
        return stats
    f = 1.0 / (stats["count"] + 1) if momentum is None else momentum
    return {
        "mean": (1 - f) * stats["mean"] + f * mean,
        "var": (1 - f) * stats["var"] + f * var * (n / (n - 1)),
        "count": stats["count"] + 1 if count_batches else stats["count"],
    }


def batch_norm(params, stats, x, *, training, axis=1, momentum=0.1, eps=1e-5, mask=None):
    axes = tuple(i for i in range(x.ndim) if i != axis % x.ndim)
    if training or not stats:
        m, v, n = moments(x, axes, mask)
    else:
        m, v = (_channel(stats[k], x.ndim, axis) for k in ("mean", "var"))
    y = _affine((x - m) / jnp.sqrt(v + eps), params, axis)
    if training and stats:
        n = jnp.reshape(n, -1)[0] if mask is not None else n
        stats = running_update(stats, m.reshape(-1), v.reshape(-1), n, momentum)
    return y, stats


def ghost_batch_norm(params, stats, x, *, virtual_batch_size, axis=1, momentum=0.1, eps=1e-5):
    """Training with sub-batches of ``virtual_batch_size`` along axis 0, each normalized by its own statistics."""
    axes = tuple(i for i in range(x.ndim) if i != axis % x.ndim)
    subs = [x[i : i + virtual_batch_size] for i in range(0, x.shape[0], virtual_batch_size)]
    per = [moments(sub, axes) for sub in subs]
    y = jnp.concatenate([(sub - m) / jnp.sqrt(v + eps) for sub, (m, v, _) in zip(subs, per, strict=True)], 0)
    m = sum(p[0].reshape(-1) for p in per) / len(per)
    v = sum(p[1].reshape(-1) for p in per) / len(per)
    return _affine(y, params, axis), running_update(stats, m, v, per[0][2], momentum)


def instance_norm(params, stats, x, *, training, axis=1, momentum=0.1, eps=1e-5, mask=None):
    spatial = tuple(i for i in range(1, x.ndim) if i != axis % x.ndim)
    if training or not stats:
        m, v, n = moments(x, spatial, mask)
    else:
        m, v = (_channel(stats[k], x.ndim, axis) for k in ("mean", "var"))
    y = _affine((x - m) / jnp.sqrt(v + eps), params, axis)
    if training and stats and momentum is not None:
        per_channel = tuple(i for i in range(x.ndim) if i != axis % x.ndim)
        vu = v * (n / (n - 1))  # each instance's own unbiased variance, averaged over the batch
        f = momentum
        stats = {"mean": (1 - f) * stats["mean"] + f * jnp.mean(m, per_channel),
                 "var": (1 - f) * stats["var"] + f * jnp.mean(vu, per_channel), "count": stats["count"]}
    return y, stats


def _trailing_affine(y, params):
    """Elementwise scale and bias over the trailing dims they cover."""
    for k, op in (("scale", jnp.multiply), ("bias", jnp.add)):
        if k in params:
            y = op(y, params[k].reshape((1,) * (y.ndim - params[k].ndim) + params[k].shape))
    return y


def layer_norm(params, x, *, normalized_shape=None, eps=1e-5, channel_axis=None, mask=None):
    """Over the trailing ``normalized_shape`` dims, or over one ``channel_axis`` with per-channel params."""
    if channel_axis is not None:
        m, v, _ = moments(x, (channel_axis,), mask)
        return _affine((x - m) / jnp.sqrt(v + eps), params, channel_axis)
    axes = tuple(range(x.ndim - len(normalized_shape), x.ndim))
    m, v, _ = moments(x, axes, mask)
    return _trailing_affine((x - m) / jnp.sqrt(v + eps), params)


def rms_norm(params, x, *, normalized_shape, eps, mask=None):
    axes = tuple(range(x.ndim - len(normalized_shape), x.ndim))
    w = jnp.ones(x.shape, x.real.dtype) if mask is None else jnp.broadcast_to(mask, x.shape).astype(x.real.dtype)
    ms = jnp.sum(w * abs2(x), axes, keepdims=True) / jnp.sum(w, axes, keepdims=True)
    return _trailing_affine(x / jnp.sqrt(ms + eps), params)


def group_norm(params, x, *, num_groups, axis=1, eps=1e-5, mask=None):
    xc = jnp.moveaxis(x, axis, 1)
    shape = xc.shape
    xg = xc.reshape(shape[0], num_groups, -1)
    mg = None if mask is None else jnp.moveaxis(jnp.broadcast_to(mask, x.shape), axis, 1).reshape(xg.shape)
    m, v, _ = moments(xg, (2,), mg)
    y = jnp.moveaxis(((xg - m) / jnp.sqrt(v + eps)).reshape(shape), 1, axis)
    return _affine(y, params, axis)


def batch_renorm(params, stats, x, *, training, r_max, d_max, axis=1, momentum=0.01, eps=1e-5):
    """Ioffe (2017): r and d are treated as constants by the gradient."""
    if not training:
        return batch_norm(params, stats, x, training=False, axis=axis, eps=eps)
    axes = tuple(i for i in range(x.ndim) if i != axis % x.ndim)
    m, v, n = moments(x, axes)
    mu, run_var = (_channel(stats[k], x.ndim, axis) for k in ("mean", "var"))
    sigma_b, sigma = jnp.sqrt(v + eps), jnp.sqrt(run_var + eps)
    r = jax.lax.stop_gradient(jnp.clip(sigma_b / sigma, 1 / r_max, r_max))
    d = jax.lax.stop_gradient(jnp.clip((m - mu) / sigma, -d_max, d_max))
    y = _affine((x - m) / sigma_b * r + d, params, axis)
    return y, running_update(stats, m.reshape(-1), v.reshape(-1), n, momentum)


def frozen_batch_norm(params, stats, x, *, axis=1, eps=1e-5):
    params, stats = jax.lax.stop_gradient((params, stats))
    y = (x - _channel(stats["mean"], x.ndim, axis)) / jnp.sqrt(_channel(stats["var"], x.ndim, axis) + eps)
    return _affine(y, params, axis)
