"""What runs where: the statistics strategy and the forward program each platform gets.

Chosen when the program is lowered (``jax.lax.platform_dependent``), behind the same public functions:

- statistics (``own_moments``): on CPU the strategies measured fastest on XLA:CPU (the fused row kernel from
  ``ROW_FUSION_MIN_ROWS`` contiguous rows on, else the checked one pass); on every other platform the exact
  two-pass formula with no data-dependent branch (a ``lax.cond`` on a GPU waits for its predicate);
- the forward of layer/RMS norm over trailing dims (``forward``): the XLA program everywhere, or with
  ``jaxnorm.kernels`` enabled the Pallas row kernel on NVIDIA GPUs (``interpret=True``: everywhere, interpreted).
  The plain XLA path is the reference every other path is tested against.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxnorm import kernels
from jaxnorm._normalize import normalize
from jaxnorm._statistics import (
    checked_one_pass,
    group_count,
    kept_shape,
    real_dtype,
    row_moments,
    square_mean,
    stats_dtype,
    sum_over,
    two_pass,
    variance,
)
from jaxnorm._xla_cpu import ROW_FUSION_MIN_ROWS, contiguous_rows

Array = jax.Array


def own_moments(x: Array, axes: tuple[int, ...], groups: tuple[int, int] | None) -> tuple[Array, Array, Array]:
    """(count, mean, M2) of x over ``axes`` (``groups``: pooled in channel groups) on this device, no mask."""
    n = group_count(x.shape, axes, groups)
    count = jnp.full((1,) * x.ndim, n, real_dtype(stats_dtype(x.dtype)))
    if n == 0:  # an empty reduction (a zero-size batch): nothing to average, mean and M2 are 0
        zero = jnp.zeros(kept_shape(x.shape, axes), stats_dtype(x.dtype))
        return count, zero, zero.real
    if jnp.iscomplexobj(x):  # complex: the two-pass formula everywhere (nothing measured for it)
        return count, *two_pass(x, stats_dtype(x.dtype), functools.partial(sum_over, axes=axes, groups=groups), n)
    mean, m2 = jax.lax.platform_dependent(x, cpu=functools.partial(_cpu_moments, axes=axes, groups=groups),
                                          default=functools.partial(_default_moments, axes=axes, groups=groups))
    return count, mean, m2


def _cpu_moments(x, *, axes, groups):
    dtype, rows = stats_dtype(x.dtype), contiguous_rows(x.shape, axes, groups)
    if rows is not None and np.prod(rows[:-1]) >= ROW_FUSION_MIN_ROWS:
        return row_moments(x, dtype, rows, groups)
    red = functools.partial(sum_over, axes=axes, groups=groups)
    return checked_one_pass(x, dtype, red, group_count(x.shape, axes, groups))


def _default_moments(x, *, axes, groups):
    dtype, rows = stats_dtype(x.dtype), contiguous_rows(x.shape, axes, groups)
    if rows is not None:
        return row_moments(x, dtype, rows, groups)
    red = functools.partial(sum_over, axes=axes, groups=groups)
    return two_pass(x, dtype, red, group_count(x.shape, axes, groups))


def forward(x, axes, groups, eps, centre, mode, scale, bias):
    """``(y, mean, var)`` of x normalized with its own statistics (``centre=False``: RMS, ``mean`` None, ``var``
    the mean square). ``mode`` is ``kernels._mode()``: None (XLA only), "gpu" (the Pallas row kernel where the
    program is lowered for CUDA) or "interpret" (the kernel everywhere, in Pallas' interpreter)."""
    def xla(x, scale, bias):
        if centre:
            count, mean, m2 = own_moments(x, axes, groups)
            var = variance(m2, count)
        else:
            mean, var = None, square_mean(x, axes)
        return normalize(x, mean, var, eps, scale, bias), mean, var

    if mode is None or not _pallas_rows(x, axes, groups, scale, bias):
        return xla(x, scale, bias)

    def call(interpret):
        # the kernel computes values only: where they are differentiated (the tangent rule's primal, inside a
        # Hessian) the XLA program's derivative stands in, so Pallas' own autodiff and batching never run
        pallas = jax.custom_jvp(lambda x, scale, bias: _pallas_forward(x, axes, eps, centre, scale, bias,
                                                                       interpret=interpret))
        pallas.defjvp(lambda primals, tangents: jax.jvp(lambda *a: xla(*a), primals, tangents))
        return pallas

    if mode == "interpret":
        return call(True)(x, scale, bias)
    return jax.lax.platform_dependent(x, scale, bias, cuda=call(False), default=xla)


def _pallas_rows(x, axes, groups, scale, bias) -> bool:
    """Whether this call is one the Pallas row kernel computes: statistics over trailing dims (layer/RMS norm),
    float32/bfloat16/float16 x, and a scale and bias (if any) over exactly those dims."""
    k = x.ndim - len(axes)
    if x.size == 0 or groups is not None or not axes or tuple(sorted(axes)) != tuple(range(k, x.ndim)) or k == 0:
        return False
    if jnp.dtype(x.dtype) not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return False
    return all(p is None or (all(d == 1 for d in p.shape[:k]) and tuple(p.shape[k:]) == tuple(x.shape[k:]))
               for p in (scale, bias))


def _pallas_forward(x, axes, eps, centre, scale, bias, *, interpret):
    k = x.ndim - len(axes)
    rows, cols = int(np.prod(x.shape[:k])), int(np.prod(x.shape[k:]))
    flat = lambda p: None if p is None else p.reshape(cols)
    y, mean, var = kernels.row_norm_forward(x.reshape(rows, cols), flat(scale), flat(bias), eps, centre=centre,
                                            interpret=interpret)
    keep = tuple(x.shape[:k]) + (1,) * len(axes)
    return y.reshape(x.shape), (mean.reshape(keep) if centre else None), var.reshape(keep)
