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
from jaxnorm._checks import row_axes
from jaxnorm._group_norm import resolve_groups

Array = jax.Array
Axes = int | Sequence[int]
_zeros, _ones = nnx.initializers.zeros_init(), nnx.initializers.ones_init()
_NO_METADATA: Mapping[str, Any] = {}
_UNSET = object()
_KERNEL = nnx.PathContains("kernel")
# observe_inputs' callbacks: a stack set only inside its `with` block (as linen's nn.intercept_methods), so a
# model's call is unchanged everywhere else; precise_bn reads the BatchNorm inputs of an NNX model through it
_OBSERVERS: list[Any] = []


@contextlib.contextmanager
def observe_inputs(callback: Any):
    """Within the block, every ``BatchNorm`` call first hands ``callback(module, x, mask)`` its input (how
    ``jaxnorm.precise_bn`` reads the layers' inputs without changing the model)."""
    _OBSERVERS.append(callback)
    try:
        yield
    finally:
        _OBSERVERS.remove(callback)


class BatchNorm(nnx.Module):
    """Batch normalization: ``(x - mean) * rsqrt(var + epsilon) * scale + bias`` over every axis but ``axis``.

    torch.nn.BatchNorm{1,2,3}d and flax.nnx.BatchNorm in one, channels-last. Keywords as ``jaxnorm.linen.BatchNorm``'s
    fields (Flax's, PyTorch's ``affine`` and ``track_running_stats``, ``torch_momentum`` or ``flax_momentum``), plus
    NNX's ``rngs`` and ``scale_metadata``/``bias_metadata``. The running statistics are ``nnx.BatchStat``s
    (``mean``, ``var``, ``count``); ``.train()``/``.eval()`` set ``use_running_average``.
    """

    _torch_default: ClassVar[float] = 0.1  # this layer's torch_momentum default (given with flax_momentum: an error)
    _counts_steps: ClassVar[bool] = False  # a `count` with either momentum (BatchRenorm's schedule reads it)

    def __init__(self, num_features: int, *, use_running_average: bool | None = False, axis: Axes = -1,
                 torch_momentum: float | None = 0.1, flax_momentum: float | None = None, epsilon: float = 1e-5,
                 dtype: Any = None, param_dtype: Any = jnp.float32, affine: bool | None = None,
                 use_bias: bool | None = None, use_scale: bool | None = None, bias_init: Any = _zeros,
                 scale_init: Any = _ones, track_running_stats: bool = True, axis_name: Hashable | None = None,
                 axis_index_groups: Any = None, use_fast_variance: bool = True, force_float32_reductions: bool = True,
                 promote_dtype: Any = None, nonfinite_guard: bool = False, rngs: nnx.Rngs | None = None,
                 bias_metadata: Mapping[str, Any] = _NO_METADATA, scale_metadata: Mapping[str, Any] = _NO_METADATA,
                 momentum: Any = _UNSET):
        layer = type(self).__name__
        conventions.no_plain_momentum(momentum, layer, _UNSET)
        shape = (num_features,) if isinstance(num_features, int) else tuple(num_features)
        use_scale, use_bias = conventions.resolve_affine(affine, use_scale, use_bias, True, layer)
        _declare_affine(self, shape, use_scale, use_bias, param_dtype, (scale_init, bias_init),
                        (scale_metadata, bias_metadata), rngs)
        convention = conventions.resolve_momentum(torch_momentum, flax_momentum, layer, self._torch_default)
        _declare_running(self, shape, convention, track_running_stats, param_dtype, force_float32_reductions,
                         nonfinite_guard, counts_steps=self._counts_steps)
        self.momentum, self.running_var_unbiased = convention.momentum, convention.unbiased
        self.num_features, self.use_running_average, self.axis, self.epsilon = (num_features, use_running_average,
                                                                                axis, epsilon)
        self.dtype, self.param_dtype, self.axis_name, self.axis_index_groups = (dtype, param_dtype, axis_name,
                                                                                axis_index_groups)

    def __call__(self, x: Array, use_running_average: bool | None = None, *, mask: Array | None = None) -> Array:
        """Args: x; use_running_average: overrides the attribute; mask: bool, broadcastable to x, the positions the
        statistics pool. Returns: y, in ``dtype`` (or x's)."""
        for observe in _OBSERVERS:
            observe(self, x, mask)
        return _channel_norm(self, jaxnorm.batch_norm, x, use_running_average, mask=mask,
                             running_var_unbiased=self.running_var_unbiased)


