"""The derivative rule: one ``jax.custom_jvp`` for every layer that normalizes x with its own statistics.

``normalize_batch`` (layer, instance, group and batch norm) and ``normalize_rms`` (RMS norm) are what the layers
call. Without a mask or a named axis they run ``_normalize_fused``, whose derivative is the closed-form tangent
map ``_normalize_tangents``: linear in the tangents, so forward mode evaluates it as written and reverse mode is
JAX's transpose of it, and every transformation works (jvp, jacfwd, linearize, grad, jacrev, both Hessian
orders, under vmap, checkpoint and scan), with reverse mode saving only x and the small statistics. With a mask,
a named axis, or complex x or params (the tangent map is written for real arithmetic: ``|x - mean|^2`` is not
holomorphic), the statistics (``jaxnorm._moments``) are differentiated by JAX itself.
"""

from __future__ import annotations

import functools
from collections.abc import Hashable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

from jaxnorm import kernels
from jaxnorm._moments import mean_square, moments
from jaxnorm._normalize import normalize
from jaxnorm._platform import forward
from jaxnorm._statistics import group_count, sum_over
from jaxnorm._xla_cpu import cpu_barrier

Array = jax.Array


def _complex(*arrays: Array | None) -> bool:
    return any(a is not None and jnp.iscomplexobj(a) for a in arrays)


def normalize_batch(x: Array, reduction_axes: Sequence[int], eps: float, scale: Array | None = None,
                    bias: Array | None = None, *, groups: tuple[int, int] | None = None, mask: Array | None = None,
                    axis_name: Hashable | None = None, axis_index_groups: Any = None
                    ) -> tuple[Array, Array, Array, Array]:
    """Normalize ``x`` with its own statistics over ``reduction_axes``: returns ``(y, mean, var, count)``.

    ``moments`` then ``normalize``. Without ``mask``/``axis_name`` the derivative is the closed-form tangent map
    of ``_normalize_tangents`` (a ``custom_jvp``), so forward and reverse mode both get the textbook batch-norm
    derivative instead of differentiating the statistics' passes; the results are the same to rounding.
    """
    if mask is None and axis_name is None and not _complex(x, scale, bias):
        axes = tuple(reduction_axes)
        y, mean, var = _normalize_fused(x, axes, groups, float(eps), True, kernels._mode(), scale, bias)
        count = jnp.full((1,) * x.ndim, group_count(x.shape, axes, groups), mean.dtype)
        return y, mean, var, count
    mean, var, count = moments(
        x, reduction_axes, groups=groups, mask=mask, axis_name=axis_name, axis_index_groups=axis_index_groups
    )
    return normalize(x, mean, var, eps, scale, bias), mean, var, count


def normalize_rms(x: Array, reduction_axes: Sequence[int], eps: float, scale: Array | None = None, *,
                  bias: Array | None = None, mask: Array | None = None, axis_name: Hashable | None = None,
                  axis_index_groups: Any = None) -> Array:
    """RMS normalization ``x * rsqrt(mean(x**2) + eps) * scale (+ bias)`` over ``reduction_axes``.

    Differentiated by the same closed-form tangent map as the centred layers (``_normalize_tangents`` with no
    mean): reverse mode saves x and 1/rms only (differentiating the forward instead made XLA:CPU write four
    full-size temporaries: the broadcast scale, 1/rms, their product and ``x * dy``). With ``mask`` or
    ``axis_name`` the statistic is ``mean_square``'s and JAX differentiates it.
    """
    if mask is None and axis_name is None and not _complex(x, scale, bias):
        return _normalize_fused(x, tuple(reduction_axes), None, float(eps), False, kernels._mode(), scale, bias)[0]
    ms = mean_square(x, reduction_axes, mask=mask, axis_name=axis_name, axis_index_groups=axis_index_groups)
    return normalize(x, None, ms, eps, scale, bias)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2, 3, 4, 5))
