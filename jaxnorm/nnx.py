"""Flax NNX wrappers: ``nnx.Param`` / ``nnx.BatchStat`` variables, ``.train()`` / ``.eval()``, functional core.

Channels-last (``axis=-1``) by default; momentum via ``torch_momentum`` or ``flax_momentum`` as in jaxnorm.linen.
Every constructor and call keyword of the flax.nnx class of the same name is accepted with Flax's meaning and
Flax's positional order (``GroupNorm(num_features, num_groups=32, group_size=None)``); PyTorch's names are
keywords (``num_channels``, ``normalized_shape``, ``affine``, ``elementwise_affine``). ``use_fast_variance`` and
``promote_dtype`` are accepted and have no effect (the statistics are exact, in at least float32, and the output
has ``dtype``, or x's dtype when it is None).
"""

from __future__ import annotations

import contextlib
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

import jaxnorm
from jaxnorm._channels import check_num_features
from jaxnorm._conventions import (
    compute_dtype,
    groups,
    instance_axes,
    output_dtype,
    resolve_affine,
    resolve_momentum,
    resolve_training,
    row_axes,
    running_state,
)
from jaxnorm._conventions import feature_axes as canonical_feature_axes
from jaxnorm._group_norm import resolve_groups

Array = jax.Array
Axes = int | Sequence[int]
_zeros, _ones = nnx.initializers.zeros_init(), nnx.initializers.ones_init()
_NO_METADATA: Mapping[str, Any] = {}
_KERNEL = nnx.PathContains("kernel")
_OBSERVERS: list[Any] = []  # callbacks given each BatchNorm's input: observe_inputs


@contextlib.contextmanager
def observe_inputs(callback: Any):
    """Within the block, every ``BatchNorm`` call first hands ``callback(module, x, mask)`` its input (how
    ``jaxnorm.precise_bn`` reads the layers' inputs without changing the model)."""
    _OBSERVERS.append(callback)
    try:
        yield
    finally:
        _OBSERVERS.remove(callback)


class _Flax(nnx.Module):
    def _declare(self, shape, use_scale, use_bias, *, param_dtype, scale_init, bias_init, rngs, scale_metadata,
                 bias_metadata, dtype, axis_name, axis_index_groups):
        for name, on, init, meta in (("scale", use_scale, scale_init, scale_metadata),
                                     ("bias", use_bias, bias_init, bias_metadata)):
            if not on:
                setattr(self, name, None)
                continue
            if rngs is None and init not in (_zeros, _ones):
                raise ValueError(
                    f"{type(self).__name__}: `{name}_init` draws from a key; pass `rngs=nnx.Rngs(...)`.")
            key = rngs.params() if rngs is not None else jax.random.key(0)
            setattr(self, name, nnx.Param(init(key, shape, param_dtype), **meta))
        self.dtype, self.param_dtype = dtype, param_dtype
        self.axis_name, self.axis_index_groups = axis_name, axis_index_groups

    def _params(self) -> dict[str, Array]:
        return {k: getattr(self, k)[...] for k in ("scale", "bias") if getattr(self, k, None) is not None}

    def _named_axis(self) -> dict[str, Any]:
        return {"axis_name": self.axis_name, "axis_index_groups": self.axis_index_groups}


