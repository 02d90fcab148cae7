"""flax.linen.SpectralNorm and flax.linen.WeightNorm on jaxnorm.spectral_norm / jaxnorm.weight_norm, wrapping any
linen layer, with Flax's fields in Flax's order and Flax's variables (re-exported by ``jaxnorm.linen``)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

import jaxnorm
from jaxnorm._conventions import feature_axes

Array = jax.Array
Axes = int | Sequence[int]


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
