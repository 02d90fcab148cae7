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
from jaxnorm._checks import normalized_shape_tuple, row_axes

Array = jax.Array
Axes = int | Sequence[int]


# Each class lists its fields flat, in Flax's order: a linen module is a dataclass, so its field order is its
# positional order (``GroupNorm(32)`` is 32 groups, ``BatchNorm(True)`` is use_running_average=True, as in Flax).
# jaxnorm's own keywords (PyTorch's names, the momentum conventions) follow Flax's. What the classes share is the
# module-level functions below them; none of them computes anything but the variables and the arguments.


class BatchNorm(nn.Module):
    """Batch normalization: ``(x - mean) * rsqrt(var + epsilon) * scale + bias`` over every axis but ``axis``.

    torch.nn.BatchNorm{1,2,3}d and flax.linen.BatchNorm in one, channels-last by default, fields in Flax's
    positional order. In training the batch's statistics normalize and update ``batch_stats`` (mean, var, count);
    with ``use_running_average`` the running ones normalize.

    Attributes:
      use_running_average: normalize with the running statistics (eval mode); also a call argument.
      axis: the feature axis, or a tuple of them.
      momentum: Flax's third field, always a TypeError: say ``torch_momentum`` or ``flax_momentum``.
      epsilon: added to the variance (PyTorch's and Flax's 1e-5).
      dtype: the output's dtype (None: x's); param_dtype: the params' and running statistics'.
      use_bias, use_scale, bias_init, scale_init: Flax's affine (None: PyTorch's default, both on).
      axis_name, axis_index_groups: SyncBatchNorm: the statistics over every device of this named axis.
      use_fast_variance: accepted, no effect: the statistics are exact.
      force_float32_reductions: False stores the running statistics in ``param_dtype``, as Flax.
      torch_momentum: the weight of the new batch (PyTorch's, default 0.1; None: the cumulative average).
      flax_momentum: the decay of the old average (Flax's, e.g. 0.99); give one of the two.
      affine: PyTorch's name for ``use_scale`` and ``use_bias`` together.
      nonfinite_guard: a batch with NaN/inf statistics leaves the running state alone and counts ``skipped``.
      track_running_stats: PyTorch's: False keeps no running statistics (batch statistics in both modes).
      virtual_batch_size: ghost batch norm: statistics per consecutive sub-batch of this size.
    """

    use_running_average: bool | None = None
    axis: Axes = -1
    momentum: Any = None
    epsilon: float = 1e-5
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
    torch_momentum: float | None = 0.1
    flax_momentum: float | None = None
    affine: bool | None = None
    nonfinite_guard: bool = False
    track_running_stats: bool = True
    virtual_batch_size: int | None = None

    def __post_init__(self):
        conventions.no_plain_momentum(self.momentum, type(self).__name__)
        super().__post_init__()

    @nn.compact
    def __call__(self, x: Array, use_running_average: bool | None = None, *, mask: Array | None = None) -> Array:
        """Args: x; use_running_average: overrides the field; mask: bool, broadcastable to x, the positions the
        statistics pool. Returns: y, in ``dtype`` (or x's)."""
        momentum = _momentum(self)
        return _channel_norm(self, jaxnorm.batch_norm, x, use_running_average, momentum=momentum,
                             default_affine=True, track=self.track_running_stats, axis=self.axis, mask=mask,
                             running_var_unbiased=momentum.unbiased, virtual_batch_size=self.virtual_batch_size)


class BatchRenorm(nn.Module):
    """Batch renormalization (Ioffe, 2017): ``(x_hat * r + d) * scale + bias``, ``x_hat`` the batch-normalized x.

    ``r = clip(std_B / std, 1 / r_max, r_max)`` and ``d = clip((mean_B - mean) / std, -d_max, d_max)`` take the
    running statistics' view, with bounds that follow the paper's schedule: plain batch norm for ``warmup_steps``
    training batches, then the bounds relaxed linearly from 1 and 0 to ``r_max`` and ``d_max`` over
    ``relax_steps`` (0: at once, as sbx-rl's BatchRenorm). The step is ``batch_stats["count"]``, so a checkpoint
    resumes the schedule. Fields as BatchNorm's, in its positional order, then:

    Attributes:
      torch_momentum: default 0.01, the paper's alpha (``flax_momentum=0.99`` is sbx-rl's ``momentum``).
      r_max, d_max: the bounds once relaxed.
      warmup_steps, relax_steps: the schedule.
      batch_var_unbiased: normalize with the unbiased batch variance, as sb3-contrib's BatchRenorm1d.
    """

    use_running_average: bool | None = None
    axis: Axes = -1
    momentum: Any = None
    epsilon: float = 1e-5
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
    torch_momentum: float | None = 0.01
    flax_momentum: float | None = None
    affine: bool | None = None
    nonfinite_guard: bool = False
    r_max: float = 3.0
    d_max: float = 5.0
    warmup_steps: int = 5_000
    relax_steps: int = 40_000
    batch_var_unbiased: bool = False

    def __post_init__(self):
        conventions.no_plain_momentum(self.momentum, type(self).__name__)
        super().__post_init__()

    @nn.compact
    def __call__(self, x: Array, use_running_average: bool | None = None, *, mask: Array | None = None) -> Array:
        """As ``BatchNorm.__call__``."""
        momentum = _momentum(self)
        return _channel_norm(self, jaxnorm.batch_renorm, x, use_running_average, momentum=momentum,
                             default_affine=True, track=True, counts_steps=True, axis=self.axis, mask=mask,
                             running_var_unbiased=momentum.unbiased, r_max=self.r_max, d_max=self.d_max,
                             warmup_steps=self.warmup_steps, relax_steps=self.relax_steps,
                             batch_var_unbiased=self.batch_var_unbiased)