class BatchRenorm(BatchNorm):
    """Batch renormalization (Ioffe, 2017) with the paper's schedule: BatchNorm's keywords plus ``r_max``,
    ``d_max``, ``warmup_steps``, ``relax_steps`` and ``batch_var_unbiased`` (as ``jaxnorm.linen.BatchRenorm``);
    the step is the ``count`` BatchStat, made with either momentum convention. ``torch_momentum`` defaults to the
    paper's 0.01."""

    _torch_default = 0.01
    _counts_steps = True

    def __init__(self, num_features: int, *, r_max: float = 3.0, d_max: float = 5.0, warmup_steps: int = 5_000,
                 relax_steps: int = 40_000, batch_var_unbiased: bool = False, torch_momentum: float | None = 0.01,
                 **batch_norm_keywords: Any):
        if "track_running_stats" in batch_norm_keywords:
            raise TypeError("BatchRenorm: `track_running_stats` is always True (renorm corrects the batch "
                            "statistics with the running ones); drop it.")
        super().__init__(num_features, torch_momentum=torch_momentum, **batch_norm_keywords)
        self.r_max, self.d_max, self.batch_var_unbiased = r_max, d_max, batch_var_unbiased
        self.warmup_steps, self.relax_steps = warmup_steps, relax_steps

    def __call__(self, x: Array, use_running_average: bool | None = None, *, mask: Array | None = None) -> Array:
        """As ``BatchNorm.__call__``."""
        return _channel_norm(self, jaxnorm.batch_renorm, x, use_running_average, mask=mask,
                             running_var_unbiased=self.running_var_unbiased, r_max=self.r_max, d_max=self.d_max,
                             warmup_steps=self.warmup_steps, relax_steps=self.relax_steps,
                             batch_var_unbiased=self.batch_var_unbiased)


class InstanceNorm(nnx.Module):
    """Instance normalization: ``(x - mean) * rsqrt(var + epsilon) * scale + bias``, statistics per example and
    channel over the spatial axes.

    torch.nn.InstanceNorm{1,2,3}d (affine off, no running stats by default) and flax.nnx.InstanceNorm in one;
    ``feature_axes`` is Flax's name for ``axis``. Keywords as BatchNorm's.
    """

    def __init__(self, num_features: int, *, use_running_average: bool | None = False, axis: Axes = -1,
                 feature_axes: Axes | None = None, torch_momentum: float | None = 0.1,
                 flax_momentum: float | None = None, epsilon: float = 1e-5, dtype: Any = None,
                 param_dtype: Any = jnp.float32, affine: bool | None = None, use_bias: bool | None = None,
                 use_scale: bool | None = None, bias_init: Any = _zeros, scale_init: Any = _ones,
                 track_running_stats: bool = False, axis_name: Hashable | None = None, axis_index_groups: Any = None,
                 use_fast_variance: bool = True, force_float32_reductions: bool = True, promote_dtype: Any = None,
                 rngs: nnx.Rngs | None = None, bias_metadata: Mapping[str, Any] = _NO_METADATA,
                 scale_metadata: Mapping[str, Any] = _NO_METADATA):
        shape = (num_features,) if isinstance(num_features, int) else tuple(num_features)
        use_scale, use_bias = conventions.resolve_affine(affine, use_scale, use_bias, False, "InstanceNorm")
        _declare_affine(self, shape, use_scale, use_bias, param_dtype, (scale_init, bias_init),
                        (scale_metadata, bias_metadata), rngs)
        convention = conventions.resolve_momentum(torch_momentum, flax_momentum, "InstanceNorm", 0.1)
        _declare_running(self, shape, convention, track_running_stats, param_dtype, force_float32_reductions)
        self.momentum, self.running_var_unbiased = convention.momentum, convention.unbiased
        self.num_features, self.use_running_average, self.epsilon = num_features, use_running_average, epsilon
        self.axis = conventions.instance_axes(axis, feature_axes, "InstanceNorm")
        self.dtype, self.param_dtype, self.axis_name, self.axis_index_groups = (dtype, param_dtype, axis_name,
                                                                                axis_index_groups)

    def __call__(self, x: Array, use_running_average: bool | None = None, *, mask: Array | None = None,
                 batched: bool = True) -> Array:
        """Args: x; use_running_average: overrides the attribute; mask: as BatchNorm's; batched: False when x is one
        example without the batch axis (PyTorch's unbatched input), normalized as the batch ``x[None]`` of one
        (``axis`` counts in that batched layout). Returns: y."""
        return _channel_norm(self, jaxnorm.instance_norm, x, use_running_average, mask=mask, batched=batched)


