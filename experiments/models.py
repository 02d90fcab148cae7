"""Flax twins of real PyTorch models, built from jaxnorm layers, for whole-model parity, benchmarks and fine-tuning.

Each twin declares its modules in the PyTorch model's order, so ``jaxnorm.interop.derive_names`` pairs them with
the torch ``state_dict`` without a hand-written mapping.

torchvision: ``pip install torchvision==0.28.0 --no-deps`` next to the CPU build of torch 2.13.0. That wheel's
compiled operators (``torchvision/_C.so``) link against CUDA libraries the CPU torch build lacks, so ``import
torchvision`` fails (``operator torchvision::nms does not exist``); the model definitions themselves are plain
Python. :func:`torchvision_models` imports ``torchvision.models`` without running ``torchvision/__init__.py``
when a normal import fails, which is all model definitions need.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import sys
import types
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jaxnorm import linen as jl


def torchvision_models() -> types.ModuleType:
    """``torchvision.models``, importable even where torchvision's compiled operators cannot load."""
    try:
        import torchvision.models as models

        return models
    except (ImportError, OSError, RuntimeError) as error:
        spec = importlib.util.find_spec("torchvision")
        if spec is None or not spec.submodule_search_locations:
            raise ImportError("torchvision is not installed: pip install torchvision==0.28.0 --no-deps "
                              "(next to torch==2.13.0)") from error
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]  # the failed import's half-initialised modules
        package = types.ModuleType("torchvision")
        package.__path__ = list(spec.submodule_search_locations)
        package.__spec__ = spec
        sys.modules["torchvision"] = package  # a bare package: its __init__ (which loads _C.so) never runs
        return importlib.import_module("torchvision.models")


# ------------------------------------------------------------------------------------------- ResNet


def jaxnorm_batch_norm(use_running_average: bool, **kwargs: Any) -> nn.Module:
    """jaxnorm's BatchNorm with PyTorch's defaults (momentum 0.1 of the new batch, eps 1e-5)."""
    return jl.BatchNorm(use_running_average=use_running_average, **kwargs)


def flax_batch_norm(use_running_average: bool, **kwargs: Any) -> nn.Module:
    """flax.linen.BatchNorm set to PyTorch's numbers (momentum 0.9 of the old average, epsilon 1e-5)."""
    return nn.BatchNorm(use_running_average=use_running_average, momentum=0.9, epsilon=1e-5, **kwargs)


class BasicBlock(nn.Module):
    """torchvision's ``BasicBlock`` (conv3x3-BN-ReLU-conv3x3-BN, plus a 1x1 conv-BN downsample), NHWC."""

    features: int
    strides: int = 1
    norm: Callable[..., nn.Module] = jaxnorm_batch_norm

    @nn.compact
    def __call__(self, x, train: bool = False):
        norm = functools.partial(self.norm, use_running_average=not train)
        y = nn.Conv(self.features, (3, 3), self.strides, padding=1, use_bias=False)(x)
        y = nn.relu(norm()(y))
        y = nn.Conv(self.features, (3, 3), padding=1, use_bias=False)(y)
        y = norm()(y)
        if self.strides != 1 or x.shape[-1] != self.features:
            x = nn.Conv(self.features, (1, 1), self.strides, use_bias=False)(x)  # created before its norm,
            x = norm()(x)  # as torch registers them
        return nn.relu(y + x)


class ResNet(nn.Module):
    """torchvision's ResNet with BasicBlocks (``stage_sizes=(2, 2, 2, 2)`` is ResNet-18), NHWC inputs."""

    stage_sizes: tuple[int, ...] = (2, 2, 2, 2)
    num_classes: int = 1000
    norm: Callable[..., nn.Module] = jaxnorm_batch_norm

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(64, (7, 7), 2, padding=3, use_bias=False)(x)
        x = nn.relu(self.norm(use_running_average=not train)(x))
        x = nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
        for i, blocks in enumerate(self.stage_sizes):
            for j in range(blocks):
                x = BasicBlock(64 * 2**i, 2 if i > 0 and j == 0 else 1, self.norm)(x, train)
        return nn.Dense(self.num_classes)(jnp.mean(x, axis=(1, 2)))


ResNet18 = functools.partial(ResNet, stage_sizes=(2, 2, 2, 2))