class _ChannelNorm(_Flax):
    _fn: Any = None

    def __init__(self, num_features, *, use_running_average, axis, torch_momentum, flax_momentum, epsilon, affine,
                 use_scale, use_bias, default_affine, track_running_stats, dtype, param_dtype, scale_init,
                 bias_init, axis_name, axis_index_groups, force_float32_reductions, rngs, scale_metadata,
                 bias_metadata, nonfinite_guard=False):
        layer = type(self).__name__
        shape = (num_features,) if isinstance(num_features, int) else tuple(num_features)
        use_scale, use_bias = resolve_affine(affine, use_scale, use_bias, default_affine, layer)
        self._declare(shape, use_scale, use_bias, param_dtype=param_dtype, scale_init=scale_init,
                      bias_init=bias_init, rngs=rngs, scale_metadata=scale_metadata, bias_metadata=bias_metadata,
                      dtype=dtype, axis_name=axis_name, axis_index_groups=axis_index_groups)
        momentum = resolve_momentum(torch_momentum, flax_momentum, layer)
        stats = {} if not track_running_stats else running_state(
            shape, param_dtype=param_dtype, force_float32_reductions=force_float32_reductions,
            count=momentum.keeps_count, nonfinite_guard=nonfinite_guard)
        self.tracked = bool(stats)
        self._stat_keys = tuple(stats)
        for k in ("mean", "var", "count", "skipped"):
            setattr(self, k, nnx.BatchStat(stats[k]) if k in stats else None)
        self.num_features = num_features
        self.use_running_average = use_running_average
        self.axis = axis
        self.momentum, self.running_var_unbiased = momentum.momentum, momentum.unbiased
        self.epsilon = epsilon

    def _call(self, x, use_running_average, **kw):
        training = resolve_training(self.use_running_average, use_running_average, type(self).__name__)
        stats = {k: getattr(self, k)[...] for k in self._stat_keys}
        y, new = type(self)._fn(self._params(), stats, compute_dtype(x, self.dtype), training=training,
                                axis=self.axis, momentum=self.momentum, eps=self.epsilon, **self._named_axis(), **kw)
        if training and self.tracked:
            for k in self._stat_keys:
                getattr(self, k)[...] = new[k]
        return output_dtype(y, self.dtype)


class BatchNorm(_ChannelNorm):
    """torch.nn.BatchNorm{1,2,3}d / flax.nnx.BatchNorm; ``affine`` (PyTorch) or ``use_scale``/``use_bias``."""

    _fn = staticmethod(jaxnorm.batch_norm)

    def __init__(self, num_features: int, *, use_running_average: bool | None = False, axis: Axes = -1,
                 torch_momentum: float | None = 0.1, flax_momentum: float | None = None, epsilon: float = 1e-5,
                 dtype: Any = None, param_dtype: Any = jnp.float32, affine: bool | None = None,
                 use_bias: bool | None = None, use_scale: bool | None = None, bias_init: Any = _zeros,
                 scale_init: Any = _ones, track_running_stats: bool = True, axis_name: Hashable | None = None,
                 axis_index_groups: Any = None, use_fast_variance: bool = True, force_float32_reductions: bool = True,
                 promote_dtype: Any = None, nonfinite_guard: bool = False, rngs: nnx.Rngs | None = None,
                 bias_metadata: Mapping[str, Any] = _NO_METADATA, scale_metadata: Mapping[str, Any] = _NO_METADATA):
        super().__init__(num_features, use_running_average=use_running_average, axis=axis,
                         torch_momentum=torch_momentum, flax_momentum=flax_momentum, epsilon=epsilon, affine=affine,
                         use_scale=use_scale, use_bias=use_bias, default_affine=True,
                         track_running_stats=track_running_stats, dtype=dtype, param_dtype=param_dtype,
                         scale_init=scale_init, bias_init=bias_init, axis_name=axis_name,
                         axis_index_groups=axis_index_groups, force_float32_reductions=force_float32_reductions,
                         rngs=rngs, scale_metadata=scale_metadata, bias_metadata=bias_metadata,
                         nonfinite_guard=nonfinite_guard)

    def __call__(self, x: Array, use_running_average: bool | None = None, *, mask: Array | None = None) -> Array:
        for observe in _OBSERVERS:
            observe(self, x, mask)
        return self._call(x, use_running_average, mask=mask, running_var_unbiased=self.running_var_unbiased)