class LayerNorm(nnx.Module):
    """Layer normalization: ``(x - mean) * rsqrt(var + epsilon) * scale + bias`` over the last dim by default.

    torch.nn.LayerNorm and flax.nnx.LayerNorm in one: an int ``num_features`` with Flax's axes (default -1), or a
    tuple (``normalized_shape``) for PyTorch's trailing dims. Keywords as ``jaxnorm.linen.LayerNorm``'s fields.
    """

    _fn: ClassVar[Callable[..., Array]] = staticmethod(jaxnorm.layer_norm)
    _with_bias: ClassVar[bool] = True

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
        self.axes = row_axes(None if isinstance(shape, int) else tuple(shape), reduction_axes, feature_axes, layer,
                             default=-1)
        use_scale, use_bias = conventions.resolve_affine(elementwise_affine, use_scale, use_bias, True, layer,
                                                         "elementwise_affine")
        _declare_affine(self, (shape,) if isinstance(shape, int) else tuple(shape), use_scale,
                        use_bias and self._with_bias, param_dtype, (scale_init, bias_init),
                        (scale_metadata, bias_metadata), rngs)
        self.num_features, self.epsilon = shape, epsilon
        self.dtype, self.param_dtype, self.axis_name, self.axis_index_groups = (dtype, param_dtype, axis_name,
                                                                                axis_index_groups)

    def __call__(self, x: Array, *, mask: Array | None = None) -> Array:
        """Args: x; mask: bool, broadcastable to x, the positions the statistics pool. Returns: y."""
        y = type(self)._fn(_params(self), conventions.compute_dtype(x, self.dtype), eps=self.epsilon, mask=mask,
                           **self.axes, **_named_axis(self))
        return conventions.output_dtype(y, self.dtype)


class RMSNorm(LayerNorm):
    """RMS normalization: ``x * rsqrt(mean(x**2) + epsilon) * scale`` over the last dim by default; no bias.

    torch.nn.RMSNorm and flax.nnx.RMSNorm in one: LayerNorm's keywords but the bias ones (``use_bias``,
    ``bias_init``, ``bias_metadata``: Flax's RMSNorm has none); ``epsilon=None`` is finfo(dtype).eps, as PyTorch.
    """

    _fn = staticmethod(jaxnorm.rms_norm)
    _with_bias = False

    def __init__(self, num_features: int | tuple[int, ...] | None = None, *, epsilon: float | None = None,
                 **layer_norm_keywords: Any):
        bias = sorted({"use_bias", "bias_init", "bias_metadata"} & set(layer_norm_keywords))
        if bias:
            raise TypeError(f"RMSNorm: got {bias}, but RMSNorm has no bias (as in Flax); drop them.")
        super().__init__(num_features, epsilon=epsilon, **layer_norm_keywords)

    def __call__(self, x: Array, mask: Array | None = None) -> Array:  # noqa: D102 - Flax NNX's: mask positional
        return super().__call__(x, mask=mask)


class GroupNorm(nnx.Module):
    """Group normalization: ``(x - mean) * rsqrt(var + epsilon) * scale + bias``, statistics per example and group
    of channels.

    flax.nnx.GroupNorm and torch.nn.GroupNorm in one, channels-last: Flax's order ``GroupNorm(num_features,
    num_groups=32, group_size=None)``; PyTorch's ``num_channels`` is a keyword alias of ``num_features``.
    """

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
        _declare_affine(self, (c,), use_scale, use_bias, param_dtype, (scale_init, bias_init),
                        (scale_metadata, bias_metadata), rngs)
        self.num_features, self.num_groups, self.group_size = c, self.groups["num_groups"], self.groups["group_size"]
        self.axis, self.epsilon, self.reduction_axes = axis, epsilon, reduction_axes
        self.dtype, self.param_dtype, self.axis_name, self.axis_index_groups = (dtype, param_dtype, axis_name,
                                                                                axis_index_groups)

    def __call__(self, x: Array, *, mask: Array | None = None) -> Array:
        """Args: x; mask: as LayerNorm's (it may vary along the channels). Returns: y."""
        y = jaxnorm.group_norm(_params(self), conventions.compute_dtype(x, self.dtype), **self.groups, axis=self.axis,
                               eps=self.epsilon, reduction_axes=self.reduction_axes, mask=mask, **_named_axis(self))
        return conventions.output_dtype(y, self.dtype)


