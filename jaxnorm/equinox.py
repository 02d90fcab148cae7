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

from collections.abc import Callable, Hashable, Sequence
from typing import Any, ClassVar

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
    """torch.nn.BatchNorm{1,2,3}d for Equinox, with equinox.nn.BatchNorm's keywords (``input_size``,
    ``axis_name``, ``eps``, ``channelwise_affine``, ``inference``, ``dtype``); ``use_bias=False`` is PyTorch 2.x's
    ``bias=False`` (a weight, no bias). Input: one example ``(C, ...)`` under ``jax.vmap(..., axis_name=axis_name)``
    (a vmap over zero examples counts the batch and keeps the statistics, as PyTorch does an empty batch)."""

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
    _fn: ClassVar[Callable[..., Any]] = staticmethod(jaxnorm.batch_norm)
    _torch_default: ClassVar[float] = 0.1  # torch_momentum's default (given with flax_momentum: an error)

    def __init__(self, input_size: int, axis_name: Hashable | Sequence[Hashable], eps: float = 1e-5,
                 channelwise_affine: bool = True, *, use_bias: bool = True, torch_momentum: float | None = 0.1,
                 flax_momentum: float | None = None, inference: bool = False, dtype: Any = None,
                 momentum: Any = _UNSET, mode: str | None = None):
        layer = type(self).__name__
        no_plain_momentum(momentum, layer, _UNSET)
        if mode not in (None, "batch"):
            raise ValueError(
                f"{layer}: `mode`={mode!r} is not supported: jaxnorm's {layer} always normalizes a training "
                "batch with its own statistics and inference with the running ones (equinox's mode='batch', "
                "PyTorch's semantics). Drop `mode` or pass mode='batch'."
            )
        params, stats = jaxnorm.batch_norm_init(input_size, affine=channelwise_affine, bias=use_bias,
                                                dtype=_dtype(dtype))
        self.weight, self.bias = params.get("scale"), params.get("bias")
        self.state_index = eqx.nn.StateIndex(stats)
        self.inference = inference
        self.axis_name = axis_name
        self.eps = eps
        momentum = resolve_momentum(torch_momentum, flax_momentum, layer, self._torch_default)
        self.momentum, self.running_var_unbiased = momentum.momentum, momentum.unbiased
        self.input_size, self.channelwise_affine = input_size, channelwise_affine

    def __call__(self, x: Array, state: eqx.nn.State, *, key: Any = None,
                 inference: bool | None = None) -> tuple[Array, eqx.nn.State]:
        inference = self.inference if inference is None else inference
        training = not bool(inference)
        y, new = self._fn(_params(self), state.get(self.state_index), x[None], training=training, axis=1,
                          momentum=self.momentum, eps=self.eps, axis_name=self.axis_name if training else None,
                          running_var_unbiased=self.running_var_unbiased, **self._keywords())
        return y[0], (_set_state(state, self.state_index, new, type(self).__name__) if training else state)

    def _keywords(self) -> dict[str, Any]:
        return {}


class BatchRenorm(BatchNorm):
    """Batch renormalization (Ioffe, 2017) with the paper's schedule: BatchNorm's keywords plus ``r_max``,
    ``d_max``, ``warmup_steps``, ``relax_steps`` and ``batch_var_unbiased`` (as ``jaxnorm.linen.BatchRenorm``).
    The step is the state's ``count``, so a saved ``eqx.nn.State`` resumes the schedule. ``torch_momentum``
    defaults to the paper's 0.01."""

    r_max: float = eqx.field(static=True)
    d_max: float = eqx.field(static=True)
    warmup_steps: int = eqx.field(static=True)
    relax_steps: int = eqx.field(static=True)
    batch_var_unbiased: bool = eqx.field(static=True)
    _fn: ClassVar[Callable[..., Any]] = staticmethod(jaxnorm.batch_renorm)
    _torch_default: ClassVar[float] = 0.01

    def __init__(self, input_size: int, axis_name: Hashable | Sequence[Hashable], eps: float = 1e-5,
                 channelwise_affine: bool = True, *, r_max: float = 3.0, d_max: float = 5.0, warmup_steps: int = 5_000,
                 relax_steps: int = 40_000, batch_var_unbiased: bool = False, torch_momentum: float | None = 0.01,
                 **keywords: Any):
        super().__init__(input_size, axis_name, eps, channelwise_affine, torch_momentum=torch_momentum, **keywords)
        self.r_max, self.d_max, self.batch_var_unbiased = r_max, d_max, batch_var_unbiased
        self.warmup_steps, self.relax_steps = warmup_steps, relax_steps

    def _keywords(self) -> dict[str, Any]:
        return {"r_max": self.r_max, "d_max": self.d_max, "warmup_steps": self.warmup_steps,
                "relax_steps": self.relax_steps, "batch_var_unbiased": self.batch_var_unbiased}


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


class _TrailingNorm(eqx.Module):
    """A norm over the trailing ``shape`` dims of one example, with an optional per-element weight and bias."""

    weight: Array | None
    bias: Array | None
    shape: tuple[int, ...] = eqx.field(static=True)
    eps: float = eqx.field(static=True)
    _norm: ClassVar[Callable[..., Array]]  # the functional layer: jaxnorm.layer_norm or jaxnorm.rms_norm

    def _setup(self, shape: Any, eps: float, use_weight: bool, use_bias: bool, dtype: Any, layer: str) -> None:
        self.shape = normalized_shape_tuple(shape, layer)
        params = jaxnorm.layer_norm_init(self.shape, dtype=_dtype(dtype))
        self.weight = params["scale"] if use_weight else None
        self.bias = params["bias"] if use_bias else None
        self.eps = eps

    def __call__(self, x: Array, state: Any = _NO_STATE, *, key: Any = None):
        return _with_state(self._norm(_params(self), x, normalized_shape=self.shape, eps=self.eps), state)


class LayerNorm(_TrailingNorm):
    """torch.nn.LayerNorm / equinox.nn.LayerNorm over the trailing ``shape`` dims (``use_weight``, ``use_bias``;
    equinox's older ``elementwise_affine`` too, not together with them)."""

    _norm = staticmethod(jaxnorm.layer_norm)

    def __init__(self, shape: int | Sequence[int], eps: float = 1e-5, use_weight: bool | None = None,
                 use_bias: bool | None = None, dtype: Any = None, *, elementwise_affine: bool | None = None):
        if elementwise_affine is not None and (use_weight is not None or use_bias is not None):
            raise ValueError(f"LayerNorm: got both `elementwise_affine`={elementwise_affine!r} and `use_weight`/"
                             "`use_bias`; give one of them.")
        on = True if elementwise_affine is None else elementwise_affine
        self._setup(shape, eps, on if use_weight is None else use_weight, on if use_bias is None else use_bias,
                    dtype, "LayerNorm")


class RMSNorm(_TrailingNorm):
    """torch.nn.RMSNorm / equinox.nn.RMSNorm over the trailing ``shape`` dims (``use_weight``, ``use_bias``:
    equinox's defaults, weight and bias on, eps 1e-5)."""

    _norm = staticmethod(jaxnorm.rms_norm)

    def __init__(self, shape: int | Sequence[int], eps: float = 1e-5, use_weight: bool = True, use_bias: bool = True,
                 dtype: Any = None):
        self._setup(shape, eps, use_weight, use_bias, dtype, "RMSNorm")


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
