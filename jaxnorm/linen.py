"""Flax linen wrappers: declare variables, call the functional core. Channels-last (``axis=-1``) by default.

Variables: ``params`` = {"scale", "bias"}, ``batch_stats`` = {"mean", "var", "count"} (see jaxnorm.batch_norm_init).
Momentum: give ``torch_momentum`` (weight of the new batch, default 0.1) or ``flax_momentum`` (decay of the old
average, e.g. 0.99); a plain ``momentum`` is a TypeError that says which one to use.

Every constructor and call keyword of the flax.linen class of the same name is accepted with Flax's meaning, in
Flax's positional order (``use_scale``, ``use_bias``, ``scale_init``, ``bias_init``, ``dtype``, ``reduction_axes``,
``feature_axes``, ``group_size``, ``axis_name``, ``axis_index_groups``, ``mask``, ...); where PyTorch's and Flax's
defaults differ
(epsilon, InstanceNorm's affine, the output dtype) the PyTorch one is kept. ``use_fast_variance`` is accepted and
has no effect: the statistics are exact (one pass only where that is provably accurate).
``force_float32_reductions=False`` stores the running statistics in ``param_dtype`` as Flax does; the statistics
are still accumulated in at least float32.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

import jaxnorm
from jaxnorm import _conventions as conventions
from jaxnorm._checks import normalized_shape_tuple

Array = jax.Array
Axes = int | Sequence[int]


# Flax's fields, in Flax's order: a linen module is a dataclass, so its field order is its positional order
# (``GroupNorm(32)`` is 32 groups, ``BatchNorm(True)`` is use_running_average=True, as in Flax). Each class below
# lists these field groups as bases from its last group to its first (a dataclass takes its bases' fields in
# reverse method-resolution order); jaxnorm's own keywords (PyTorch's names, the momentum conventions) follow.


class _Layer(nn.Module):
    """Declaring the params and the named axis, shared by every layer (no fields)."""

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


class _Epsilon(nn.Module):
    epsilon: float = 1e-5  # PyTorch's default (Flax's: 1e-6, except BatchNorm's 1e-5)


class _Dtypes(nn.Module):
    dtype: Any = None
    param_dtype: Any = jnp.float32


class _Affine(nn.Module):
    use_bias: bool | None = None  # None: PyTorch's default for the layer (see resolve_affine)
    use_scale: bool | None = None
    bias_init: Any = nn.initializers.zeros
    scale_init: Any = nn.initializers.ones


class _Reductions(nn.Module):
    axis_name: Hashable | None = None
    axis_index_groups: Any = None
    use_fast_variance: bool = True  # accepted, no effect: the statistics are exact
    force_float32_reductions: bool = True


def _features(x: Array, axes: Axes) -> tuple[int, ...]:
    return tuple(x.shape[a] for a in conventions.feature_axes(x.ndim, axes))


class _ChannelNorm(_Layer):
    """BatchNorm / InstanceNorm: jaxnorm's keywords and the running statistics' declaration."""

    torch_momentum: float | None = 0.1
    flax_momentum: float | None = None
    affine: bool | None = None
    nonfinite_guard: bool = False

    counts_steps = False  # a class attribute, not a field: BatchRenorm's schedule reads the step from `count`

    def _running(self, fshape: tuple[int, ...], momentum: conventions.Momentum) -> dict[str, Any]:
        # `count` (PyTorch's num_batches_tracked) is made with PyTorch's momentum, and is optional in the variables
        # given: flax.linen.BatchNorm's saved batch_stats (mean, var) load and train unchanged
        count = momentum.keeps_count or self.counts_steps
        count = count if self.is_initializing() else self.has_variable("batch_stats", "count")
        fresh = conventions.running_state(fshape, param_dtype=self.param_dtype, count=count,
                                          nonfinite_guard=self.nonfinite_guard,
                                          force_float32_reductions=self.force_float32_reductions)
        return {k: self.variable("batch_stats", k, lambda v=v: v) for k, v in fresh.items()}

    def _momentum(self) -> conventions.Momentum:
        default = type(self).__dataclass_fields__["torch_momentum"].default  # this layer's PyTorch-style default
        return conventions.resolve_momentum(self.torch_momentum, self.flax_momentum, type(self).__name__, default)

    def _apply(self, fn, x, use_running_average, *, momentum, default_affine, track, axis, batched=True, **kw):
        layer = type(self).__name__
        training = conventions.resolve_training(self.use_running_average, use_running_average, layer)
        use_scale, use_bias = conventions.resolve_affine(self.affine, self.use_scale, self.use_bias, default_affine,
                                                         layer)
        fshape = _features(x if batched else x[None], axis)  # unbatched: axis counts in the batched layout
        params = self._affine(fshape, use_scale, use_bias)
        stats_vars = self._running(fshape, momentum) if track else {}
        stats = {k: v.value for k, v in stats_vars.items()}
        if training and stats_vars and not self.is_initializing() and not self.is_mutable_collection("batch_stats"):
            raise ValueError(
                f"{layer}: training mode updates `batch_stats`, but that collection is not mutable. Call "
                "model.apply(variables, x, mutable=['batch_stats']) and keep the returned batch_stats, or pass "
                "use_running_average=True for evaluation."
            )
        y, new = fn(params, stats, conventions.compute_dtype(x, self.dtype), training=training, axis=axis,
                    momentum=momentum.momentum, eps=self.epsilon, **self._named_axis(),
                    **({} if batched else {"batched": False}), **kw)
        if training and stats_vars and not self.is_initializing():
            for k, v in stats_vars.items():
                v.value = new[k]
        return conventions.output_dtype(y, self.dtype)


class _BatchNormHead(nn.Module):
    use_running_average: bool | None = None
    axis: Axes = -1
    momentum: Any = None  # Flax's third field; here always an error (see __post_init__)
    epsilon: float = 1e-5

    def __post_init__(self):
        conventions.no_plain_momentum(self.momentum, type(self).__name__)
        super().__post_init__()


class BatchNorm(_ChannelNorm, _Reductions, _Affine, _Dtypes, _BatchNormHead):
    """torch.nn.BatchNorm{1,2,3}d / flax.linen.BatchNorm, channels-last by default, in Flax's positional order.

    ``affine`` (PyTorch) or ``use_scale``/``use_bias`` (Flax); ``axis`` may be a tuple of feature axes. Momentum is
    ``torch_momentum`` or ``flax_momentum``: a plain ``momentum`` (Flax's third positional field) is a TypeError.
    """

    track_running_stats: bool = True
    virtual_batch_size: int | None = None

    @nn.compact
    def __call__(self, x: Array, use_running_average: bool | None = None, *, mask: Array | None = None) -> Array:
        momentum = self._momentum()
        return self._apply(jaxnorm.batch_norm, x, use_running_average, momentum=momentum, default_affine=True,
                           track=self.track_running_stats, axis=self.axis, mask=mask,
                           running_var_unbiased=momentum.unbiased, virtual_batch_size=self.virtual_batch_size)


class BatchRenorm(_ChannelNorm, _Reductions, _Affine, _Dtypes, _BatchNormHead):
    """Batch renormalization (Ioffe, 2017) with the paper's schedule, in BatchNorm's positional order.

    ``y = (x_hat * r + d) * scale + bias`` with ``r`` and ``d`` clipped to bounds that follow the schedule: plain
    batch norm for ``warmup_steps`` training batches, then the bounds relaxed linearly from 1 and 0 to ``r_max``
    and ``d_max`` over ``relax_steps`` (``relax_steps=0``: at once, as sbx-rl's BatchRenorm). The step is
    ``batch_stats["count"]``, made with either momentum convention, so a checkpoint resumes the schedule; the
    running statistics, masks and ``axis_name`` are BatchNorm's (``jaxnorm.batch_renorm``). Momentum:
    ``torch_momentum`` (default 0.01, the paper's alpha) or ``flax_momentum`` (sbx-rl's ``momentum=0.99``).
    ``batch_var_unbiased=True`` normalizes with the unbiased batch variance, as sb3-contrib's BatchRenorm1d.
    """

    torch_momentum: float | None = 0.01
    r_max: float = 3.0
    d_max: float = 5.0
    warmup_steps: int = 5_000
    relax_steps: int = 40_000
    batch_var_unbiased: bool = False
    counts_steps = True

    @nn.compact
    def __call__(self, x: Array, use_running_average: bool | None = None, *, mask: Array | None = None) -> Array:
        momentum = self._momentum()
        return self._apply(jaxnorm.batch_renorm, x, use_running_average, momentum=momentum, default_affine=True,
                           track=True, axis=self.axis, mask=mask, running_var_unbiased=momentum.unbiased,
                           r_max=self.r_max, d_max=self.d_max, warmup_steps=self.warmup_steps,
                           relax_steps=self.relax_steps, batch_var_unbiased=self.batch_var_unbiased)


class _InstanceAxes(nn.Module):
    feature_axes: Axes | None = None  # Flax's name for the channel axes (default: `axis`)


class InstanceNorm(_ChannelNorm, _Reductions, _InstanceAxes, _Affine, _Dtypes, _Epsilon):
    """torch.nn.InstanceNorm{1,2,3}d (defaults affine=False, track_running_stats=False) / flax.linen.InstanceNorm,
    channels-last, in Flax's positional order. Flax's ``feature_axes`` is another name for ``axis`` (give one)."""

    use_running_average: bool | None = None
    axis: Axes = -1
    track_running_stats: bool = False

    @nn.compact
    def __call__(self, x: Array, use_running_average: bool | None = None, *, mask: Array | None = None,
                 batched: bool = True) -> Array:
        """``batched=False``: ``x`` is one example without the batch axis (PyTorch's unbatched input), normalized
        as the batch ``x[None]`` of one (``axis`` counts in that batched layout)."""
        if not self.track_running_stats and use_running_average is None and self.use_running_average is None:
            use_running_average = False  # without running stats both modes are the same computation
        return self._apply(jaxnorm.instance_norm, x, use_running_average, momentum=self._momentum(),
                           default_affine=False, track=self.track_running_stats,
                           axis=conventions.instance_axes(self.axis, self.feature_axes, "InstanceNorm"), mask=mask,
                           batched=batched)


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


class _RowAxes(nn.Module):
    reduction_axes: Axes | None = None  # None: -1, as Flax (given with `normalized_shape`: an error)
    feature_axes: Axes | None = None


class _RowNorm(_Layer):
    """LayerNorm / RMSNorm: PyTorch's ``normalized_shape`` (trailing dims) or Flax's ``reduction_axes`` and
    ``feature_axes`` (default -1 each, as in Flax); ``elementwise_affine`` (PyTorch) or ``use_scale``/``use_bias``."""

    normalized_shape: int | tuple[int, ...] | None = None
    elementwise_affine: bool | None = None

    def _run(self, fn, x, mask):
        layer = type(self).__name__
        use_bias = self.use_bias if self.with_bias else None
        use_scale, use_bias = conventions.resolve_affine(self.elementwise_affine, self.use_scale, use_bias, True, layer,
                                             "elementwise_affine")
        where = conventions.row_axes(self.normalized_shape, self.reduction_axes, self.feature_axes, layer, default=-1)
        if "normalized_shape" in where:
            shape = normalized_shape_tuple(where["normalized_shape"], layer)
        else:
            shape = _features(x, where["feature_axes"])
        params = self._affine(shape, use_scale, use_bias and self.with_bias)
        y = fn(params, conventions.compute_dtype(x, self.dtype), eps=self.epsilon, mask=mask, **where,
               **self._named_axis())
        return conventions.output_dtype(y, self.dtype)


class LayerNorm(_RowNorm, _Reductions, _RowAxes, _Affine, _Dtypes, _Epsilon):
    """torch.nn.LayerNorm / flax.linen.LayerNorm in Flax's positional order; default: the last dim."""

    with_bias = True  # a class attribute, not a field

    @nn.compact
    def __call__(self, x: Array, *, mask: Array | None = None) -> Array:
        return self._run(jaxnorm.layer_norm, x, mask)


class _RMSHead(nn.Module):
    epsilon: float | None = None  # finfo(dtype).eps, as PyTorch (Flax's: 1e-6)
    dtype: Any = None
    param_dtype: Any = jnp.float32
    use_scale: bool | None = None
    scale_init: Any = nn.initializers.ones


class RMSNorm(_RowNorm, _Reductions, _RowAxes, _RMSHead):
    """torch.nn.RMSNorm / flax.linen.RMSNorm in Flax's positional order; default: the last dim; no bias."""

    with_bias = False
    use_bias = None  # (Flax's RMSNorm has no use_bias field either)

    @nn.compact
    def __call__(self, x: Array, *, mask: Array | None = None) -> Array:
        return self._run(jaxnorm.rms_norm, x, mask)


class _GroupHead(nn.Module):
    num_groups: int | None = None  # None with no group_size: 32, as Flax
    group_size: int | None = None
    epsilon: float = 1e-5


class _GroupAxes(nn.Module):
    reduction_axes: Axes | None = None  # Flax's: default every axis but the batch axis 0


class GroupNorm(_Layer, _Reductions, _GroupAxes, _Affine, _Dtypes, _GroupHead):
    """torch.nn.GroupNorm / flax.linen.GroupNorm, channels-last, in Flax's positional order (``GroupNorm(32)``):
    ``num_groups`` (32 when neither is given) or ``group_size``; Flax's ``reduction_axes``; ``affine`` (PyTorch)
    or ``use_scale``/``use_bias``."""

    axis: int = -1
    affine: bool | None = None

    @nn.compact
    def __call__(self, x: Array, *, mask: Array | None = None) -> Array:
        use_scale, use_bias = conventions.resolve_affine(self.affine, self.use_scale, self.use_bias, True, "GroupNorm")
        params = self._affine((x.shape[self.axis],), use_scale, use_bias)
        y = jaxnorm.group_norm(params, conventions.compute_dtype(x, self.dtype),
                               **conventions.groups(self.num_groups, self.group_size), axis=self.axis,
                               eps=self.epsilon, reduction_axes=self.reduction_axes, mask=mask,
                               **self._named_axis())
        return conventions.output_dtype(y, self.dtype)


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


from jaxnorm._linen_weight_norms import SpectralNorm, WeightNorm  # noqa: E402  (they wrap any linen layer)

__all__ = ["BatchNorm", "BatchRenorm", "FrozenBatchNorm", "GroupNorm", "InstanceNorm", "LayerNorm", "LocalResponseNorm",
           "RMSNorm", "SpectralNorm", "WeightNorm"]