class LocalResponseNorm(nnx.Module):
    """torch.nn.LocalResponseNorm across the channels on ``axis`` (channels-last by default); no variables."""

    def __init__(self, size: int, alpha: float = 1e-4, beta: float = 0.75, k: float = 1.0, *, axis: int = -1,
                 rngs: nnx.Rngs | None = None):
        self.size, self.alpha, self.beta, self.k, self.axis = size, alpha, beta, k, axis

    def __call__(self, x: Array) -> Array:
        return jaxnorm.local_response_norm(x, size=self.size, alpha=self.alpha, beta=self.beta, k=self.k,
                                           axis=self.axis)



# ------------------------------------------------------------------------------------------ what the classes share


def _declare_affine(module, shape, use_scale, use_bias, param_dtype, inits, metadata, rngs) -> None:
    """``module.scale`` and ``module.bias``: ``nnx.Param``s from ``inits`` (scale's, bias's) with ``metadata``, or
    None for one not used."""
    for name, on, init, meta in zip(("scale", "bias"), (use_scale, use_bias), inits, metadata, strict=True):
        if not on:
            setattr(module, name, None)
            continue
        if rngs is None and init not in (_zeros, _ones):
            raise ValueError(f"{type(module).__name__}: `{name}_init` draws from a key; pass `rngs=nnx.Rngs(...)`.")
        key = rngs.params() if rngs is not None else jax.random.key(0)
        setattr(module, name, nnx.Param(init(key, shape, param_dtype), **meta))


def _declare_running(module, shape, momentum: conventions.Momentum, track, param_dtype, force_float32_reductions,
                     nonfinite_guard=False, *, counts_steps=False) -> None:
    """The running statistics as ``nnx.BatchStat``s (``mean``, ``var``, ``count``, ``skipped``; None for those not
    kept). ``count`` is kept with PyTorch's momentum, or for a step schedule
    (``counts_steps``: BatchRenorm's)."""
    stats = {} if not track else conventions.running_state(
        shape, param_dtype=param_dtype, force_float32_reductions=force_float32_reductions,
        count=momentum.keeps_count or counts_steps, nonfinite_guard=nonfinite_guard)
    module.tracked, module._stat_keys = bool(stats), tuple(stats)
    for k in ("mean", "var", "count", "skipped"):
        setattr(module, k, nnx.BatchStat(stats[k]) if k in stats else None)


def _params(module) -> dict[str, Array]:
    return {k: getattr(module, k)[...] for k in ("scale", "bias") if getattr(module, k, None) is not None}


def _named_axis(module) -> dict[str, Any]:
    return {"axis_name": module.axis_name, "axis_index_groups": module.axis_index_groups}


def _channel_norm(module, fn, x, use_running_average, **kw):
    """BatchNorm, BatchRenorm, InstanceNorm: call ``fn`` with the module's state, write back the running state."""
    training = conventions.resolve_training(module.use_running_average, use_running_average, type(module).__name__)
    stats = {k: getattr(module, k)[...] for k in module._stat_keys}
    y, new = fn(_params(module), stats, conventions.compute_dtype(x, module.dtype), training=training,
                axis=module.axis, momentum=module.momentum, eps=module.epsilon, **_named_axis(module), **kw)
    if training and module.tracked:
        for k in module._stat_keys:
            getattr(module, k).set_value(new[k])  # not [...] =: a complex batch makes the mean complex
    return conventions.output_dtype(y, module.dtype)


from jaxnorm._nnx_weight_norms import SpectralNorm, WeightNorm  # noqa: E402  (they wrap any NNX layer)

__all__ = ["BatchNorm", "BatchRenorm", "GroupNorm", "InstanceNorm", "LayerNorm", "LocalResponseNorm", "RMSNorm",
           "SpectralNorm", "WeightNorm"]
