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
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

import jaxnorm
from jaxnorm import _conventions as conventions
from jaxnorm._channels import check_num_features
from jaxnorm._group_norm import resolve_groups

Array = jax.Array
Axes = int | Sequence[int]
_zeros, _ones = nnx.initializers.zeros_init(), nnx.initializers.ones_init()
_NO_METADATA: Mapping[str, Any] = {}
_UNSET = object()
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
    _fn: ClassVar[Callable[..., Any]]  # the functional layer
    _torch_default: ClassVar[float] = 0.1  # the layer's torch_momentum default (given with flax_momentum: an error)
    _counts_steps: ClassVar[bool] = False  # a `count` with either momentum (BatchRenorm's schedule reads it)

    def __init__(self, num_features, *, use_running_average, axis, torch_momentum, flax_momentum, epsilon, affine,
                 use_scale, use_bias, default_affine, track_running_stats, dtype, param_dtype, scale_init,
                 bias_init, axis_name, axis_index_groups, force_float32_reductions, rngs, scale_metadata,
                 bias_metadata, nonfinite_guard=False):
        layer = type(self).__name__
        shape = (num_features,) if isinstance(num_features, int) else tuple(num_features)
        use_scale, use_bias = conventions.resolve_affine(affine, use_scale, use_bias, default_affine, layer)
        self._declare(shape, use_scale, use_bias, param_dtype=param_dtype, scale_init=scale_init,
                      bias_init=bias_init, rngs=rngs, scale_metadata=scale_metadata, bias_metadata=bias_metadata,
                      dtype=dtype, axis_name=axis_name, axis_index_groups=axis_index_groups)
        momentum = conventions.resolve_momentum(torch_momentum, flax_momentum, layer, self._torch_default)
        stats = {} if not track_running_stats else conventions.running_state(
            shape, param_dtype=param_dtype, force_float32_reductions=force_float32_reductions,
            count=momentum.keeps_count or self._counts_steps, nonfinite_guard=nonfinite_guard)
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
        training = conventions.resolve_training(self.use_running_average, use_running_average, type(self).__name__)
        stats = {k: getattr(self, k)[...] for k in self._stat_keys}
        y, new = type(self)._fn(self._params(), stats, conventions.compute_dtype(x, self.dtype), training=training,
                                axis=self.axis, momentum=self.momentum, eps=self.epsilon, **self._named_axis(), **kw)
        if training and self.tracked:
            for k in self._stat_keys:
                getattr(self, k).set_value(new[k])  # not [...] =: a complex batch makes the mean complex
        return conventions.output_dtype(y, self.dtype)


class BatchNorm(_ChannelNorm):
    """torch.nn.BatchNorm{1,2,3}d / flax.nnx.BatchNorm; ``affine`` (PyTorch) or ``use_scale``/``use_bias``."""

    _fn: ClassVar[Callable[..., Any]] = staticmethod(jaxnorm.batch_norm)

    def __init__(self, num_features: int, *, use_running_average: bool | None = False, axis: Axes = -1,
                 torch_momentum: float | None = 0.1, flax_momentum: float | None = None, epsilon: float = 1e-5,
                 dtype: Any = None, param_dtype: Any = jnp.float32, affine: bool | None = None,
                 use_bias: bool | None = None, use_scale: bool | None = None, bias_init: Any = _zeros,
                 scale_init: Any = _ones, track_running_stats: bool = True, axis_name: Hashable | None = None,
                 axis_index_groups: Any = None, use_fast_variance: bool = True, force_float32_reductions: bool = True,
                 promote_dtype: Any = None, nonfinite_guard: bool = False, rngs: nnx.Rngs | None = None,
                 bias_metadata: Mapping[str, Any] = _NO_METADATA, scale_metadata: Mapping[str, Any] = _NO_METADATA,
                 momentum: Any = _UNSET):
        conventions.no_plain_momentum(momentum, "BatchNorm", _UNSET)
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