def _normalize_fused(x, axes, groups, eps, centre, mode, scale, bias):
    """``(y, mean, var)`` of ``normalize`` with x's own statistics; the derivative is ``_normalize_tangents``.

    ``mode`` is ``kernels._mode()`` at the call (static: traces and caches are keyed on it)."""
    return forward(x, axes, groups, eps, centre, mode, scale, bias)


def _normalize_fused_jvp(axes, groups, eps, centre, mode, primals, tangents):
    x, scale, bias = primals
    y, mean, var = forward(x, axes, groups, eps, centre, mode, scale, bias)
    inv = jax.lax.rsqrt(var + jnp.asarray(eps, var.dtype))
    # symbolic_zeros=True: an input nobody differentiates (x in a first layer, frozen params) arrives as a
    # SymbolicZero, and the map leaves its terms out; output tangents it cannot reach come back as SymbolicZero
    dots = [None if t is None or isinstance(t, SymbolicZero) else t for t in tangents]
    y_dot, mean_dot, var_dot = jax.checkpoint(functools.partial(_normalize_tangents, axes, groups))(
        x, mean, inv, scale, *dots
    )
    zero = lambda p: SymbolicZero(jax.typeof(p).to_tangent_aval())
    mean_dot = None if mean is None else (zero(mean) if mean_dot is None else mean_dot)
    return (y, mean, var), (y_dot, mean_dot, zero(var) if var_dot is None else var_dot)


_normalize_fused.defjvp(_normalize_fused_jvp, symbolic_zeros=True)


