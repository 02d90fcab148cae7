"""Equinox modules on the functional core: ``eqx.Module``s with running statistics in ``eqx.nn.State``.

Needs the optional extra (``pip install "jaxnorm[equinox]"``, equinox >= 0.13). As in ``equinox.nn`` each module
takes ONE example, channels first (``(C, *spatial)``), and batch statistics come from a ``jax.vmap`` with an
``axis_name``::

    bn, state = eqx.nn.make_with_state(jaxnorm.equinox.BatchNorm)(64, axis_name="batch")
    y, state = jax.vmap(bn, axis_name="batch", in_axes=(0, None), out_axes=(0, None))(x, state)

PyTorch's semantics by default: batch statistics in training (``inference=False``), running variance starting at 1
and updated with the unbiased batch variance, ``count`` = ``num_batches_tracked``. Inference uses the running
statistics: set ``inference=True`` on the module, pass ``inference=`` to the call, or use
``eqx.nn.inference_mode(model)`` (this is equinox's ``mode="batch"``; other modes are refused). Momentum is
explicit, as in the Flax wrappers: ``torch_momentum`` (weight of the new batch, default 0.1) or ``flax_momentum``
(decay of the old average, equinox's own ``momentum=0.99`` convention); a plain ``momentum`` is a TypeError that
says which to use.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any

try:
    import equinox as eqx
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "jaxnorm.equinox needs equinox: pip install \"jaxnorm[equinox]\" (equinox >= 0.13)."
    ) from err
import jax
import jax.numpy as jnp

import jaxnorm
from jaxnorm._checks import normalized_shape_tuple
from jaxnorm._conventions import no_plain_momentum, resolve_momentum

Array = jax.Array
_NO_STATE = object()
_UNSET = object()


def _dtype(dtype: Any) -> Any:
    return jnp.result_type(float) if dtype is None else dtype  # equinox: float64 when x64 is enabled


def _set_state(state: eqx.nn.State, index: Any, new: dict[str, Array], layer: str) -> eqx.nn.State:
    """``state`` with ``new`` running statistics; an eqx.nn.State keeps its dtypes, so a complex batch (whose mean
    is complex) needs a layer made for complex inputs."""
    old = state.get(index)
    if jnp.iscomplexobj(new["mean"]) and not jnp.iscomplexobj(old["mean"]):
        raise TypeError(f"{layer}: a complex input makes the running mean complex, but this layer's state holds a "
                        f"real {old['mean'].dtype} one (an eqx.nn.State keeps its dtypes). Build the layer with "
                        "dtype=jnp.complex64 (or complex128) for complex inputs.")
    return state.set(index, new)


def _params(module: Any) -> dict[str, Array]:
    return {k: v for k, v in (("scale", module.weight), ("bias", module.bias)) if v is not None}


def _with_state(y: Array, state: Any) -> Any:
    return y if state is _NO_STATE else (y, state)


class BatchNorm(eqx.nn.StatefulLayer):
    """Batch normalization: ``(x - mean) * rsqrt(var + eps) * weight + bias``, statistics over the batch ``vmap``.

    torch.nn.BatchNorm{1,2,3}d for Equinox, with equinox.nn.BatchNorm's keywords. Input: one example ``(C, ...)``
    under ``jax.vmap(..., axis_name=axis_name)`` (a vmap over zero examples counts the batch and keeps the
    statistics, as PyTorch does an empty batch).

    Args:
      input_size: the channels C.
      axis_name: the batch vmap's axis name (or names).
      eps: added to the variance.
      channelwise_affine: a per-channel weight and bias.
      use_bias: False is PyTorch 2.x's ``bias=False`` (a weight, no bias).
      torch_momentum: the weight of the new batch (default 0.1; None: the cumulative average).
      flax_momentum: the decay of the old average (equinox's own ``momentum=0.99`` convention); give one of two.
      inference: normalize with the running statistics (also a call argument, or ``eqx.nn.inference_mode``).
      dtype: the params' and running statistics' dtype (None: the default float).
      momentum: a TypeError that says which convention to use.
      mode: equinox's; only ``"batch"`` (its meaning here) is accepted.
    """

    weight: Array | None
    bias: Array | None
    state_index: eqx.nn.StateIndex
    inference: bool
    axis_name: Hashable | Sequence[Hashable] = eqx.field(static=True)
    eps: float = eqx.field(static=True)
    momentum: float | None = eqx.field(static=True)
    running_var_unbiased: bool = eqx.field(static=True)
    input_size: int = eqx.field(static=True)
    channelwise_affine: bool = eqx.field(static=True)

    def __init__(self, input_size: int, axis_name: Hashable | Sequence[Hashable], eps: float = 1e-5,
                 channelwise_affine: bool = True, *, use_bias: bool = True, torch_momentum: float | None = 0.1,
                 flax_momentum: float | None = None, inference: bool = False, dtype: Any = None,
                 momentum: Any = _UNSET, mode: str | None = None):
        _init_batch_norm(self, input_size, axis_name, eps, channelwise_affine, use_bias, torch_momentum,
                         flax_momentum, inference, dtype, momentum, mode, torch_default=0.1)

    def __call__(self, x: Array, state: eqx.nn.State, *, key: Any = None,
                 inference: bool | None = None) -> tuple[Array, eqx.nn.State]:
        """Args: x, one example; state; key: unused; inference: overrides the attribute. Returns: (y, state)."""
        return _batch_norm(self, jaxnorm.batch_norm, x, state, inference)


class BatchRenorm(eqx.nn.StatefulLayer):
    """Batch renormalization (Ioffe, 2017): ``(x_hat * r + d) * weight + bias``, ``x_hat`` batch-normalized, with
    ``r`` and ``d`` clipped to bounds that follow the paper's schedule (as ``jaxnorm.linen.BatchRenorm``).

    BatchNorm's arguments (``torch_momentum`` defaults to the paper's 0.01), plus ``r_max``, ``d_max``,
    ``warmup_steps``, ``relax_steps`` and ``batch_var_unbiased``. The step is the state's ``count``, so a saved
    ``eqx.nn.State`` resumes the schedule.
    """

    weight: Array | None
    bias: Array | None
    state_index: eqx.nn.StateIndex
    inference: bool
    axis_name: Hashable | Sequence[Hashable] = eqx.field(static=True)
    eps: float = eqx.field(static=True)
    momentum: float | None = eqx.field(static=True)
    running_var_unbiased: bool = eqx.field(static=True)
    input_size: int = eqx.field(static=True)
    channelwise_affine: bool = eqx.field(static=True)
    r_max: float = eqx.field(static=True)
    d_max: float = eqx.field(static=True)
    warmup_steps: int = eqx.field(static=True)
    relax_steps: int = eqx.field(static=True)
    batch_var_unbiased: bool = eqx.field(static=True)

    def __init__(self, input_size: int, axis_name: Hashable | Sequence[Hashable], eps: float = 1e-5,
                 channelwise_affine: bool = True, *, r_max: float = 3.0, d_max: float = 5.0, warmup_steps: int = 5_000,
                 relax_steps: int = 40_000, batch_var_unbiased: bool = False, use_bias: bool = True,
                 torch_momentum: float | None = 0.01, flax_momentum: float | None = None, inference: bool = False,
                 dtype: Any = None, momentum: Any = _UNSET, mode: str | None = None):
        _init_batch_norm(self, input_size, axis_name, eps, channelwise_affine, use_bias, torch_momentum,
                         flax_momentum, inference, dtype, momentum, mode, torch_default=0.01)
        self.r_max, self.d_max, self.batch_var_unbiased = r_max, d_max, batch_var_unbiased
        self.warmup_steps, self.relax_steps = warmup_steps, relax_steps

    def __call__(self, x: Array, state: eqx.nn.State, *, key: Any = None,
                 inference: bool | None = None) -> tuple[Array, eqx.nn.State]:
        """As ``BatchNorm.__call__``."""
        return _batch_norm(self, jaxnorm.batch_renorm, x, state, inference, r_max=self.r_max, d_max=self.d_max,
                           warmup_steps=self.warmup_steps, relax_steps=self.relax_steps,
                           batch_var_unbiased=self.batch_var_unbiased)


def _init_batch_norm(module, input_size, axis_name, eps, channelwise_affine, use_bias, torch_momentum, flax_momentum,
                     inference, dtype, momentum, mode, *, torch_default) -> None:
    """BatchNorm's and BatchRenorm's fields, checked."""
    layer = type(module).__name__
    no_plain_momentum(momentum, layer, _UNSET)
    if mode not in (None, "batch"):
        raise ValueError(
            f"{layer}: `mode`={mode!r} is not supported: jaxnorm's {layer} always normalizes a training "
            "batch with its own statistics and inference with the running ones (equinox's mode='batch', "
            "PyTorch's semantics). Drop `mode` or pass mode='batch'."
        )
    params, stats = jaxnorm.batch_norm_init(input_size, affine=channelwise_affine, bias=use_bias, dtype=_dtype(dtype))
    module.weight, module.bias = params.get("scale"), params.get("bias")
    module.state_index = eqx.nn.StateIndex(stats)
    module.inference, module.axis_name, module.eps = inference, axis_name, eps
    convention = resolve_momentum(torch_momentum, flax_momentum, layer, torch_default)
    module.momentum, module.running_var_unbiased = convention.momentum, convention.unbiased
    module.input_size, module.channelwise_affine = input_size, channelwise_affine


def _batch_norm(module, fn, x, state, inference, **kw):
    """BatchNorm's and BatchRenorm's call: ``fn`` on the batch of one ``x[None]`` under the vmap's named axis."""
    training = not bool(module.inference if inference is None else inference)
    y, new = fn(_params(module), state.get(module.state_index), x[None], training=training, axis=1,
                momentum=module.momentum, eps=module.eps, axis_name=module.axis_name if training else None,
                running_var_unbiased=module.running_var_unbiased, **kw)
    return y[0], (_set_state(state, module.state_index, new, type(module).__name__) if training else state)