class BatchRenorm(BatchNorm):
    """Batch renormalization (Ioffe, 2017) with the paper's schedule: BatchNorm's keywords plus ``r_max``,
    ``d_max``, ``warmup_steps``, ``relax_steps`` and ``batch_var_unbiased`` (as ``jaxnorm.linen.BatchRenorm``);
    the step is the ``count`` BatchStat, made with either momentum convention. ``torch_momentum`` defaults to the
    paper's 0.01."""

    _fn = staticmethod(jaxnorm.batch_renorm)
    _torch_default = 0.01
    _counts_steps = True

    def __init__(self, num_features: int, *, r_max: float = 3.0, d_max: float = 5.0, warmup_steps: int = 5_000,
                 relax_steps: int = 40_000, batch_var_unbiased: bool = False, torch_momentum: float | None = 0.01,
                 **keywords: Any):
        if "track_running_stats" in keywords:
            raise TypeError("BatchRenorm: `track_running_stats` is always True (renorm corrects the batch "
                            "statistics with the running ones); drop it.")
        super().__init__(num_features, torch_momentum=torch_momentum, **keywords)
        self.r_max, self.d_max, self.batch_var_unbiased = r_max, d_max, batch_var_unbiased
        self.warmup_steps, self.relax_steps = warmup_steps, relax_steps

    def __call__(self, x: Array, use_running_average: bool | None = None, *, mask: Array | None = None) -> Array:
        return self._call(x, use_running_average, mask=mask, running_var_unbiased=self.running_var_unbiased,
                          r_max=self.r_max, d_max=self.d_max, warmup_steps=self.warmup_steps,
                          relax_steps=self.relax_steps, batch_var_unbiased=self.batch_var_unbiased)


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
                         axis=conventions.instance_axes(axis, feature_axes, "InstanceNorm"),
                         torch_momentum=torch_momentum,
                         flax_momentum=flax_momentum, epsilon=epsilon, affine=affine, use_scale=use_scale,
                         use_bias=use_bias, default_affine=False, track_running_stats=track_running_stats,
                         dtype=dtype, param_dtype=param_dtype, scale_init=scale_init, bias_init=bias_init,
                         axis_name=axis_name, axis_index_groups=axis_index_groups,
                         force_float32_reductions=force_float32_reductions, rngs=rngs,
                         scale_metadata=scale_metadata, bias_metadata=bias_metadata)

    def __call__(self, x: Array, use_running_average: bool | None = None, *, mask: Array | None = None,
                 batched: bool = True) -> Array:
        """``batched=False``: ``x`` is one example without the batch axis (PyTorch's unbatched input), normalized
        as the batch ``x[None]`` of one (``axis`` counts in that batched layout)."""
        return self._call(x, use_running_average, mask=mask, batched=batched)


class LayerNorm(_Flax):
    """torch.nn.LayerNorm / flax.nnx.LayerNorm: an int ``num_features`` with Flax's axes (default -1), or a
    tuple (``normalized_shape``) for PyTorch's trailing dims."""

    with_bias = True
    _fn: ClassVar[Callable[..., Array]] = staticmethod(jaxnorm.layer_norm)

    def __init__(self, num_features: int | tuple[int, ...] | None = None, *,
                 normalized_shape: int | tuple[int, ...] | None = None, epsilon: float | None = 1e-5,
                 dtype: Any = None, param_dtype: Any = jnp.float32, elementwise_affine: bool | None = None,
                 use_bias: bool | None = None, use_scale: bool | None = None, bias_init: Any = _zeros,
                 scale_init: Any = _ones, reduction_axes: Axes | None = None, feature_axes: Axes | None = None,
                 axis_name: Hashable | None = None, axis_index_groups: Any = None, use_fast_variance: bool = True,
                 force_float32_reductions: bool = True, promote_dtype: Any = None, rngs: nnx.Rngs | None = None,
                 bias_metadata: Mapping[str, Any] = _NO_METADATA, scale_metadata: Mapping[str, Any] = _NO_METADATA):
        layer = type(self).__name__
        if num_features is not None and normalized_shape is not None:
            raise ValueError(f"{layer}: got both `num_features`={num_features!r} (Flax) and `normalized_shape`="
                             f"{normalized_shape!r} (PyTorch); give one.")
        shape = num_features if normalized_shape is None else normalized_shape
        if shape is None:
            raise TypeError(f"{layer}: give `num_features` (Flax) or `normalized_shape` (PyTorch).")
        # an int is Flax's num_features (axes: reduction_axes/feature_axes, default -1); a tuple is PyTorch's
        # normalized_shape (the trailing dims)
        self.where = conventions.row_axes(None if isinstance(shape, int) else tuple(shape), reduction_axes,
                                          feature_axes, layer, default=-1)
        use_scale, use_bias = conventions.resolve_affine(elementwise_affine, use_scale, use_bias, True, layer,
                                             "elementwise_affine")
        self._declare((shape,) if isinstance(shape, int) else tuple(shape), use_scale, use_bias and self.with_bias,
                      param_dtype=param_dtype, scale_init=scale_init, bias_init=bias_init, rngs=rngs,
                      scale_metadata=scale_metadata, bias_metadata=bias_metadata, dtype=dtype, axis_name=axis_name,
                      axis_index_groups=axis_index_groups)
        self.num_features = shape
        self.epsilon = epsilon

    def __call__(self, x: Array, *, mask: Array | None = None) -> Array:
        y = type(self)._fn(self._params(), conventions.compute_dtype(x, self.dtype), eps=self.epsilon, mask=mask,
                           **self.where, **self._named_axis())
        return conventions.output_dtype(y, self.dtype)


