"""One registry of every layer: how to build jaxnorm state and a call from a PyTorch layer configuration.

Used by the fixture tests, the transform tests and the property tests, so each runs over every layer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax.numpy as jnp

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