class InstanceNorm(_ChannelNorm):
    """torch.nn.InstanceNorm{1,2,3}d (affine off, no running stats by default) / flax.nnx.InstanceNorm;
    ``feature_axes`` is Flax's name for ``axis``."""

    _fn = staticmethod(jaxnorm.instance_norm)

    def __init__(self, num_features: int, *, use_running_average: bool | None = False, axis: Axes = -1,
                 feature_axes: Axes | None = None, torch_momentum: float | None = 0.1,
                 flax_momentum: float | None = None, epsilon: float = 1e-5, dtype: Any = None,
                 param_dtype: Any = jnp.float32, affine: bool | None = None, use_bias: bool | None = None,
                 use_scale: bool | None = None, bias_init: Any = _zeros, scale_init: Any = _ones,
                 track_running_stats: bool = False, axis_name: Hashable | None = None, axis_index_groups: Any = None,
                 use_fast_variance: bool = True, force_float32_reductions: bool = True, promote_dtype: Any = None,
                 rngs: nnx.Rngs | None = None, bias_metadata: Mapping[str, Any] = _NO_METADATA,
                 scale_metadata: Mapping[str, Any] = _NO_METADATA):
        super().__init__(num_features, use_running_average=use_running_average,
                         axis=instance_axes(axis, feature_axes, "InstanceNorm"), torch_momentum=torch_momentum,
                         flax_momentum=flax_momentum, epsilon=epsilon, affine=affine, use_scale=use_scale,
                         use_bias=use_bias, default_affine=False, track_running_stats=track_running_stats,
                         dtype=dtype, param_dtype=param_dtype, scale_init=scale_init, bias_init=bias_init,
                         axis_name=axis_name, axis_index_groups=axis_index_groups,
                         force_float32_reductions=force_float32_reductions, rngs=rngs,
                         scale_metadata=scale_metadata, bias_metadata=bias_metadata)

    def __call__(self, x: Array, use_running_average: bool | None = None, *, mask: Array | None = None) -> Array:
        return self._call(x, use_running_average, mask=mask)


class _RowNorm(_Flax):
    def __init__(self, num_features, normalized_shape, *, epsilon, elementwise_affine, use_scale, use_bias,
                 with_bias, reduction_axes, feature_axes, dtype, param_dtype, scale_init, bias_init, axis_name,
                 axis_index_groups, rngs, scale_metadata, bias_metadata):
        layer = type(self).__name__
        if num_features is not None and normalized_shape is not None:
            raise ValueError(f"{layer}: got both `num_features`={num_features!r} (Flax) and `normalized_shape`="
                             f"{normalized_shape!r} (PyTorch); give one.")
        shape = num_features if normalized_shape is None else normalized_shape
        if shape is None:
            raise TypeError(f"{layer}: give `num_features` (Flax) or `normalized_shape` (PyTorch).")
        # an int is Flax's num_features (axes: reduction_axes/feature_axes, default -1); a tuple is PyTorch's
        # normalized_shape (the trailing dims)
        self.where = row_axes(None if isinstance(shape, int) else tuple(shape), reduction_axes, feature_axes, layer,
                              default=-1)
        use_scale, use_bias = resolve_affine(elementwise_affine, use_scale, use_bias if with_bias else None, True,
                                             layer, "elementwise_affine")
        self._declare((shape,) if isinstance(shape, int) else tuple(shape), use_scale, use_bias and with_bias,
                      param_dtype=param_dtype, scale_init=scale_init, bias_init=bias_init, rngs=rngs,
                      scale_metadata=scale_metadata, bias_metadata=bias_metadata, dtype=dtype, axis_name=axis_name,
                      axis_index_groups=axis_index_groups)
        self.num_features = shape
        self.epsilon = epsilon

    def _run(self, fn, x, mask):
        y = fn(self._params(), compute_dtype(x, self.dtype), eps=self.epsilon, mask=mask, **self.where,
               **self._named_axis())
        return output_dtype(y, self.dtype)