class InstanceNorm(eqx.nn.StatefulLayer):
    """torch.nn.InstanceNorm{1,2,3}d for Equinox (equinox has none): one example ``(C, *spatial)``, each channel
    normalized over its spatial positions. PyTorch's defaults (no affine, no running statistics; ``use_bias=False``
    with ``channelwise_affine=True``: PyTorch 2.x's ``bias=False``);
    ``track_running_stats=True`` needs the ``axis_name`` of the batch ``vmap`` (the running statistics are the
    batch average of the per-instance ones, as PyTorch's)."""

    weight: Array | None
    bias: Array | None
    state_index: eqx.nn.StateIndex | None
    inference: bool
    axis_name: Hashable | Sequence[Hashable] | None = eqx.field(static=True)
    eps: float = eqx.field(static=True)
    momentum: float | None = eqx.field(static=True)
    input_size: int = eqx.field(static=True)

    def __init__(self, input_size: int, axis_name: Hashable | Sequence[Hashable] | None = None, eps: float = 1e-5,
                 channelwise_affine: bool = False, *, use_bias: bool = True, track_running_stats: bool = False,
                 torch_momentum: float | None = 0.1, flax_momentum: float | None = None, inference: bool = False,
                 dtype: Any = None, momentum: Any = _UNSET):
        no_plain_momentum(momentum, "InstanceNorm", _UNSET)
        if track_running_stats and axis_name is None:
            raise ValueError(
                "InstanceNorm: `track_running_stats=True` averages the per-instance statistics over the batch, so "
                "it needs the `axis_name` of the batch vmap, e.g. InstanceNorm(C, axis_name='batch', ...).")
        params, stats = jaxnorm.instance_norm_init(input_size, affine=channelwise_affine, bias=use_bias,
                                                   track_running_stats=track_running_stats, dtype=_dtype(dtype))
        self.weight, self.bias = params.get("scale"), params.get("bias")
        self.state_index = eqx.nn.StateIndex(stats) if stats else None
        self.inference, self.axis_name, self.eps, self.input_size = inference, axis_name, eps, input_size
        self.momentum = resolve_momentum(torch_momentum, flax_momentum, "InstanceNorm").momentum

    def is_stateful(self) -> bool:
        return self.state_index is not None

    def __call__(self, x: Array, state: Any = _NO_STATE, *, key: Any = None, inference: bool | None = None):
        training = not bool(self.inference if inference is None else inference)
        stats = state.get(self.state_index) if self.state_index is not None and state is not _NO_STATE else {}
        y, new = jaxnorm.instance_norm(_params(self), stats, x, training=training, batched=False,
                                       momentum=self.momentum, eps=self.eps,
                                       batch_axis_name=self.axis_name if stats else None)
        if stats and training:
            state = _set_state(state, self.state_index, new, "InstanceNorm")
        return _with_state(y, state)