class InstanceNorm(nn.Module):
    """Instance normalization: ``(x - mean) * rsqrt(var + epsilon) * scale + bias``, statistics per example and
    channel over the spatial axes.

    torch.nn.InstanceNorm{1,2,3}d (defaults ``affine=False``, ``track_running_stats=False``) and
    flax.linen.InstanceNorm in one, channels-last, fields in Flax's positional order.

    Attributes:
      epsilon: added to the variance (PyTorch's 1e-5; Flax's 1e-6).
      dtype, param_dtype, use_bias, use_scale, bias_init, scale_init: as BatchNorm's (affine default: off).
      feature_axes: Flax's name for the channel axes (default: ``axis``; give one of the two).
      axis_name, axis_index_groups, use_fast_variance, force_float32_reductions: as BatchNorm's.
      torch_momentum, flax_momentum, affine, nonfinite_guard: as BatchNorm's.
      use_running_average: with ``track_running_stats``, normalize with the running statistics.
      axis: the channel axis (PyTorch's name).
      track_running_stats: keep running statistics, as PyTorch's option.
    """

    epsilon: float = 1e-5
    dtype: Any = None
    param_dtype: Any = jnp.float32
    use_bias: bool | None = None
    use_scale: bool | None = None
    bias_init: Any = nn.initializers.zeros
    scale_init: Any = nn.initializers.ones
    feature_axes: Axes | None = None
    axis_name: Hashable | None = None
    axis_index_groups: Any = None
    use_fast_variance: bool = True
    force_float32_reductions: bool = True
    torch_momentum: float | None = 0.1
    flax_momentum: float | None = None
    affine: bool | None = None
    nonfinite_guard: bool = False
    use_running_average: bool | None = None
    axis: Axes = -1
    track_running_stats: bool = False

    @nn.compact
    def __call__(self, x: Array, use_running_average: bool | None = None, *, mask: Array | None = None,
                 batched: bool = True) -> Array:
        """Args: x; use_running_average: overrides the field; mask: as BatchNorm's; batched: False when x is one
        example without the batch axis (PyTorch's unbatched input), normalized as the batch ``x[None]`` of one
        (``axis`` counts in that batched layout). Returns: y, in ``dtype`` (or x's)."""
        if not self.track_running_stats and use_running_average is None and self.use_running_average is None:
            use_running_average = False  # without running stats both modes are the same computation
        return _channel_norm(self, jaxnorm.instance_norm, x, use_running_average, momentum=_momentum(self),
                             default_affine=False, track=self.track_running_stats,
                             axis=conventions.instance_axes(self.axis, self.feature_axes, "InstanceNorm"),
                             mask=mask, batched=batched)


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


class LayerNorm(nn.Module):
    """Layer normalization: ``(x - mean) * rsqrt(var + epsilon) * scale + bias`` over the last dim by default.

    torch.nn.LayerNorm and flax.linen.LayerNorm in one, fields in Flax's positional order.

    Attributes:
      epsilon: added to the variance (PyTorch's 1e-5; Flax's 1e-6).
      dtype, param_dtype, use_bias, use_scale, bias_init, scale_init: as BatchNorm's (affine default: on).
      reduction_axes: Flax's: the axes to normalize over (None: -1; not with ``normalized_shape``).
      feature_axes: Flax's: the params' axes (None: -1).
      axis_name, axis_index_groups, use_fast_variance, force_float32_reductions: as BatchNorm's.
      normalized_shape: PyTorch's: the trailing dims to normalize over, and the params' shape.
      elementwise_affine: PyTorch's name for ``use_scale`` and ``use_bias`` together.
    """

    epsilon: float = 1e-5
    dtype: Any = None
    param_dtype: Any = jnp.float32
    use_bias: bool | None = None
    use_scale: bool | None = None
    bias_init: Any = nn.initializers.zeros
    scale_init: Any = nn.initializers.ones
    reduction_axes: Axes | None = None
    feature_axes: Axes | None = None
    axis_name: Hashable | None = None
    axis_index_groups: Any = None
    use_fast_variance: bool = True
    force_float32_reductions: bool = True
    normalized_shape: int | tuple[int, ...] | None = None
    elementwise_affine: bool | None = None

    @nn.compact
    def __call__(self, x: Array, *, mask: Array | None = None) -> Array:
        """Args: x; mask: bool, broadcastable to x, the positions the statistics pool. Returns: y."""
        return _row_norm(self, jaxnorm.layer_norm, x, mask, use_bias=self.use_bias)