class LayerNorm(_RowNorm):
    """torch.nn.LayerNorm / flax.nnx.LayerNorm: an int ``num_features`` with Flax's axes (default -1), or a
    tuple (``normalized_shape``) for PyTorch's trailing dims."""

    def __init__(self, num_features: int | tuple[int, ...] | None = None, *,
                 normalized_shape: int | tuple[int, ...] | None = None, epsilon: float = 1e-5, dtype: Any = None,
                 param_dtype: Any = jnp.float32, elementwise_affine: bool | None = None,
                 use_bias: bool | None = None, use_scale: bool | None = None, bias_init: Any = _zeros,
                 scale_init: Any = _ones, reduction_axes: Axes | None = None, feature_axes: Axes | None = None,
                 axis_name: Hashable | None = None, axis_index_groups: Any = None, use_fast_variance: bool = True,
                 force_float32_reductions: bool = True, promote_dtype: Any = None, rngs: nnx.Rngs | None = None,
                 bias_metadata: Mapping[str, Any] = _NO_METADATA, scale_metadata: Mapping[str, Any] = _NO_METADATA):
        super().__init__(num_features, normalized_shape, epsilon=epsilon, elementwise_affine=elementwise_affine,
                         use_scale=use_scale, use_bias=use_bias, with_bias=True, reduction_axes=reduction_axes,
                         feature_axes=feature_axes, dtype=dtype, param_dtype=param_dtype, scale_init=scale_init,
                         bias_init=bias_init, axis_name=axis_name, axis_index_groups=axis_index_groups, rngs=rngs,
                         scale_metadata=scale_metadata, bias_metadata=bias_metadata)

    def __call__(self, x: Array, *, mask: Array | None = None) -> Array:
        return self._run(jaxnorm.layer_norm, x, mask)


class RMSNorm(_RowNorm):
    """torch.nn.RMSNorm / flax.nnx.RMSNorm (``epsilon=None``: finfo(dtype).eps, as PyTorch)."""

    def __init__(self, num_features: int | tuple[int, ...] | None = None, *,
                 normalized_shape: int | tuple[int, ...] | None = None, epsilon: float | None = None,
                 dtype: Any = None, param_dtype: Any = jnp.float32, elementwise_affine: bool | None = None,
                 use_scale: bool | None = None, scale_init: Any = _ones, reduction_axes: Axes | None = None,
                 feature_axes: Axes | None = None, axis_name: Hashable | None = None, axis_index_groups: Any = None,
                 use_fast_variance: bool = True, force_float32_reductions: bool = True, promote_dtype: Any = None,
                 rngs: nnx.Rngs | None = None, scale_metadata: Mapping[str, Any] = _NO_METADATA):
        super().__init__(num_features, normalized_shape, epsilon=epsilon, elementwise_affine=elementwise_affine,
                         use_scale=use_scale, use_bias=None, with_bias=False, reduction_axes=reduction_axes,
                         feature_axes=feature_axes, dtype=dtype, param_dtype=param_dtype, scale_init=scale_init,
                         bias_init=_zeros, axis_name=axis_name, axis_index_groups=axis_index_groups, rngs=rngs,
                         scale_metadata=scale_metadata, bias_metadata=_NO_METADATA)

    def __call__(self, x: Array, *, mask: Array | None = None) -> Array:
        return self._run(jaxnorm.rms_norm, x, mask)


