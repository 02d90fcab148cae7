"""Flax NNX wrappers: ``nnx.Param`` / ``nnx.BatchStat`` variables, ``.train()`` / ``.eval()``, functional core.

Channels-last (``axis=-1``) by default; momentum via ``torch_momentum`` or ``flax_momentum`` as in jaxnorm.linen.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

import jaxnorm
from jaxnorm._conventions import resolve_momentum, resolve_training

Array = jax.Array


def _set_params(module: nnx.Module, params: dict[str, Array]) -> None:
    for k in ("scale", "bias"):
        setattr(module, k, nnx.Param(params[k]) if k in params else None)


def _params(module: nnx.Module) -> dict[str, Array]:
    return {k: getattr(module, k)[...] for k in ("scale", "bias") if getattr(module, k, None) is not None}


class _ChannelNorm(nnx.Module):
    _fn: Any = None

    def __init__(self, num_features, *, use_running_average, axis, torch_momentum, flax_momentum, epsilon, affine,
                 track_running_stats, param_dtype, init, nonfinite_guard=False):
        params, stats = init(num_features, affine=affine, track_running_stats=track_running_stats, dtype=param_dtype,
                             nonfinite_guard=nonfinite_guard)
        _set_params(self, params)
        self.tracked = bool(stats)
        self._stat_keys = tuple(stats)
        for k in ("mean", "var", "count", "skipped"):
            setattr(self, k, nnx.BatchStat(stats[k]) if k in stats else None)
        self.use_running_average = use_running_average
        self.axis = axis
        self.momentum = resolve_momentum(torch_momentum, flax_momentum, type(self).__name__)
        self.epsilon = epsilon

    def _call(self, x, use_running_average, **kw):
        training = resolve_training(self.use_running_average, use_running_average, type(self).__name__)
        stats = {k: getattr(self, k)[...] for k in self._stat_keys}
        y, new = type(self)._fn(_params(self), stats, x, training=training, axis=self.axis, momentum=self.momentum,
                                eps=self.epsilon, **kw)
        if training and self.tracked:
            for k in self._stat_keys:
                getattr(self, k)[...] = new[k]
        return y


class BatchNorm(_ChannelNorm):
    """torch.nn.BatchNorm{1,2,3}d for NNX."""

    _fn = staticmethod(jaxnorm.batch_norm)

    def __init__(self, num_features: int, *, use_running_average: bool = False, axis: int = -1,
                 torch_momentum: float | None = 0.1, flax_momentum: float | None = None, epsilon: float = 1e-5,
                 affine: bool = True, track_running_stats: bool = True, axis_name: str | None = None,
                 axis_index_groups: Any = None, nonfinite_guard: bool = False, param_dtype: Any = jnp.float32,
                 rngs: nnx.Rngs | None = None):
        super().__init__(num_features, use_running_average=use_running_average, axis=axis,
                         torch_momentum=torch_momentum, flax_momentum=flax_momentum, epsilon=epsilon, affine=affine,
                         track_running_stats=track_running_stats, param_dtype=param_dtype,
                         init=jaxnorm.batch_norm_init, nonfinite_guard=nonfinite_guard)
        self.axis_name = axis_name
        self.axis_index_groups = axis_index_groups
        self.flax_like = flax_momentum is not None

    def __call__(self, x: Array, use_running_average: bool | None = None, *, mask: Array | None = None) -> Array:
        return self._call(x, use_running_average, axis_name=self.axis_name,
                          axis_index_groups=self.axis_index_groups, mask=mask,
                          running_var_unbiased=not self.flax_like)


class InstanceNorm(_ChannelNorm):
    """torch.nn.InstanceNorm{1,2,3}d for NNX."""

    _fn = staticmethod(jaxnorm.instance_norm)

    def __init__(self, num_features: int, *, use_running_average: bool = False, axis: int = -1,
                 torch_momentum: float | None = 0.1, flax_momentum: float | None = None, epsilon: float = 1e-5,
                 affine: bool = False, track_running_stats: bool = False, param_dtype: Any = jnp.float32,
                 rngs: nnx.Rngs | None = None):
        super().__init__(num_features, use_running_average=use_running_average, axis=axis,
                         torch_momentum=torch_momentum, flax_momentum=flax_momentum, epsilon=epsilon, affine=affine,
                         track_running_stats=track_running_stats, param_dtype=param_dtype,
                         init=jaxnorm.instance_norm_init)

    def __call__(self, x: Array, use_running_average: bool | None = None) -> Array:
        return self._call(x, use_running_average)


class LayerNorm(nnx.Module):
    """torch.nn.LayerNorm for NNX."""

    def __init__(self, normalized_shape: int | tuple[int, ...], *, epsilon: float = 1e-5,
                 elementwise_affine: bool = True, use_bias: bool = True, param_dtype: Any = jnp.float32,
                 rngs: nnx.Rngs | None = None):
        self.normalized_shape = normalized_shape
        self.epsilon = epsilon
        _set_params(self, jaxnorm.layer_norm_init(normalized_shape, elementwise_affine=elementwise_affine,
                                                  bias=use_bias, dtype=param_dtype))

    def __call__(self, x: Array) -> Array:
        return jaxnorm.layer_norm(_params(self), x, normalized_shape=self.normalized_shape, eps=self.epsilon)


class RMSNorm(nnx.Module):
    """torch.nn.RMSNorm for NNX."""

    def __init__(self, normalized_shape: int | tuple[int, ...], *, epsilon: float | None = None,
                 elementwise_affine: bool = True, param_dtype: Any = jnp.float32, rngs: nnx.Rngs | None = None):
        self.normalized_shape = normalized_shape
        self.epsilon = epsilon
        _set_params(self, jaxnorm.rms_norm_init(normalized_shape, elementwise_affine=elementwise_affine,
                                                dtype=param_dtype))

    def __call__(self, x: Array) -> Array:
        return jaxnorm.rms_norm(_params(self), x, normalized_shape=self.normalized_shape, eps=self.epsilon)


class GroupNorm(nnx.Module):
    """torch.nn.GroupNorm for NNX, channels-last by default."""

    def __init__(self, num_groups: int, num_channels: int, *, axis: int = -1, epsilon: float = 1e-5,
                 affine: bool = True, param_dtype: Any = jnp.float32, rngs: nnx.Rngs | None = None):
        self.num_groups, self.axis, self.epsilon = num_groups, axis, epsilon
        _set_params(self, jaxnorm.group_norm_init(num_groups, num_channels, affine=affine, dtype=param_dtype))

    def __call__(self, x: Array) -> Array:
        return jaxnorm.group_norm(_params(self), x, num_groups=self.num_groups, axis=self.axis, eps=self.epsilon)


__all__ = ["BatchNorm", "GroupNorm", "InstanceNorm", "LayerNorm", "RMSNorm"]