class RMSNorm(nn.Module):
    """RMS normalization: ``x * rsqrt(mean(x**2) + epsilon) * scale`` over the last dim by default; no bias.

    torch.nn.RMSNorm and flax.linen.RMSNorm in one, fields in Flax's positional order.

    Attributes:
      epsilon: added to the mean square (None: ``finfo(dtype).eps``, as PyTorch; Flax's: 1e-6).
      dtype, param_dtype, use_scale, scale_init: as LayerNorm's.
      reduction_axes, feature_axes, axis_name, axis_index_groups, use_fast_variance, force_float32_reductions,
      normalized_shape, elementwise_affine: as LayerNorm's.
    """

    epsilon: float | None = None
    dtype: Any = None
    param_dtype: Any = jnp.float32
    use_scale: bool | None = None
    scale_init: Any = nn.initializers.ones
    reduction_axes: Axes | None = None
    feature_axes: Axes | None = None
    axis_name: Hashable | None = None
    axis_index_groups: Any = None
    use_fast_variance: bool = True
    force_float32_reductions: bool = True
    normalized_shape: int | tuple[int, ...] | None = None
    elementwise_affine: bool | None = None

    @nn.compact
    def __call__(self, x: Array, *, mask: Array | None = None) -> Array:
        """As ``LayerNorm.__call__``."""
        return _row_norm(self, jaxnorm.rms_norm, x, mask, use_bias=None, with_bias=False)


class GroupNorm(nn.Module):
    """Group normalization: ``(x - mean) * rsqrt(var + epsilon) * scale + bias``, statistics per example and group
    of channels.

    torch.nn.GroupNorm and flax.linen.GroupNorm in one, channels-last, fields in Flax's positional order
    (``GroupNorm(32)``).

    Attributes:
      num_groups: the number of groups (32 when neither this nor ``group_size`` is given, as Flax).
      group_size: the channels per group, instead of ``num_groups``.
      epsilon: added to the variance (PyTorch's 1e-5; Flax's 1e-6).
      dtype, param_dtype, use_bias, use_scale, bias_init, scale_init: as BatchNorm's (affine default: on).
      reduction_axes: Flax's: the axes the statistics pool (default: every axis but the batch axis 0).
      axis_name, axis_index_groups, use_fast_variance, force_float32_reductions: as BatchNorm's.
      axis: the channel axis.
      affine: PyTorch's name for ``use_scale`` and ``use_bias`` together.
    """

    num_groups: int | None = None
    group_size: int | None = None
    epsilon: float = 1e-5
    dtype: Any = None
    param_dtype: Any = jnp.float32
    use_bias: bool | None = None
    use_scale: bool | None = None
    bias_init: Any = nn.initializers.zeros
    scale_init: Any = nn.initializers.ones
    reduction_axes: Axes | None = None
    axis_name: Hashable | None = None
    axis_index_groups: Any = None
    use_fast_variance: bool = True
    force_float32_reductions: bool = True
    axis: int = -1
    affine: bool | None = None

    @nn.compact
    def __call__(self, x: Array, *, mask: Array | None = None) -> Array:
        """Args: x; mask: as LayerNorm's (it may vary along the channels). Returns: y."""
        use_scale, use_bias = conventions.resolve_affine(self.affine, self.use_scale, self.use_bias, True, "GroupNorm")
        params = _affine(self, (x.shape[self.axis],), use_scale, use_bias)
        y = jaxnorm.group_norm(params, conventions.compute_dtype(x, self.dtype),
                               **conventions.groups(self.num_groups, self.group_size), axis=self.axis,
                               eps=self.epsilon, reduction_axes=self.reduction_axes, mask=mask, **_named_axis(self))
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



# ------------------------------------------------------------------------------------------ what the classes share


def _affine(module: nn.Module, shape: tuple[int, ...], use_scale: bool, use_bias: bool) -> dict[str, Array]:
    """The module's ``scale`` and ``bias`` params, those it uses, from its ``scale_init`` / ``bias_init``."""
    params = {}
    if use_scale:
        params["scale"] = module.param("scale", module.scale_init, shape, module.param_dtype)
    if use_bias:
        params["bias"] = module.param("bias", module.bias_init, shape, module.param_dtype)
    return params