class GroupNorm(_Flax):
    """flax.nnx.GroupNorm / torch.nn.GroupNorm, channels-last: Flax's order ``GroupNorm(num_features,
    num_groups=32, group_size=None)``; PyTorch's ``num_channels`` is a keyword alias of ``num_features``."""

    def __init__(self, num_features: int | None = None, num_groups: int | None = None,
                 group_size: int | None = None, *, num_channels: int | None = None, axis: int = -1,
                 epsilon: float = 1e-5, dtype: Any = None, param_dtype: Any = jnp.float32,
                 affine: bool | None = None, use_bias: bool | None = None, use_scale: bool | None = None,
                 bias_init: Any = _zeros, scale_init: Any = _ones, reduction_axes: Axes | None = None,
                 axis_name: Hashable | None = None, axis_index_groups: Any = None, use_fast_variance: bool = True,
                 force_float32_reductions: bool = True, promote_dtype: Any = None, rngs: nnx.Rngs | None = None,
                 bias_metadata: Mapping[str, Any] = _NO_METADATA, scale_metadata: Mapping[str, Any] = _NO_METADATA):
        if num_features is not None and num_channels is not None:
            raise ValueError(f"GroupNorm: got both `num_features`={num_features!r} (Flax) and `num_channels`="
                             f"{num_channels!r} (PyTorch); they name the same thing, give one.")
        c = num_features if num_channels is None else num_channels
        if c is None:
            raise TypeError("GroupNorm: give the number of channels, `num_features` (or `num_channels`).")
        check_num_features(c, "GroupNorm")
        self.groups = groups(num_groups, group_size)
        resolve_groups(**self.groups, c=c, layer="GroupNorm")  # the functional layer's checks, at construction
        use_scale, use_bias = resolve_affine(affine, use_scale, use_bias, True, "GroupNorm")
        self._declare((c,), use_scale, use_bias, param_dtype=param_dtype, scale_init=scale_init,
                      bias_init=bias_init, rngs=rngs, scale_metadata=scale_metadata, bias_metadata=bias_metadata,
                      dtype=dtype, axis_name=axis_name, axis_index_groups=axis_index_groups)
        self.num_features, self.num_groups, self.group_size = c, self.groups["num_groups"], self.groups["group_size"]
        self.axis, self.epsilon, self.reduction_axes = axis, epsilon, reduction_axes

    def __call__(self, x: Array, *, mask: Array | None = None) -> Array:
        y = jaxnorm.group_norm(self._params(), compute_dtype(x, self.dtype), **self.groups, axis=self.axis,
                               eps=self.epsilon, reduction_axes=self.reduction_axes, mask=mask, **self._named_axis())
        return output_dtype(y, self.dtype)


class LocalResponseNorm(nnx.Module):
    """torch.nn.LocalResponseNorm across the channels on ``axis`` (channels-last by default); no variables."""

    def __init__(self, size: int, alpha: float = 1e-4, beta: float = 0.75, k: float = 1.0, *, axis: int = -1,
                 rngs: nnx.Rngs | None = None):
        self.size, self.alpha, self.beta, self.k, self.axis = size, alpha, beta, k, axis

    def __call__(self, x: Array) -> Array:
        return jaxnorm.local_response_norm(x, size=self.size, alpha=self.alpha, beta=self.beta, k=self.k,
                                           axis=self.axis)


class _Reparametrized(nnx.Module):
    """Runs ``layer_instance`` with some of its params replaced by functions of them, then puts the originals
    back: the wrapped layer keeps its trainable (unnormalized) weights, and gradients reach them through the
    reparametrization, as with PyTorch's parametrizations and flax.linen's wrappers. (flax.nnx 0.12 instead
    overwrites the layer's params with the normalized ones at every call.)"""

    def _call_with(self, replace, x, *args, **kwargs):
        flat = list(nnx.to_flat_state(nnx.state(self.layer_instance, nnx.Param)))
        originals = [(param, param[...]) for _, param in flat]
        try:
            for path, param in flat:
                new = replace(path, param[...])
                if new is not None:
                    param[...] = new
            return self.layer_instance(x, *args, **kwargs)
        finally:
            for param, value in originals:
                param[...] = value