def _normalize_tangents(axes, groups, x, mean, inv, scale, x_dot, scale_dot, bias_dot):
    """Tangents ``(y_dot, mean_dot, var_dot)`` of ``y = (x - mean) * inv * scale + bias`` with x's own statistics.

    ``inv = rsqrt(var + eps)``; ``mean=None`` is RMS normalization (``var`` is then ``mean(x**2)``, nothing is
    centred, and ``mean_dot`` is None); a None tangent is a zero one. With ``xc = x - mean`` and ``n`` values per
    statistic::

        mean_dot = sum(x_dot) / n,   var_dot = 2 * sum(x_dot * xc) / n
        y_dot = inv * scale * (x_dot - mean_dot) - xc * (inv**3 * scale * var_dot / 2 - inv * scale_dot) + bias_dot

    This is the one statement of the layers' derivative. It is linear in the tangents, so forward mode evaluates
    it as written and reverse mode is JAX's transpose of it: ``dx = inv * g - inv / n * sum(g) - inv**3 / n * xc *
    sum(g * xc)`` with ``g = dy * scale``, ``dscale = sum(dy * xc) * inv``, ``dbias = sum(dy)``, plus the paths
    through ``mean``/``var`` when those are differentiated. The caller runs it under ``jax.checkpoint``, so reverse
    mode saves only its inputs (x and the small statistics) and recomputes ``x - mean`` in the backward pass.

    Written for the compiled program, which both modes share (each point measured on XLA:CPU, jax 0.10):

    - per-group coefficients are formed on the small statistics before they meet a full-size array, so the
      transpose reduces ``dy`` and ``dy * xc`` once each and scales the small sums; where ``scale`` is constant
      over the reduced axes the ``var_dot`` and ``scale_dot`` terms share one ``xc``, so ``dscale`` reuses
      ``sum(dy * xc)``;
    - every full-size consumer gets its own copy of the primal operands (one optimization barrier), so XLA
      recomputes ``x - mean`` and broadcasts inside each fusion: a shared ``inv`` was written broadcast to x's
      full shape, and a shared ``dy * scale`` was written out at small sizes;
    - no reduction ends in ``broadcast(v) * computed``: XLA:CPU rewrites that into a matrix-vector product that
      writes the computed operand to memory (``sum(inv * (dy * xc))`` for layer norm's dscale took 4.5x as long
      as ``sum(dy * (xc * inv))``);
    - for a narrower ``x`` (bfloat16/float16) the tangent is rounded to x's dtype in parts (see the end), so
      forward mode's ``y_dot`` is exact to the rounding of its parts rather than of their sum.
    """
    dtype = inv.dtype
    n = max(group_count(x.shape, axes, groups), 1.0)  # an empty reduction (n = 0): zero sums, zero tangents
    red = functools.partial(sum_over, axes=axes, groups=groups)
    # scale constant over the reduced axes (batch/instance/group norm): the scale goes into the per-group
    # coefficients; else (layer/RMS norm) it multiplies each term of the normalized tangent (its own copy each)
    per_group = scale is None or all(scale.shape[a] == 1 for a in axes)
    xs, ms, invs, scales = (
        iter(c) for c in cpu_barrier(((x,) * 3, (mean,) * 3, (inv,) * 4, (scale,) * 3))
    )
    sf = None if scale is None else scale.astype(dtype)

    def centred():  # x - mean in the statistics dtype, from its own copies
        xc, m = next(xs).astype(dtype), next(ms)
        return xc if m is None else xc - m

    def scaled(c):  # scale * c for a per-group coefficient c (batch/instance/group norm)
        return c if sf is None or not per_group else sf * c

    terms, xc_coefs, mean_dot, var_dot = [], [], None, None
    if x_dot is not None:
        xd = x_dot.astype(dtype)
        # from the raw sums, with the constants folded into one coefficient each (fewer per-group operations
        # in the transposed program's fused loops)
        sum_xd = None if mean is None else red(xd)
        sum_xdxc = red(xd * centred())
        mean_dot = None if mean is None else sum_xd / n
        var_dot = sum_xdxc * (2.0 / n)
        terms.append(scaled(next(invs)) * xd)
        if sum_xd is not None:
            terms.append(scaled(next(invs) * (-1.0 / n)) * sum_xd)
        xc_coefs.append(scaled(next(invs) ** 3 * (-1.0 / n)) * sum_xdxc)
        if not per_group:
            # scale * (normalized tangent), a copy of scale per term: the transpose forms dy * scale inside each
            # consumer (dx's loop and each row reduction) instead of writing it to memory for all of them
            terms = [next(scales).astype(dtype) * t for t in terms + [xc_coefs.pop() * centred()]]
    if scale_dot is not None and per_group:
        xc_coefs.append(next(invs) * scale_dot.astype(dtype))
    elif scale_dot is not None:  # xhat * scale_dot: the transpose is sum(dy * xhat), never sum(inv * (dy * xc))
        terms.append((centred() * next(invs)) * scale_dot.astype(dtype))
    if xc_coefs:  # one full-size xc term: for batch norm, its transpose gives dscale from sum(dy * xc)
        terms.append(functools.reduce(jnp.add, xc_coefs) * centred())
    if bias_dot is not None:
        terms.append(bias_dot.astype(dtype))
    # the small (broadcast) terms are summed first: their transposes share one reduction of dy
    small = [t for t in terms if t.shape != x.shape]
    parts = [t for t in terms if t.shape == x.shape] + ([functools.reduce(jnp.add, small)] if small else [])
    if x.dtype == dtype or len(parts) == 1:
        y_dot = jnp.broadcast_to(functools.reduce(jnp.add, parts), x.shape).astype(x.dtype)
    else:
        # a narrower x (bfloat16/float16): each part is rounded on its own and the parts meet behind one barrier,
        # so the transpose converts its own copy of dy for each consumer; one shared conversion made XLA:CPU write
        # dy in float32 to memory and read it back (bfloat16 batch norm's backward ~1.9x slower, measured)
        parts = cpu_barrier(tuple(jnp.broadcast_to(p, x.shape).astype(x.dtype) for p in parts))
        y_dot = functools.reduce(jnp.add, parts)
    return y_dot, mean_dot, var_dot