class RMSNorm(LayerNorm):
    """torch.nn.RMSNorm / flax.nnx.RMSNorm: LayerNorm's keywords but the bias ones (``use_bias``, ``bias_init``,
    ``bias_metadata``: Flax's RMSNorm has none); ``epsilon=None`` is finfo(dtype).eps, as PyTorch."""

    with_bias = False
    _fn = staticmethod(jaxnorm.rms_norm)

    def __init__(self, num_features: int | tuple[int, ...] | None = None, *, epsilon: float | None = None,
                 **keywords: Any):
        bias = sorted({"use_bias", "bias_init", "bias_metadata"} & set(keywords))
        if bias:
            raise TypeError(f"RMSNorm: got {bias}, but RMSNorm has no bias (as in Flax); drop them.")
        super().__init__(num_features, epsilon=epsilon, **keywords)

    def __call__(self, x: Array, mask: Array | None = None) -> Array:  # noqa: D102 - Flax NNX's: mask positional
        return super().__call__(x, mask=mask)


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
        self.groups = conventions.groups(num_groups, group_size)
        resolve_groups(**self.groups, c=c, layer="GroupNorm")  # the functional layer's checks, at construction
        use_scale, use_bias = conventions.resolve_affine(affine, use_scale, use_bias, True, "GroupNorm")
        self._declare((c,), use_scale, use_bias, param_dtype=param_dtype, scale_init=scale_init,
                      bias_init=bias_init, rngs=rngs, scale_metadata=scale_metadata, bias_metadata=bias_metadata,
                      dtype=dtype, axis_name=axis_name, axis_index_groups=axis_index_groups)
        self.num_features, self.num_groups, self.group_size = c, self.groups["num_groups"], self.groups["group_size"]
        self.axis, self.epsilon, self.reduction_axes = axis, epsilon, reduction_axes

    def __call__(self, x: Array, *, mask: Array | None = None) -> Array:
        y = jaxnorm.group_norm(self._params(), conventions.compute_dtype(x, self.dtype), **self.groups, axis=self.axis,
                               eps=self.epsilon, reduction_axes=self.reduction_axes, mask=mask, **self._named_axis())
        return conventions.output_dtype(y, self.dtype)


class LocalResponseNorm(nnx.Module):
    """torch.nn.LocalResponseNorm across the channels on ``axis`` (channels-last by default); no variables."""

    def __init__(self, size: int, alpha: float = 1e-4, beta: float = 0.75, k: float = 1.0, *, axis: int = -1,
                 rngs: nnx.Rngs | None = None):
        self.size, self.alpha, self.beta, self.k, self.axis = size, alpha, beta, k, axis

    def __call__(self, x: Array) -> Array:
        return jaxnorm.local_response_norm(x, size=self.size, alpha=self.alpha, beta=self.beta, k=self.k,
                                           axis=self.axis)


from jaxnorm._nnx_weight_norms import SpectralNorm, WeightNorm  # noqa: E402  (they wrap any NNX layer)

__all__ = ["BatchNorm", "BatchRenorm", "GroupNorm", "InstanceNorm", "LayerNorm", "LocalResponseNorm", "RMSNorm",
           "SpectralNorm", "WeightNorm"]