class SpectralNorm(_Reparametrized):
    """flax.nnx.SpectralNorm on jaxnorm.spectral_norm: every matrix param of ``layer_instance`` (higher ranks
    flattened to ``(-1, out)``) divided by its largest singular value during the call. ``batch_stats`` holds
    ``path + ("u",)`` ``(1, out)`` and ``path + ("sigma",)`` as in Flax; ``update_stats`` (default: the opposite
    of ``use_running_average``, so ``.train()``/``.eval()`` switch it) stores the refined ``u`` and ``sigma``."""

    def __init__(self, layer_instance: nnx.Module, *, n_steps: int = 1, epsilon: float = 1e-12, dtype: Any = None,
                 param_dtype: Any = jnp.float32, error_on_non_matrix: bool = False, update_stats: bool = True,
                 torch_order: bool = False, rngs: nnx.Rngs):
        self.layer_instance = layer_instance
        self.n_steps, self.epsilon, self.dtype, self.param_dtype = n_steps, epsilon, dtype, param_dtype
        self.error_on_non_matrix, self.torch_order = error_on_non_matrix, torch_order
        self.use_running_average = not update_stats
        stats = {}
        for path, param in nnx.to_flat_state(nnx.state(layer_instance, nnx.Param)):
            if param.ndim <= 1 or n_steps < 1:
                continue
            if param.ndim > 2 and error_on_non_matrix:
                raise ValueError(f"SpectralNorm: param {'/'.join(map(str, path))} is {param.ndim}D but "
                                 "error_on_non_matrix is True; pass error_on_non_matrix=False to flatten it.")
            key = rngs.params()
            stats[path + ("u",)] = nnx.BatchStat(jax.random.normal(key, (1, param.shape[-1]), param_dtype))
            stats[path + ("sigma",)] = nnx.BatchStat(jnp.ones((), param_dtype))
        self.batch_stats = nnx.data(stats)

    def __call__(self, x: Array, *args, update_stats: bool | None = None, **kwargs) -> Array:
        update = not self.use_running_average if update_stats is None else update_stats

        def replace(path, w):
            if path + ("u",) not in self.batch_stats:
                return None
            u_var, sigma_var = self.batch_stats[path + ("u",)], self.batch_stats[path + ("sigma",)]
            w_bar, u, sigma = jaxnorm.spectral_norm(w, u_var[...].reshape(-1), n_steps=self.n_steps,
                                                    eps=self.epsilon, axis=-1, torch_order=self.torch_order)
            if update:
                u_var[...] = u.reshape(1, -1).astype(u_var[...].dtype)
                sigma_var[...] = sigma.astype(sigma_var[...].dtype)
            return output_dtype(w_bar, self.dtype)

        return self._call_with(replace, x, *args, **kwargs)


class WeightNorm(_Reparametrized):
    """flax.nnx.WeightNorm on jaxnorm.weight_norm: the params of ``layer_instance`` that ``variable_filter``
    selects become ``scale * v / ||v||`` (norm over all but ``feature_axes``) during the call; the scales live in
    ``scales`` keyed by the param's path, as in Flax."""

    def __init__(self, layer_instance: nnx.Module, *, feature_axes: Axes | None = -1, use_scale: bool = True,
                 scale_init: Any = _ones, epsilon: float = 1e-12, dtype: Any = None, param_dtype: Any = jnp.float32,
                 variable_filter: Any = _KERNEL, promote_dtype: Any = None, rngs: nnx.Rngs):
        self.layer_instance = layer_instance
        self.feature_axes, self.use_scale, self.epsilon = feature_axes, use_scale, epsilon
        self.dtype, self.param_dtype = dtype, param_dtype
        self.variable_filter = nnx.filterlib.to_predicate(variable_filter)
        scales = None
        if use_scale:
            scales = {}
            for path, param in nnx.to_flat_state(nnx.state(layer_instance, nnx.Param)):
                if self.variable_filter(path, param):
                    feats = () if feature_axes is None else canonical_feature_axes(param.ndim, feature_axes)
                    scales[path] = scale_init(rngs["params"], tuple(param.shape[a] for a in feats), param_dtype)
        self.scales = nnx.data(scales)

    def __call__(self, x: Array, *args, **kwargs) -> Array:
        def replace(path, w):
            if not self.variable_filter(path, nnx.Param(w)):
                return None
            scale = self.scales[path] if self.use_scale else None
            return output_dtype(jaxnorm.weight_norm(w, scale, feature_axes=self.feature_axes, eps=self.epsilon),
                                self.dtype)

        return self._call_with(replace, x, *args, **kwargs)


__all__ = ["BatchNorm", "GroupNorm", "InstanceNorm", "LayerNorm", "LocalResponseNorm", "RMSNorm", "SpectralNorm",
           "WeightNorm"]
