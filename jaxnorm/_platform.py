"""What runs where: the statistics strategy each platform gets, and the Pallas row kernel on NVIDIA GPUs.

Both are chosen when the program is lowered (``jax.lax.platform_dependent``, called where the statistics are
computed, so the branch is visible there), behind the same public functions:

- statistics (``moment_strategies``): on CPU the strategies measured fastest on XLA:CPU (the fused row formula from
  ``ROW_FUSION_MIN_ROWS`` contiguous rows on, else the checked one pass); on every other platform the exact
  two-pass formula with no data-dependent branch (a ``lax.cond`` on a GPU waits for its predicate);
- the forward of layer/RMS norm over trailing dims (``row_kernel``): with ``jaxnorm.kernels`` enabled, the Pallas
  row kernel where the program is lowered for an NVIDIA GPU (``interpret=True``: everywhere, interpreted).

The plain XLA path is the reference every other path is tested against.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxnorm import kernels
from jaxnorm._statistics import checked_one_pass, group_count, row_moments, stats_dtype, sum_over, two_pass
from jaxnorm._xla_cpu import ROW_FUSION_MIN_ROWS, contiguous_rows

Array = jax.Array


def moment_strategies(x: Array, axes: tuple[int, ...], groups: tuple[int, int] | None) -> dict[str, Callable]:
    """Each platform's ``(mean, M2)`` formula for x over ``axes``, as ``jax.lax.platform_dependent``'s keywords.

    A static choice, from the shapes: contiguous rows (layer norm; instance and group norm in NCHW) take
    ``row_moments``, on CPU only from ``ROW_FUSION_MIN_ROWS`` rows on; other axes take ``checked_one_pass`` on CPU
    and ``two_pass`` elsewhere. An empty reduction (a zero-size batch) divides its sums of nothing by 1: its
    statistics are 0.
    """
    dtype, n = stats_dtype(x.dtype), max(group_count(x.shape, axes, groups), 1.0)
    red = functools.partial(sum_over, axes=axes, groups=groups)
    rows = contiguous_rows(x.shape, axes, groups)
    if rows is None:
        return {"cpu": functools.partial(checked_one_pass, dtype=dtype, red=red, n=n),
                "default": functools.partial(two_pass, dtype=dtype, red=red, n=n)}
    by_rows = functools.partial(row_moments, dtype=dtype, rows=rows, groups=groups)
    if math.prod(rows[:-1]) >= ROW_FUSION_MIN_ROWS:
        return {"cpu": by_rows, "default": functools.partial(row_moments, dtype=dtype, rows=rows, groups=groups)}
    return {"cpu": functools.partial(checked_one_pass, dtype=dtype, red=red, n=n), "default": by_rows}


def row_kernel_applies(x: Array, axes: tuple[int, ...], groups, scale: Array | None, bias: Array | None) -> bool:
    """Whether the Pallas row kernel computes this call: statistics over trailing dims (layer/RMS norm), float32,
    bfloat16 or float16 x, and a scale and bias (if any) over exactly those dims."""
    k = x.ndim - len(axes)
    if x.size == 0 or groups is not None or not axes or tuple(sorted(axes)) != tuple(range(k, x.ndim)) or k == 0:
        return False
    if jnp.dtype(x.dtype) not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return False
    return all(p is None or (all(d == 1 for d in p.shape[:k]) and tuple(p.shape[k:]) == tuple(x.shape[k:]))
               for p in (scale, bias))


def row_kernel(x, axes, eps, centre, mode, scale, bias, *, xla: Callable):
    """``(y, mean, var)`` by the Pallas row kernel where ``mode`` puts it: ``"gpu"``, in programs lowered for
    CUDA (``xla(x, scale, bias)``, the plain program, everywhere else); ``"interpret"``, everywhere, in Pallas'
    interpreter.

    The kernel computes values only: where they are differentiated (the tangent rule's primal, inside a Hessian)
    the XLA program's derivative stands in, so Pallas' own autodiff and batching never run.
    """
    def pallas(interpret):
        f = jax.custom_jvp(lambda x, scale, bias: _row_kernel_forward(x, axes, eps, centre, scale, bias,
                                                                      interpret=interpret))
        f.defjvp(lambda primals, tangents: jax.jvp(lambda *a: xla(*a), primals, tangents))
        return f

    if mode == "interpret":
        return pallas(True)(x, scale, bias)
    return jax.lax.platform_dependent(x, scale, bias, cuda=pallas(False), default=xla)


def _row_kernel_forward(x, axes, eps, centre, scale, bias, *, interpret):
    k = x.ndim - len(axes)
    rows, cols = int(np.prod(x.shape[:k])), int(np.prod(x.shape[k:]))
    flat = lambda p: None if p is None else p.reshape(cols)
    y, mean, var = kernels.row_norm_forward(x.reshape(rows, cols), flat(scale), flat(bias), eps, centre=centre,
                                            interpret=interpret)
    keep = tuple(x.shape[:k]) + (1,) * len(axes)
    return y.reshape(x.shape), (mean.reshape(keep) if centre else None), var.reshape(keep)
