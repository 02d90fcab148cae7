"""Flax linen wrappers: declare variables, call the functional core. Channels-last (``axis=-1``) by default.

Variables: ``params`` = {"scale", "bias"}, ``batch_stats`` = {"mean", "var", "count"} (see jaxnorm.batch_norm_init).
Momentum: give ``torch_momentum`` (weight of the new batch, default 0.1) or ``flax_momentum`` (decay of the old
average, e.g. 0.99); there is deliberately no plain ``momentum`` field.

Every constructor and call keyword of the flax.linen class of the same name is accepted with Flax's meaning
(``use_scale``, ``use_bias``, ``scale_init``, ``bias_init``, ``dtype``, ``reduction_axes``, ``feature_axes``,
``group_size``, ``axis_name``, ``axis_index_groups``, ``mask``, ...); where PyTorch's and Flax's defaults differ
(epsilon, InstanceNorm's affine, the output dtype) the PyTorch one is kept. ``use_fast_variance`` is accepted and
has no effect: the statistics are exact (one pass only where that is provably accurate).
``force_float32_reductions=False`` stores the running statistics in ``param_dtype`` as Flax does; the statistics
are still accumulated in at least float32.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

import jaxnorm
from jaxnorm._conventions import (
    Momentum,
    compute_dtype,
    feature_axes,
    groups,
    instance_axes,
    output_dtype,
    resolve_affine,
    resolve_momentum,
    resolve_training,
    row_axes,
    running_state,
)

Array = jax.Array


Axes = int | Sequence[int]


class _Flax(nn.Module):
    """The keywords every flax.linen normalization layer has."""

    dtype: Any = None
    param_dtype: Any = jnp.float32
    use_bias: bool | None = None
    use_scale: bool | None = None
    bias_init: Any = nn.initializers.zeros
    scale_init: Any = nn.initializers.ones
    axis_name: Hashable | None = None
    axis_index_groups: Any = None
    use_fast_variance: bool = True
    force_float32_reductions: bool = True

    def _affine(self, shape: tuple[int, ...], use_scale: bool, use_bias: bool) -> dict[str, Array]:
        params = {}
        if use_scale:
            params["scale"] = self.param("scale", self.scale_init, shape, self.param_dtype)
        if use_bias:
            params["bias"] = self.param("bias", self.bias_init, shape, self.param_dtype)
        return params

    def _named_axis(self) -> dict[str, Any]:
        # as flax.linen.BatchNorm: during init the named axis need not exist
        name = None if self.is_initializing() else self.axis_name
        return {"axis_name": name, "axis_index_groups": self.axis_index_groups if name else None}


def _features(x: Array, axes: Axes) -> tuple[int, ...]:
    return tuple(x.shape[a] for a in feature_axes(x.ndim, axes))


class _ChannelNorm(_Flax):
    """Fields and declaration logic shared by BatchNorm / InstanceNorm."""

    use_running_average: bool | None = None
    axis: Axes = -1
    torch_momentum: float | None = 0.1
    flax_momentum: float | None = None
    epsilon: float = 1e-5
    affine: bool | None = None
    nonfinite_guard: bool = False

    def _running(self, fshape: tuple[int, ...], momentum: Momentum) -> dict[str, Any]:
        # `count` (PyTorch's num_batches_tracked) is made with PyTorch's momentum, and is optional in the variables
        # given: flax.linen.BatchNorm's saved batch_stats (mean, var) load and train unchanged
        count = momentum.keeps_count if self.is_initializing() else self.has_variable("batch_stats", "count")
        fresh = running_state(fshape, param_dtype=self.param_dtype, count=count, nonfinite_guard=self.nonfinite_guard,
                              force_float32_reductions=self.force_float32_reductions)
        return {k: self.variable("batch_stats", k, lambda v=v: v) for k, v in fresh.items()}

    def _momentum(self) -> Momentum:
        return resolve_momentum(self.torch_momentum, self.flax_momentum, type(self).__name__)

    def _apply(self, fn, x, use_running_average, *, momentum, default_affine, track, axis, **kw):
        layer = type(self).__name__
        training = resolve_training(self.use_running_average, use_running_average, layer)
        use_scale, use_bias = resolve_affine(self.affine, self.use_scale, self.use_bias, default_affine, layer)
        fshape = _features(x, axis)
        params = self._affine(fshape, use_scale, use_bias)
        stats_vars = self._running(fshape, momentum) if track else {}
        stats = {k: v.value for k, v in stats_vars.items()}
        if training and stats_vars and not self.is_initializing() and not self.is_mutable_collection("batch_stats"):
            raise ValueError(
                f"{layer}: training mode updates `batch_stats`, but that collection is not mutable. Call "
                "model.apply(variables, x, mutable=['batch_stats']) and keep the returned batch_stats, or pass "
                "use_running_average=True for evaluation."
            )
        y, new = fn(params, stats, compute_dtype(x, self.dtype), training=training, axis=axis,
                    momentum=momentum.momentum, eps=self.epsilon, **self._named_axis(), **kw)
        if training and stats_vars and not self.is_initializing():
            for k, v in stats_vars.items():
                v.value = new[k]
        return output_dtype(y, self.dtype)


class BatchNorm(_ChannelNorm):
    """torch.nn.BatchNorm{1,2,3}d / flax.linen.BatchNorm, channels-last by default.

    ``affine`` (PyTorch) or ``use_scale``/``use_bias`` (Flax); ``axis`` may be a tuple of feature axes.
    """

    track_running_stats: bool = True
    virtual_batch_size: int | None = None

    @nn.compact
    def __call__(self, x: Array, use_running_average: bool | None = None, *, mask: Array | None = None) -> Array:
        momentum = self._momentum()
        return self._apply(jaxnorm.batch_norm, x, use_running_average, momentum=momentum, default_affine=True,
                           track=self.track_running_stats, axis=self.axis, mask=mask,
                           running_var_unbiased=momentum.unbiased, virtual_batch_size=self.virtual_batch_size)


class InstanceNorm(_ChannelNorm):
    """torch.nn.InstanceNorm{1,2,3}d (defaults affine=False, track_running_stats=False) / flax.linen.InstanceNorm,
    channels-last. Flax's ``feature_axes`` is another name for ``axis`` (give one)."""

    track_running_stats: bool = False
    feature_axes: Axes | None = None

    @nn.compact
    def __call__(self, x: Array, use_running_average: bool | None = None, *, mask: Array | None = None) -> Array:
        if not self.track_running_stats and use_running_average is None and self.use_running_average is None:
            use_running_average = False  # without running stats both modes are the same computation
        return self._apply(jaxnorm.instance_norm, x, use_running_average, momentum=self._momentum(),
                           default_affine=False, track=self.track_running_stats,
                           axis=instance_axes(self.axis, self.feature_axes, "InstanceNorm"), mask=mask)


