"""Flax linen wrappers: declare variables, call the functional core. Channels-last (``axis=-1``) by default.

Variables: ``params`` = {"scale", "bias"}, ``batch_stats`` = {"mean", "var", "count"} (see jaxnorm.batch_norm_init).
Momentum: give ``torch_momentum`` (weight of the new batch, default 0.1) or ``flax_momentum`` (decay of the old
average, e.g. 0.99); there is deliberately no plain ``momentum`` field.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

import jaxnorm
from jaxnorm._conventions import resolve_momentum, resolve_training

Array = jax.Array


def _affine(module: nn.Module, shape: tuple[int, ...], with_bias: bool = True) -> dict[str, Array]:
    params = {"scale": module.param("scale", nn.initializers.ones, shape, module.param_dtype)}
    if with_bias:
        params["bias"] = module.param("bias", nn.initializers.zeros, shape, module.param_dtype)
    return params


def _running(module: nn.Module, c: int) -> dict[str, Any]:
    guard = getattr(module, "nonfinite_guard", False)
    init = jaxnorm.batch_norm_init(c, affine=False, dtype=module.param_dtype, nonfinite_guard=guard)[1]
    return {k: module.variable("batch_stats", k, lambda v=v: v) for k, v in init.items()}


class _ChannelNorm(nn.Module):
    """Fields and declaration logic shared by BatchNorm / InstanceNorm."""

    use_running_average: bool | None = None
    axis: int = -1
    torch_momentum: float | None = 0.1
    flax_momentum: float | None = None
    epsilon: float = 1e-5
    param_dtype: Any = jnp.float32

    def _apply(self, fn, x, use_running_average, *, affine, track, momentum, **kw):
        layer = type(self).__name__
        training = resolve_training(self.use_running_average, use_running_average, layer)
        c = x.shape[self.axis]
        params = _affine(self, (c,)) if affine else {}
        stats_vars = _running(self, c) if track else {}
        stats = {k: v.value for k, v in stats_vars.items()}
        if training and stats_vars and not self.is_initializing() and not self.is_mutable_collection("batch_stats"):
            raise ValueError(
                f"{layer}: training mode updates `batch_stats`, but that collection is not mutable. Call "
                "model.apply(variables, x, mutable=['batch_stats']) and keep the returned batch_stats, or pass "
                "use_running_average=True for evaluation."
            )
        y, new = fn(params, stats, x, training=training, axis=self.axis, momentum=momentum, eps=self.epsilon, **kw)
        if training and stats_vars and not self.is_initializing():
            for k, v in stats_vars.items():
                v.value = new[k]
        return y


class BatchNorm(_ChannelNorm):
    """torch.nn.BatchNorm{1,2,3}d / flax.linen.BatchNorm, channels-last by default."""

    affine: bool = True
    track_running_stats: bool = True
    axis_name: str | None = None
    axis_index_groups: Any = None
    nonfinite_guard: bool = False
    virtual_batch_size: int | None = None

    @nn.compact
    def __call__(self, x: Array, use_running_average: bool | None = None, *, mask: Array | None = None) -> Array:
        momentum = resolve_momentum(self.torch_momentum, self.flax_momentum, "BatchNorm")
        return self._apply(jaxnorm.batch_norm, x, use_running_average, affine=self.affine,
                           track=self.track_running_stats, momentum=momentum, axis_name=self.axis_name,
                           axis_index_groups=self.axis_index_groups, mask=mask,
                           running_var_unbiased=self.flax_momentum is None,
                           virtual_batch_size=self.virtual_batch_size)


class InstanceNorm(_ChannelNorm):
    """torch.nn.InstanceNorm{1,2,3}d (defaults affine=False, track_running_stats=False), channels-last."""

    affine: bool = False
    track_running_stats: bool = False

    @nn.compact
    def __call__(self, x: Array, use_running_average: bool | None = None) -> Array:
        if not self.track_running_stats and use_running_average is None and self.use_running_average is None:
            use_running_average = False  # without running stats both modes are the same computation
        momentum = resolve_momentum(self.torch_momentum, self.flax_momentum, "InstanceNorm")
        return self._apply(jaxnorm.instance_norm, x, use_running_average, affine=self.affine,
                           track=self.track_running_stats, momentum=momentum)


class FrozenBatchNorm(nn.Module):
    """torchvision's FrozenBatchNorm2d: fixed statistics and affine (kept in "params"/"batch_stats" so pretrained
    weights load unchanged), never updated, no gradients to them. For fine-tuning."""

    axis: int = -1
    epsilon: float = 1e-5
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c = x.shape[self.axis]
        params = _affine(self, (c,))
        stats = {k: v.value for k, v in _running(self, c).items()}
        return jaxnorm.frozen_batch_norm(params, stats, x, axis=self.axis, eps=self.epsilon)


class LayerNorm(nn.Module):
    """torch.nn.LayerNorm over the trailing ``normalized_shape`` dims (default: the last dim)."""

    normalized_shape: int | tuple[int, ...] | None = None
    epsilon: float = 1e-5
    elementwise_affine: bool = True
    use_bias: bool = True
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        shape = x.shape[-1:] if self.normalized_shape is None else self.normalized_shape
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        params = _affine(self, shape, self.use_bias) if self.elementwise_affine else {}
        return jaxnorm.layer_norm(params, x, normalized_shape=shape, eps=self.epsilon)


class RMSNorm(nn.Module):
    """torch.nn.RMSNorm over the trailing ``normalized_shape`` dims; ``epsilon=None`` is finfo(dtype).eps."""

    normalized_shape: int | tuple[int, ...] | None = None
    epsilon: float | None = None
    elementwise_affine: bool = True
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        shape = x.shape[-1:] if self.normalized_shape is None else self.normalized_shape
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        params = _affine(self, shape, with_bias=False) if self.elementwise_affine else {}
        return jaxnorm.rms_norm(params, x, normalized_shape=shape, eps=self.epsilon)


class GroupNorm(nn.Module):
    """torch.nn.GroupNorm, channels-last by default."""

    num_groups: int = 32
    axis: int = -1
    epsilon: float = 1e-5
    affine: bool = True
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        params = _affine(self, (x.shape[self.axis],)) if self.affine else {}
        return jaxnorm.group_norm(params, x, num_groups=self.num_groups, axis=self.axis, eps=self.epsilon)


__all__ = ["BatchNorm", "FrozenBatchNorm", "GroupNorm", "InstanceNorm", "LayerNorm", "RMSNorm"]