class LayerNorm(eqx.Module):
    """Layer normalization: ``(x - mean) * rsqrt(var + eps) * weight + bias`` over the trailing ``shape`` dims.

    torch.nn.LayerNorm / equinox.nn.LayerNorm.

    Args:
      shape: the trailing dims to normalize over, and the params' shape.
      eps: added to the variance.
      use_weight, use_bias: the per-element weight and bias (default: both).
      dtype: the params' dtype (None: the default float).
      elementwise_affine: equinox's older name for both, not together with them.
    """

    weight: Array | None
    bias: Array | None
    shape: tuple[int, ...] = eqx.field(static=True)
    eps: float = eqx.field(static=True)

    def __init__(self, shape: int | Sequence[int], eps: float = 1e-5, use_weight: bool | None = None,
                 use_bias: bool | None = None, dtype: Any = None, *, elementwise_affine: bool | None = None):
        if elementwise_affine is not None and (use_weight is not None or use_bias is not None):
            raise ValueError(f"LayerNorm: got both `elementwise_affine`={elementwise_affine!r} and `use_weight`/"
                             "`use_bias`; give one of them.")
        on = True if elementwise_affine is None else elementwise_affine
        self.shape, self.weight, self.bias = _trailing_params(shape, on if use_weight is None else use_weight,
                                                              on if use_bias is None else use_bias, dtype, "LayerNorm")
        self.eps = eps

    def __call__(self, x: Array, state: Any = _NO_STATE, *, key: Any = None):
        """Args: x, one example; state: passed through. Returns: y (and state, if given)."""
        return _with_state(jaxnorm.layer_norm(_params(self), x, normalized_shape=self.shape, eps=self.eps), state)