class FrozenBatchNorm(nn.Module):
    """torchvision's FrozenBatchNorm2d: fixed statistics and affine (kept in "params"/"batch_stats" so pretrained
    weights load unchanged), never updated, no gradients to them. For fine-tuning."""

    axis: int = -1
    epsilon: float = 1e-5
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c = x.shape[self.axis]
        params = {"scale": self.param("scale", nn.initializers.ones, (c,), self.param_dtype),
                  "bias": self.param("bias", nn.initializers.zeros, (c,), self.param_dtype)}
        init = jaxnorm.batch_norm_init(c, affine=False, dtype=self.param_dtype)[1]
        stats = {k: self.variable("batch_stats", k, lambda v=v: v).value for k, v in init.items()}
        return jaxnorm.frozen_batch_norm(params, stats, x, axis=self.axis, eps=self.epsilon)


class _RowNorm(_Flax):
    """LayerNorm / RMSNorm: PyTorch's ``normalized_shape`` (trailing dims) or Flax's ``reduction_axes`` and
    ``feature_axes`` (default -1 each, as in Flax); ``elementwise_affine`` (PyTorch) or ``use_scale``/``use_bias``."""

    normalized_shape: int | tuple[int, ...] | None = None
    elementwise_affine: bool | None = None
    reduction_axes: Axes | None = None
    feature_axes: Axes | None = None

    def _run(self, fn, x, mask, with_bias):
        layer = type(self).__name__
        use_scale, use_bias = resolve_affine(self.elementwise_affine, self.use_scale,
                                             self.use_bias if with_bias else None, True, layer,
                                             "elementwise_affine")
        where = row_axes(self.normalized_shape, self.reduction_axes, self.feature_axes, layer, default=-1)
        if "normalized_shape" in where:
            shape = (where["normalized_shape"],) if isinstance(where["normalized_shape"], int) else tuple(
                where["normalized_shape"])
        else:
            shape = _features(x, where["feature_axes"])
        params = self._affine(shape, use_scale, use_bias and with_bias)
        y = fn(params, compute_dtype(x, self.dtype), eps=self.epsilon, mask=mask, **where, **self._named_axis())
        return output_dtype(y, self.dtype)


