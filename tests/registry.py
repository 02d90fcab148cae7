"""One registry of every layer: how to build jaxnorm state and a call from a PyTorch layer configuration.

Used by the fixture tests, the transform tests and the property tests, so each runs over every layer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import jaxnorm


@dataclasses.dataclass(frozen=True)
class Built:
    params: dict
    batch_stats: dict
    apply: Callable[..., Any]  # apply(params, batch_stats, x, *, training, axis) -> (y, batch_stats)
    channel_axis: bool  # True when `axis` selects the channel (BN/IN/GN); False for trailing-dims layers


def build(torch_cls: str, ctor: dict, dtype: Any = jnp.float32) -> Built:
    """jaxnorm state and call equivalent to ``getattr(torch.nn, torch_cls)(**ctor)``."""
    ctor = dict(ctor)
    eps = ctor.get("eps", 1e-5)
    if torch_cls.startswith(("BatchNorm", "InstanceNorm")):
        is_bn = torch_cls.startswith("BatchNorm")
        init, fn = (jaxnorm.batch_norm_init, jaxnorm.batch_norm) if is_bn else (
            jaxnorm.instance_norm_init, jaxnorm.instance_norm)
        params, stats = init(
            ctor["num_features"],
            affine=ctor.get("affine", is_bn),
            track_running_stats=ctor.get("track_running_stats", is_bn),
            dtype=dtype,
        )
        momentum = ctor.get("momentum", 0.1)

        def apply(p, s, x, *, training, axis=1):
            return fn(p, s, x, training=training, axis=axis, momentum=momentum, eps=eps)

        return Built(params, stats, apply, True)
    if torch_cls == "GroupNorm":
        g = ctor["num_groups"]
        params = jaxnorm.group_norm_init(g, ctor["num_channels"], affine=ctor.get("affine", True), dtype=dtype)

        def apply(p, s, x, *, training, axis=1):
            return jaxnorm.group_norm(p, x, num_groups=g, axis=axis, eps=eps), s

        return Built(params, {}, apply, True)
    if torch_cls in ("LayerNorm", "RMSNorm"):
        shape = tuple(ctor["normalized_shape"])
        affine = ctor.get("elementwise_affine", True)
        if torch_cls == "LayerNorm":
            params = jaxnorm.layer_norm_init(shape, elementwise_affine=affine, bias=ctor.get("bias", True),
                                             dtype=dtype)
            fn = jaxnorm.layer_norm
        else:
            params = jaxnorm.rms_norm_init(shape, elementwise_affine=affine, dtype=dtype)
            eps = ctor.get("eps")
            fn = jaxnorm.rms_norm

        def apply(p, s, x, *, training, axis=-1):
            return fn(p, x, normalized_shape=shape, eps=eps), s

        return Built(params, {}, apply, False)
    if torch_cls == "LocalResponseNorm":
        def apply(p, s, x, *, training, axis=1):
            return jaxnorm.local_response_norm(x, axis=axis, **ctor), s

        return Built({}, {}, apply, True)
    raise KeyError(torch_cls)


# Representative configurations for transform tests: (torch class, ctor, input shape).
LAYERS = [
    ("BatchNorm1d", {"num_features": 3}, (4, 3)),
    ("BatchNorm2d", {"num_features": 3}, (4, 3, 5, 2)),
    ("BatchNorm3d", {"num_features": 2, "momentum": None}, (3, 2, 2, 3, 2)),
    ("InstanceNorm2d", {"num_features": 3, "affine": True, "track_running_stats": True}, (2, 3, 4, 5)),
    ("LayerNorm", {"normalized_shape": [4, 5]}, (2, 3, 4, 5)),
    ("GroupNorm", {"num_groups": 2, "num_channels": 4}, (2, 4, 3, 5)),
    ("RMSNorm", {"normalized_shape": [6]}, (3, 6)),
]


# ------------------------------------------------------------------ every layer in every mode, for the transforms


@dataclasses.dataclass(frozen=True)
class Mode:
    """One layer in one mode: jaxnorm's call and the textbook formula, both ``(x, params, stats) -> (y, stats)``.

    ``make(dtype)`` returns ``(x, params, stats)`` with non-trivial values (scale and bias off 1 and 0, running
    statistics off their initial values), so no derivative is accidentally zero.
    """

    name: str
    make: Callable[[Any], tuple[Any, Any, Any]]
    call: Callable[[Any, Any, Any], tuple[Any, Any]]
    textbook: Callable[[Any, Any, Any], tuple[Any, Any]]
    wrapper: bool = False  # a linen/NNX module over one of the core modes: declares variables, adds no math
    complex: bool = False  # complex x (complex64 for float32, complex128 for float64), real params and state

    @property
    def core(self) -> bool:
        return not self.wrapper


_VALUES = {"scale": (0.5, 1.5), "bias": (-0.3, 0.4), "mean": (-0.2, 0.3), "var": (0.7, 1.6)}


def _filled(tree, dtype):
    """``tree`` (dicts, linen variables or NNX states) with each float leaf set to a spread of values chosen by its
    name (scale, bias, mean, var); integer leaves (the batch counter) set to 3."""
    def fill(path, v):
        if not jnp.issubdtype(v.dtype, jnp.floating):
            return jnp.full(v.shape, 3, v.dtype)
        low, high = _VALUES[[k.key for k in path if isinstance(k, jax.tree_util.DictKey)][-1]]
        return jnp.linspace(low, high, v.size, dtype=dtype).reshape(v.shape)

    return jax.tree_util.tree_map_with_path(fill, tree)


def _channel_state(c, dtype, stats=True):
    params = _filled({"scale": jnp.zeros(c), "bias": jnp.zeros(c)}, dtype)
    running = {"mean": jnp.zeros(c), "var": jnp.zeros(c), "count": jnp.zeros((), jnp.int32)}
    return params, (_filled(running, dtype) if stats else {})


def _input(shape, dtype, seed=0):
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.normal(size=shape) * 1.5 + 0.7, dtype)


def _channel_mode(name, shape, c, call, textbook, stats=True):
    return Mode(name, lambda dt: (_input(shape, dt), *_channel_state(c, dt, stats)), call, textbook)


def _trailing_mode(name, shape, pshape, call, textbook, bias=True):
    keys = ("scale", "bias") if bias else ("scale",)
    return Mode(name, lambda dt: (_input(shape, dt), _filled({k: jnp.zeros(pshape) for k in keys}, dt), {}),
                call, textbook)


def _complex_mode(mode):
    """``mode`` with a complex x: the real x plus i times another spread of values."""
    def make(dt):
        x, p, s = mode.make(dt)
        return jax.lax.complex(x, _input(x.shape, dt, seed=1) * 0.6 - 0.2), p, s

    return Mode(f"{mode.name}/complex", make, mode.call, mode.textbook, complex=True)


def _no_stats(fn):
    return lambda x, p, s: (fn(p, x), s)


_MASK = jnp.asarray([True, False, True, True]).reshape(4, 1, 1)
_SPATIAL_MASK = jnp.asarray([True, False, True]).reshape(1, 1, 3, 1)
_CHANNEL_MASK = jnp.asarray([True, False, True]).reshape(1, 3, 1)
_LAST_MASK = jnp.asarray([True, True, False, True, False]).reshape(1, 1, 5)
_GROUP_MASK = jnp.asarray([[True, False, True], [False, True, True], [True, True, False], [True, False, False]]
                          ).reshape(1, 4, 3)


def _axis_name_bn(x, p, s):  # per-example calls under vmap, statistics over the mapped axis (SyncBatchNorm)
    y, new = jax.vmap(lambda xi: jaxnorm.batch_norm(p, s, xi[None], training=True, axis=1, axis_name="i"),
                      axis_name="i")(x)
    return y[:, 0], jax.tree.map(lambda t: t[0], new)


def _linen(module, shape):
    """A linen module as ``(call, make)``, its variables filled by name."""
    def make(dt):
        x = _input(shape, dt)
        variables = _filled(module.init(jax.random.key(0), x), dt)
        return x, variables.get("params", {}), variables.get("batch_stats", {})

    def call(x, p, s):
        variables = {"params": p, **({"batch_stats": s} if s else {})}
        if s:
            y, new = module.apply(variables, x, mutable=["batch_stats"])
            return y, new["batch_stats"]
        return module.apply(variables, x), s

    return call, make


def _nnx(make_module, shape):
    """An NNX module as ``(call, make)``: rebuilt with nnx.merge inside the traced function."""
    from flax import nnx

    graphdef = nnx.graphdef(make_module())

    def make(dt):
        _, params, stats = nnx.split(make_module(), nnx.Param, nnx.BatchStat)
        return _input(shape, dt), _filled(params, dt), _filled(stats, dt)

    def call(x, p, s):
        model = nnx.merge(graphdef, p, s)
        y = model(x)
        return y, nnx.split(model, nnx.Param, nnx.BatchStat)[2]

    return call, make


def _modes():
    from jaxnorm import linen as jl
    from jaxnorm import nnx as jn
    from tests import textbook as tb

    bn = jaxnorm.batch_norm
    modes = [
        _channel_mode("batch_norm/train/2d", (3, 2, 2, 2), 2,
                      lambda x, p, s: bn(p, s, x, training=True),
                      lambda x, p, s: tb.batch_norm(p, s, x, training=True)),
        _channel_mode("batch_norm/train/1d/cumulative", (5, 3), 3,
                      lambda x, p, s: bn(p, s, x, training=True, momentum=None),
                      lambda x, p, s: tb.batch_norm(p, s, x, training=True, momentum=None)),
        _channel_mode("batch_norm/train/channels_last", (3, 2, 2, 2), 2,
                      lambda x, p, s: bn(p, s, x, training=True, axis=-1),
                      lambda x, p, s: tb.batch_norm(p, s, x, training=True, axis=-1)),
        _channel_mode("batch_norm/eval", (3, 2, 4), 2,
                      lambda x, p, s: bn(p, s, x, training=False),
                      lambda x, p, s: tb.batch_norm(p, s, x, training=False)),
        _channel_mode("batch_norm/eval/no_running_stats", (3, 2, 4), 2,
                      lambda x, p, s: bn(p, s, x, training=False),
                      lambda x, p, s: tb.batch_norm(p, s, x, training=False), stats=False),
        _channel_mode("batch_norm/train/mask", (4, 2, 3), 2,
                      lambda x, p, s: bn(p, s, x, training=True, mask=_MASK),
                      lambda x, p, s: tb.batch_norm(p, s, x, training=True, mask=_MASK)),
        _channel_mode("batch_norm/train/axis_name", (4, 2, 3), 2, _axis_name_bn,
                      lambda x, p, s: tb.batch_norm(p, s, x, training=True)),
        _channel_mode("batch_norm/train/virtual_batch_size", (4, 2, 3), 2,
                      lambda x, p, s: bn(p, s, x, training=True, virtual_batch_size=2),
                      lambda x, p, s: tb.ghost_batch_norm(p, s, x, virtual_batch_size=2)),
        _channel_mode("instance_norm/train", (2, 2, 3, 2), 2,
                      lambda x, p, s: jaxnorm.instance_norm(p, s, x, training=True),
                      lambda x, p, s: tb.instance_norm(p, s, x, training=True)),
        _channel_mode("instance_norm/eval", (2, 2, 3, 2), 2,
                      lambda x, p, s: jaxnorm.instance_norm(p, s, x, training=False),
                      lambda x, p, s: tb.instance_norm(p, s, x, training=False)),
        _trailing_mode("layer_norm", (2, 3, 4), (3, 4),
                       _no_stats(lambda p, x: jaxnorm.layer_norm(p, x, normalized_shape=(3, 4))),
                       _no_stats(lambda p, x: tb.layer_norm(p, x, normalized_shape=(3, 4)))),
        _trailing_mode("rms_norm", (3, 2, 5), (5,),
                       _no_stats(lambda p, x: jaxnorm.rms_norm(p, x, normalized_shape=(5,), eps=1e-5)),
                       _no_stats(lambda p, x: tb.rms_norm(p, x, normalized_shape=(5,), eps=1e-5)), bias=False),
        _channel_mode("group_norm", (2, 4, 3), 4,
                      _no_stats(lambda p, x: jaxnorm.group_norm(p, x, num_groups=2)),
                      _no_stats(lambda p, x: tb.group_norm(p, x, num_groups=2)), stats=False),
        _channel_mode("group_norm/channels_last", (2, 3, 2, 4), 4,
                      _no_stats(lambda p, x: jaxnorm.group_norm(p, x, num_groups=2, axis=-1)),
                      _no_stats(lambda p, x: tb.group_norm(p, x, num_groups=2, axis=-1)), stats=False),
        _channel_mode("instance_norm/train/mask", (2, 2, 3, 2), 2,
                      lambda x, p, s: jaxnorm.instance_norm(p, s, x, training=True, mask=_SPATIAL_MASK),
                      lambda x, p, s: tb.instance_norm(p, s, x, training=True, mask=_SPATIAL_MASK)),
        _channel_mode("layer_norm/channels_first/mask", (2, 3, 4), 3,
                      _no_stats(lambda p, x: jaxnorm.layer_norm(p, x, reduction_axes=1, mask=_CHANNEL_MASK)),
                      _no_stats(lambda p, x: tb.layer_norm(p, x, channel_axis=1, mask=_CHANNEL_MASK)), stats=False),
        _trailing_mode("rms_norm/mask", (3, 2, 5), (5,),
                       _no_stats(lambda p, x: jaxnorm.rms_norm(p, x, normalized_shape=(5,), eps=1e-5, mask=_LAST_MASK)),
                       _no_stats(lambda p, x: tb.rms_norm(p, x, normalized_shape=(5,), eps=1e-5, mask=_LAST_MASK)),
                       bias=False),
        _channel_mode("group_norm/mask", (2, 4, 3), 4,
                      _no_stats(lambda p, x: jaxnorm.group_norm(p, x, num_groups=2, mask=_GROUP_MASK)),
                      _no_stats(lambda p, x: tb.group_norm(p, x, num_groups=2, mask=_GROUP_MASK)), stats=False),
        _channel_mode("batch_renorm/train", (4, 2, 3), 2,
                      lambda x, p, s: jaxnorm.batch_renorm(p, s, x, training=True, r_max=1.2, d_max=0.3),
                      lambda x, p, s: tb.batch_renorm(p, s, x, training=True, r_max=1.2, d_max=0.3, momentum=0.01)),
        _channel_mode("batch_renorm/eval", (4, 2, 3), 2,
                      lambda x, p, s: jaxnorm.batch_renorm(p, s, x, training=False),
                      lambda x, p, s: tb.batch_renorm(p, s, x, training=False, r_max=3.0, d_max=5.0)),
        _channel_mode("frozen_batch_norm", (3, 2, 4), 2,
                      lambda x, p, s: (jaxnorm.frozen_batch_norm(p, s, x), s),
                      lambda x, p, s: (tb.frozen_batch_norm(p, s, x), s)),
    ]
    by_name = {m.name: m for m in modes}  # complex x: plain autodiff, under every transformation too
    modes += [_complex_mode(by_name[name]) for name in ("batch_norm/train/mask", "instance_norm/train",
                                                        "layer_norm", "rms_norm", "group_norm")]
    last = dict(axis=-1)
    linen = [
        ("linen.BatchNorm", jl.BatchNorm(use_running_average=False), (3, 2, 2),
         lambda x, p, s: tb.batch_norm(p, s, x, training=True, **last)),
        ("linen.InstanceNorm", jl.InstanceNorm(affine=True, track_running_stats=True, use_running_average=False),
         (2, 3, 2, 2), lambda x, p, s: tb.instance_norm(p, s, x, training=True, **last)),
        ("linen.LayerNorm", jl.LayerNorm(), (3, 4),
         lambda x, p, s: (tb.layer_norm(p, x, normalized_shape=(4,)), s)),
        ("linen.GroupNorm", jl.GroupNorm(num_groups=2), (2, 3, 4),
         lambda x, p, s: (tb.group_norm(p, x, num_groups=2, **last), s)),
        ("linen.RMSNorm", jl.RMSNorm(epsilon=1e-5), (3, 4),
         lambda x, p, s: (tb.rms_norm(p, x, normalized_shape=(4,), eps=1e-5), s)),
    ]
    for name, module, shape, textbook in linen:
        call, make = _linen(module, shape)
        modes.append(Mode(name, make, call, textbook, wrapper=True))
    nnx_modules = [
        ("nnx.BatchNorm", lambda: jn.BatchNorm(2), (3, 2, 2),
         lambda x, p, s: tb.batch_norm(p, s, x, training=True, **last)),
        ("nnx.InstanceNorm", lambda: jn.InstanceNorm(2, affine=True, track_running_stats=True), (2, 3, 2, 2),
         lambda x, p, s: tb.instance_norm(p, s, x, training=True, **last)),
        ("nnx.LayerNorm", lambda: jn.LayerNorm(4), (3, 4),
         lambda x, p, s: (tb.layer_norm(p, x, normalized_shape=(4,)), s)),
        ("nnx.GroupNorm", lambda: jn.GroupNorm(4, num_groups=2), (2, 3, 4),
         lambda x, p, s: (tb.group_norm(p, x, num_groups=2, **last), s)),
        ("nnx.RMSNorm", lambda: jn.RMSNorm(4, epsilon=1e-5), (3, 4),
         lambda x, p, s: (tb.rms_norm(p, x, normalized_shape=(4,), eps=1e-5), s)),
    ]
    for name, make_module, shape, textbook in nnx_modules:
        call, make = _nnx(make_module, shape)
        modes.append(Mode(name, make, call, _nnx_textbook(textbook), wrapper=True))
    return modes


def _nnx_textbook(textbook):
    """The textbook formula over NNX's variable trees (``State({"scale": Param(...), ...})``)."""

    def call(x, p, s):
        y, new = textbook(x, {k: v[...] for k, v in p.items()}, {k: v[...] for k, v in s.items()})
        return y, jax.tree_util.tree_map_with_path(lambda path, _: new[path[0].key], s)

    return call


MODES = _modes()
CORE_MODES = [m for m in MODES if m.core]