class RMSNorm(eqx.Module):
    """RMS normalization: ``x * rsqrt(mean(x**2) + eps) * weight + bias`` over the trailing ``shape`` dims.

    torch.nn.RMSNorm / equinox.nn.RMSNorm, with equinox's defaults (weight and bias on, eps 1e-5); arguments as
    LayerNorm's.
    """

    weight: Array | None
    bias: Array | None
    shape: tuple[int, ...] = eqx.field(static=True)
    eps: float = eqx.field(static=True)

    def __init__(self, shape: int | Sequence[int], eps: float = 1e-5, use_weight: bool = True, use_bias: bool = True,
                 dtype: Any = None):
        self.shape, self.weight, self.bias = _trailing_params(shape, use_weight, use_bias, dtype, "RMSNorm")
        self.eps = eps

    def __call__(self, x: Array, state: Any = _NO_STATE, *, key: Any = None):
        """As ``LayerNorm.__call__``."""
        return _with_state(jaxnorm.rms_norm(_params(self), x, normalized_shape=self.shape, eps=self.eps), state)


def _trailing_params(shape, use_weight, use_bias, dtype, layer):
    """``(shape, weight, bias)`` of a norm over trailing dims, None for a param not used."""
    shape = normalized_shape_tuple(shape, layer)
    params = jaxnorm.layer_norm_init(shape, dtype=_dtype(dtype))
    return shape, (params["scale"] if use_weight else None), (params["bias"] if use_bias else None)


class GroupNorm(eqx.Module):
    """torch.nn.GroupNorm / equinox.nn.GroupNorm: ``groups`` contiguous groups of the ``channels`` of one example
    ``(C, *spatial)``; ``use_bias=False`` is PyTorch 2.x's ``bias=False``."""

    weight: Array | None
    bias: Array | None
    groups: int = eqx.field(static=True)
    channels: int | None = eqx.field(static=True)
    eps: float = eqx.field(static=True)

    def __init__(self, groups: int, channels: int | None = None, eps: float = 1e-5, channelwise_affine: bool = True,
                 dtype: Any = None, *, use_bias: bool = True):
        if channelwise_affine and channels is None:
            raise ValueError("GroupNorm: `channels` is needed for the per-channel weight and bias "
                             "(or pass channelwise_affine=False).")
        params = jaxnorm.group_norm_init(groups, channels, affine=channelwise_affine, bias=use_bias,
                                         dtype=_dtype(dtype)) if channels is not None else {}
        self.weight, self.bias = params.get("scale"), params.get("bias")
        self.groups, self.channels, self.eps = groups, channels, eps

    def __call__(self, x: Array, state: Any = _NO_STATE, *, key: Any = None):
        y = jaxnorm.group_norm(_params(self), x[None], num_groups=self.groups, axis=1, eps=self.eps)[0]
        return _with_state(y, state)


__all__ = ["BatchNorm", "BatchRenorm", "GroupNorm", "InstanceNorm", "LayerNorm", "RMSNorm"]