class LayerNorm(_RowNorm):
    """torch.nn.LayerNorm / flax.linen.LayerNorm; default: the last dim."""

    epsilon: float = 1e-5

    @nn.compact
    def __call__(self, x: Array, *, mask: Array | None = None) -> Array:
        return self._run(jaxnorm.layer_norm, x, mask, with_bias=True)


class RMSNorm(_RowNorm):
    """torch.nn.RMSNorm / flax.linen.RMSNorm; default: the last dim; ``epsilon=None`` is finfo(dtype).eps."""

    epsilon: float | None = None

    @nn.compact
    def __call__(self, x: Array, *, mask: Array | None = None) -> Array:
        if self.use_bias is not None:
            raise TypeError("RMSNorm: has no bias; `use_bias` is not one of its keywords (as in Flax).")
        return self._run(jaxnorm.rms_norm, x, mask, with_bias=False)


class GroupNorm(_Flax):
    """torch.nn.GroupNorm / flax.linen.GroupNorm, channels-last by default: ``num_groups`` (32 when neither is
    given) or ``group_size``; Flax's ``reduction_axes`` (default: all but the batch axis 0); ``affine`` (PyTorch)
    or ``use_scale``/``use_bias``."""

    num_groups: int | None = None
    group_size: int | None = None
    axis: int = -1
    epsilon: float = 1e-5
    affine: bool | None = None
    reduction_axes: Axes | None = None

    @nn.compact
    def __call__(self, x: Array, *, mask: Array | None = None) -> Array:
        use_scale, use_bias = resolve_affine(self.affine, self.use_scale, self.use_bias, True, "GroupNorm")
        params = self._affine((x.shape[self.axis],), use_scale, use_bias)
        y = jaxnorm.group_norm(params, compute_dtype(x, self.dtype), **groups(self.num_groups, self.group_size),
                               axis=self.axis, eps=self.epsilon, reduction_axes=self.reduction_axes, mask=mask,
                               **self._named_axis())
        return output_dtype(y, self.dtype)


class LocalResponseNorm(nn.Module):
    """torch.nn.LocalResponseNorm across the channels on ``axis`` (channels-last by default); no variables."""

    size: int
    alpha: float = 1e-4
    beta: float = 0.75
    k: float = 1.0
    axis: int = -1

    def __call__(self, x: Array) -> Array:
        return jaxnorm.local_response_norm(x, size=self.size, alpha=self.alpha, beta=self.beta, k=self.k,
                                           axis=self.axis)


def _var_name(layer: nn.Module, path: Any) -> str:
    return f"{layer.name}/{jax.tree_util.keystr(path[1:], simple=True, separator='/')}"


