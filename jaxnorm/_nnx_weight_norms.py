"""flax.nnx.SpectralNorm and flax.nnx.WeightNorm on jaxnorm.spectral_norm / jaxnorm.weight_norm, wrapping any
NNX layer (re-exported by ``jaxnorm.nnx``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

import jaxnorm
from jaxnorm._conventions import feature_axes as canonical_feature_axes
from jaxnorm._conventions import output_dtype

Array = jax.Array
Axes = int | Sequence[int]
_ones = nnx.initializers.ones_init()
_KERNEL = nnx.PathContains("kernel")


class _Reparametrized(nnx.Module):
    """Runs ``layer_instance`` with some of its params replaced by functions of them, then puts the originals
    back: the wrapped layer keeps its trainable (unnormalized) weights, and gradients reach them through the
    reparametrization, as with PyTorch's parametrizations and flax.linen's wrappers. (flax.nnx 0.12 instead
    overwrites the layer's params with the normalized ones at every call.)"""

    def _call_with(self, replace, x, *args, **kwargs):
        flat = list(nnx.to_flat_state(nnx.state(self.layer_instance, nnx.Param)))
        originals = [(param, param[...]) for _, param in flat]
        try:
            for path, param in flat:
                new = replace(path, param[...])
                if new is not None:
                    param[...] = new
            return self.layer_instance(x, *args, **kwargs)
        finally:
            for param, value in originals:
                param[...] = value


class SpectralNorm(_Reparametrized):
    """flax.nnx.SpectralNorm on jaxnorm.spectral_norm: every matrix param of ``layer_instance`` (higher ranks
    flattened to ``(-1, out)``) divided by its largest singular value during the call. ``batch_stats`` holds
    ``path + ("u",)`` ``(1, out)`` and ``path + ("sigma",)`` as in Flax; ``update_stats`` (default: the opposite
    of ``use_running_average``, so ``.train()``/``.eval()`` switch it) stores the refined ``u`` and ``sigma``."""

    def __init__(self, layer_instance: nnx.Module, *, n_steps: int = 1, epsilon: float = 1e-12, dtype: Any = None,
                 param_dtype: Any = jnp.float32, error_on_non_matrix: bool = False, update_stats: bool = True,
                 torch_order: bool = False, rngs: nnx.Rngs):
        self.layer_instance = layer_instance
        self.n_steps, self.epsilon, self.dtype, self.param_dtype = n_steps, epsilon, dtype, param_dtype
        self.error_on_non_matrix, self.torch_order = error_on_non_matrix, torch_order
        self.use_running_average = not update_stats
        stats = {}
        for path, param in nnx.to_flat_state(nnx.state(layer_instance, nnx.Param)):
            if param.ndim <= 1 or n_steps < 1:
                continue
            if param.ndim > 2 and error_on_non_matrix:
                raise ValueError(f"SpectralNorm: param {'/'.join(map(str, path))} is {param.ndim}D but "
                                 "error_on_non_matrix is True; pass error_on_non_matrix=False to flatten it.")
            key = rngs.params()
            stats[path + ("u",)] = nnx.BatchStat(jax.random.normal(key, (1, param.shape[-1]), param_dtype))
            stats[path + ("sigma",)] = nnx.BatchStat(jnp.ones((), param_dtype))
        self.batch_stats = nnx.data(stats)

    def __call__(self, x: Array, update_stats: bool | None = None, *args, **kwargs) -> Array:
        update = not self.use_running_average if update_stats is None else update_stats

        def replace(path, w):
            if path + ("u",) not in self.batch_stats:
                return None
            u_var, sigma_var = self.batch_stats[path + ("u",)], self.batch_stats[path + ("sigma",)]
            w_bar, u, sigma = jaxnorm.spectral_norm(w, u_var[...].reshape(-1), n_steps=self.n_steps,
                                                    eps=self.epsilon, axis=-1, torch_order=self.torch_order)
            if update:
                u_var[...] = u.reshape(1, -1).astype(u_var[...].dtype)
                sigma_var[...] = sigma.astype(sigma_var[...].dtype)
            return output_dtype(w_bar, self.dtype)

        return self._call_with(replace, x, *args, **kwargs)


class WeightNorm(_Reparametrized):
    """flax.nnx.WeightNorm on jaxnorm.weight_norm: the params of ``layer_instance`` that ``variable_filter``
    selects become ``scale * v / ||v||`` (norm over all but ``feature_axes``) during the call; the scales live in
    ``scales`` keyed by the param's path, as in Flax."""

    def __init__(self, layer_instance: nnx.Module, *, feature_axes: Axes | None = -1, use_scale: bool = True,
                 scale_init: Any = _ones, epsilon: float = 1e-12, dtype: Any = None, param_dtype: Any = jnp.float32,
                 variable_filter: Any = _KERNEL, promote_dtype: Any = None, rngs: nnx.Rngs):
        self.layer_instance = layer_instance
        self.feature_axes, self.use_scale, self.epsilon = feature_axes, use_scale, epsilon
        self.dtype, self.param_dtype = dtype, param_dtype
        self.variable_filter = nnx.filterlib.to_predicate(variable_filter)
        scales = None
        if use_scale:
            scales = {}
            for path, param in nnx.to_flat_state(nnx.state(layer_instance, nnx.Param)):
                if self.variable_filter(path, param):
                    feats = () if feature_axes is None else canonical_feature_axes(param.ndim, feature_axes)
                    scales[path] = scale_init(rngs["params"], tuple(param.shape[a] for a in feats), param_dtype)
        self.scales = nnx.data(scales)

    def __call__(self, x: Array, *args, **kwargs) -> Array:
        def replace(path, w):
            if not self.variable_filter(path, nnx.Param(w)):
                return None
            scale = self.scales[path] if self.use_scale else None
            return output_dtype(jaxnorm.weight_norm(w, scale, feature_axes=self.feature_axes, eps=self.epsilon),
                                self.dtype)

        return self._call_with(replace, x, *args, **kwargs)