def _named_axis(module: nn.Module) -> dict[str, Any]:
    """The ``axis_name`` keywords; as flax.linen.BatchNorm, none during init (the named axis need not exist)."""
    name = None if module.is_initializing() else module.axis_name
    return {"axis_name": name, "axis_index_groups": module.axis_index_groups if name else None}


def _features(x: Array, axes: Axes) -> tuple[int, ...]:
    return tuple(x.shape[a] for a in conventions.feature_axes(x.ndim, axes))


def _momentum(module: nn.Module) -> conventions.Momentum:
    """The module's momentum convention; the default is its own ``torch_momentum`` field's."""
    default = type(module).__dataclass_fields__["torch_momentum"].default
    return conventions.resolve_momentum(module.torch_momentum, module.flax_momentum, type(module).__name__, default)


def _running(module: nn.Module, fshape: tuple[int, ...], momentum: conventions.Momentum,
             counts_steps: bool) -> dict[str, Any]:
    """The ``batch_stats`` variables. ``count`` (PyTorch's num_batches_tracked) is made with PyTorch's momentum or
    for a step schedule (BatchRenorm), and is optional in the variables given: flax.linen.BatchNorm's saved
    batch_stats (mean, var) load and train unchanged."""
    count = momentum.keeps_count or counts_steps
    count = count if module.is_initializing() else module.has_variable("batch_stats", "count")
    fresh = conventions.running_state(fshape, param_dtype=module.param_dtype, count=count,
                                      nonfinite_guard=module.nonfinite_guard,
                                      force_float32_reductions=module.force_float32_reductions)
    return {k: module.variable("batch_stats", k, lambda v=v: v) for k, v in fresh.items()}


def _channel_norm(module, fn, x, use_running_average, *, momentum, default_affine, track, axis, counts_steps=False,
                  batched=True, **kw):
    """BatchNorm, BatchRenorm, InstanceNorm: declare the variables, call ``fn``, write back the running state."""
    layer = type(module).__name__
    training = conventions.resolve_training(module.use_running_average, use_running_average, layer)
    use_scale, use_bias = conventions.resolve_affine(module.affine, module.use_scale, module.use_bias,
                                                     default_affine, layer)
    fshape = _features(x if batched else x[None], axis)  # unbatched: axis counts in the batched layout
    params = _affine(module, fshape, use_scale, use_bias)
    stats_vars = _running(module, fshape, momentum, counts_steps) if track else {}
    stats = {k: v.value for k, v in stats_vars.items()}
    if training and stats_vars and not module.is_initializing() and not module.is_mutable_collection("batch_stats"):
        raise ValueError(
            f"{layer}: training mode updates `batch_stats`, but that collection is not mutable. Call "
            "model.apply(variables, x, mutable=['batch_stats']) and keep the returned batch_stats, or pass "
            "use_running_average=True for evaluation."
        )
    y, new = fn(params, stats, conventions.compute_dtype(x, module.dtype), training=training, axis=axis,
                momentum=momentum.momentum, eps=module.epsilon, **_named_axis(module),
                **({} if batched else {"batched": False}), **kw)
    if training and stats_vars and not module.is_initializing():
        for k, v in stats_vars.items():
            v.value = new[k]
    return conventions.output_dtype(y, module.dtype)


def _row_norm(module, fn, x, mask, *, use_bias, with_bias=True):
    """LayerNorm, RMSNorm (``with_bias=False``): PyTorch's ``normalized_shape`` (trailing dims) or Flax's
    ``reduction_axes`` and ``feature_axes`` (default -1 each, as in Flax); ``elementwise_affine`` (PyTorch) or
    ``use_scale``/``use_bias``."""
    layer = type(module).__name__
    use_scale, use_bias = conventions.resolve_affine(module.elementwise_affine, module.use_scale, use_bias, True,
                                                     layer, "elementwise_affine")
    axes = row_axes(module.normalized_shape, module.reduction_axes, module.feature_axes, layer, default=-1)
    if "normalized_shape" in axes:
        shape = normalized_shape_tuple(axes["normalized_shape"], layer)
    else:
        shape = _features(x, axes["feature_axes"])
    params = _affine(module, shape, use_scale, use_bias and with_bias)
    y = fn(params, conventions.compute_dtype(x, module.dtype), eps=module.epsilon, mask=mask, **axes,
           **_named_axis(module))
    return conventions.output_dtype(y, module.dtype)


from jaxnorm._linen_weight_norms import SpectralNorm, WeightNorm  # noqa: E402  (they wrap any linen layer)

__all__ = ["BatchNorm", "BatchRenorm", "FrozenBatchNorm", "GroupNorm", "InstanceNorm", "LayerNorm", "LocalResponseNorm",
           "RMSNorm", "SpectralNorm", "WeightNorm"]