class SpectralNorm(nn.Module):
    """flax.linen.SpectralNorm on jaxnorm.spectral_norm: every matrix (and, flattened to ``(-1, out)``, every
    higher-rank weight) of ``layer_instance`` divided by its largest singular value before the call.

    Flax's fields and variables: ``batch_stats`` (``collection_name``) holds ``"{layer}/{path}/u"`` ``(1, out)``
    and ``".../sigma"``; ``update_stats=True`` (training) stores the refined ``u`` and ``sigma``.
    """

    layer_instance: nn.Module
    n_steps: int = 1
    epsilon: float = 1e-12
    dtype: Any = None
    param_dtype: Any = jnp.float32
    error_on_non_matrix: bool = False
    collection_name: str = "batch_stats"
    torch_order: bool = False  # end each call's iteration as PyTorch's spectral_norm does (see jaxnorm.spectral_norm)

    @nn.compact
    def __call__(self, *args, update_stats: bool, **kwargs):
        def normalize(path, value):
            value = jnp.asarray(value)
            if value.ndim <= 1 or self.n_steps < 1:
                return value
            if value.ndim > 2 and self.error_on_non_matrix:
                raise ValueError(
                    f"SpectralNorm: `{_var_name(self.layer_instance, path)}` is {value.ndim}D but "
                    "error_on_non_matrix is True; pass error_on_non_matrix=False to flatten it to (-1, out).")
            name = _var_name(self.layer_instance, path)
            out = value.shape[-1]
            u_var = self.variable(self.collection_name, name + "/u", jax.random.normal,
                                  None if self.has_variable(self.collection_name, name + "/u")
                                  else self.make_rng("params"), (1, out), self.param_dtype)
            sigma_var = self.variable(self.collection_name, name + "/sigma", jnp.ones, (), self.param_dtype)
            w_bar, u, sigma = jaxnorm.spectral_norm(value, u_var.value.reshape(out), n_steps=self.n_steps,
                                                    eps=self.epsilon, axis=-1, torch_order=self.torch_order)
            if update_stats and not self.is_initializing():
                u_var.value = u.reshape(1, out).astype(u_var.value.dtype)
                sigma_var.value = sigma.astype(sigma_var.value.dtype)
            return w_bar if self.dtype is None else w_bar.astype(self.dtype)

        return nn.map_variables(
            lambda layer: layer(*args, **kwargs),
            trans_in_fn=lambda vs: jax.tree_util.tree_map_with_path(normalize, vs),
            init=self.is_initializing(), mutable=True,
        )(self.layer_instance)


class WeightNorm(nn.Module):
    """flax.linen.WeightNorm on jaxnorm.weight_norm: the variables of ``layer_instance`` whose path contains one
    of ``variable_filter`` become ``scale * v / ||v||`` (norm over all but ``feature_axes``) before the call.

    Flax's fields and variables: the scales are params ``"{layer}/{path}/scale"`` of the feature shape.
    """

    layer_instance: nn.Module
    epsilon: float = 1e-12
    dtype: Any = None
    param_dtype: Any = jnp.float32
    use_scale: bool = True
    scale_init: Any = nn.initializers.ones
    feature_axes: Axes | None = -1
    variable_filter: Any = dataclasses.field(default_factory=lambda: {"kernel"})

    @nn.compact
    def __call__(self, *args, **kwargs):
        def normalize(path, value):
            value = jnp.asarray(value)
            name = _var_name(self.layer_instance, path)
            if self.variable_filter and not any(f in name for f in self.variable_filter):
                return value
            scale = None
            if self.use_scale:
                feats = () if self.feature_axes is None else feature_axes(value.ndim, self.feature_axes)
                shape = tuple(value.shape[a] for a in feats)
                scale = self.param(name + "/scale", self.scale_init, shape, self.param_dtype)
            w = jaxnorm.weight_norm(value, scale, feature_axes=self.feature_axes, eps=self.epsilon)
            return w if self.dtype is None else w.astype(self.dtype)

        return nn.map_variables(
            lambda layer: layer(*args, **kwargs),
            trans_in_fn=lambda vs: jax.tree_util.tree_map_with_path(normalize, vs),
            init=self.is_initializing(),
        )(self.layer_instance)



__all__ = ["BatchNorm", "FrozenBatchNorm", "GroupNorm", "InstanceNorm", "LayerNorm", "LocalResponseNorm", "RMSNorm",
           "SpectralNorm", "WeightNorm"]
