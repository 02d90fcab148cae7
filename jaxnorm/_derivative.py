"""The derivative rule: one ``jax.custom_jvp`` for every layer that normalizes x with its own statistics.

Read top to bottom, as the data flows: ``normalize_batch`` (layer, instance, group and batch norm) and
``normalize_rms`` (RMS norm) are what the layers call; without a mask or a named axis they run ``normalize_own``,
the forward (x's statistics, with each platform's formula, then ``normalize``), whose derivative is
``normalize_tangents``, the closed-form tangent map. It is linear in the tangents, so forward mode evaluates it as
written and reverse mode is JAX's transpose of it, and every transformation works (jvp, jacfwd, linearize, grad,
jacrev, both Hessian orders, under vmap, checkpoint and scan), with reverse mode saving only x and the small
statistics. With a mask, a named axis, or complex x or params (the tangent map is written for real arithmetic:
``|x - mean|^2`` is not holomorphic), the statistics (``jaxnorm._moments``) are differentiated by JAX itself.
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
from jaxnorm._platform import moment_strategies, row_kernel, row_kernel_applies
from jaxnorm._statistics import element_count, group_count, square_mean, sum_over, variance
from jaxnorm._xla_cpu import cpu_barrier

Array = jax.Array


def normalize_batch(x: Array, reduction_axes: Sequence[int], eps: float, scale: Array | None = None,
                    bias: Array | None = None, *, groups: tuple[int, int] | None = None, mask: Array | None = None,
                    axis_name: Hashable | None = None, axis_index_groups: Any = None
                    ) -> tuple[Array, Array, Array, Array]:
    """Normalize x with its own statistics: ``(x - mean) * rsqrt(var + eps) * scale + bias``.

    Args:
      x: the input.
      reduction_axes: the axes the statistics pool.
      eps: added to the variance.
      scale, bias: broadcast against x at equal rank; None for none.
      groups: ``(axis, G)``: also pool the channels on ``axis`` in ``G`` contiguous groups (group norm).
      mask, axis_name, axis_index_groups: as in ``jaxnorm._moments.moments``.

    Returns:
      ``(y, mean, var, count)``: the statistics kept as size-1 dims, ``var`` biased, ``count`` per statistic.
    """
    if mask is None and axis_name is None and not _complex(x, scale, bias):
        axes = tuple(reduction_axes)
        y, mean, var = normalize_own(x, axes, groups, float(eps), True, kernels.pallas_mode(), scale, bias)
        return y, mean, var, element_count(x, axes, groups)
    mean, var, count = moments(
        x, reduction_axes, groups=groups, mask=mask, axis_name=axis_name, axis_index_groups=axis_index_groups
    )
    return normalize(x, mean, var, eps, scale, bias), mean, var, count


def normalize_rms(x: Array, reduction_axes: Sequence[int], eps: float, scale: Array | None = None, *,
                  bias: Array | None = None, mask: Array | None = None, axis_name: Hashable | None = None,
                  axis_index_groups: Any = None) -> Array:
    """RMS normalization: ``x * rsqrt(mean(x**2) + eps) * scale + bias``, arguments as in ``normalize_batch``.

    Differentiated by the same tangent map as the centred layers, with no mean: reverse mode saves x and 1/rms
    only. With ``mask`` or ``axis_name`` the statistic is ``mean_square``'s and JAX differentiates it.
    """
    if mask is None and axis_name is None and not _complex(x, scale, bias):
        return normalize_own(x, tuple(reduction_axes), None, float(eps), False, kernels.pallas_mode(), scale, bias)[0]
    ms = mean_square(x, reduction_axes, mask=mask, axis_name=axis_name, axis_index_groups=axis_index_groups)
    return normalize(x, None, ms, eps, scale, bias)


def _complex(*arrays: Array | None) -> bool:
    return any(a is not None and jnp.iscomplexobj(a) for a in arrays)


def _own_forward(x, axes, groups, eps, centre, kernel, scale, bias):
    """``(y, mean, var)``: x normalized with its own statistics over ``axes`` (``centre=False``: RMS, ``mean``
    None, ``var`` the mean square). ``kernel`` is ``jaxnorm.kernels.pallas_mode()`` at the call."""
    if kernel is not None and row_kernel_applies(x, axes, groups, scale, bias):
        plain = lambda x, scale, bias: _own_forward(x, axes, groups, eps, centre, None, scale, bias)
        return row_kernel(x, axes, eps, centre, kernel, scale, bias, xla=plain)
    if centre:
        count = element_count(x, axes, groups)
        mean, m2 = jax.lax.platform_dependent(x, **moment_strategies(x, axes, groups))
        var = variance(m2, count)
    else:
        mean, var = None, square_mean(x, axes)
    return normalize(x, mean, var, eps, scale, bias), mean, var


# static: axes, groups, eps, centre, kernel (traces and caches are keyed on them)
normalize_own = jax.custom_jvp(_own_forward, nondiff_argnums=(1, 2, 3, 4, 5))


def _normalize_own_jvp(axes, groups, eps, centre, kernel, primals, tangents):
    x, scale, bias = primals
    y, mean, var = _own_forward(x, axes, groups, eps, centre, kernel, scale, bias)
    inv = jax.lax.rsqrt(var + jnp.asarray(eps, var.dtype))
    # symbolic_zeros=True: an input nobody differentiates (x in a first layer, frozen params) arrives as a
    # SymbolicZero, and the map leaves its terms out; output tangents it cannot reach come back as SymbolicZero
    dots = [None if t is None or isinstance(t, SymbolicZero) else t for t in tangents]
    # under jax.checkpoint: reverse mode saves the map's inputs (x and the small statistics) and recomputes x - mean
    y_dot, mean_dot, var_dot = jax.checkpoint(functools.partial(normalize_tangents, axes, groups))(
        x, mean, inv, scale, *dots
    )
    zero = lambda p: SymbolicZero(jax.typeof(p).to_tangent_aval())
    mean_dot = None if mean is None else (zero(mean) if mean_dot is None else mean_dot)
    return (y, mean, var), (y_dot, mean_dot, zero(var) if var_dot is None else var_dot)


normalize_own.defjvp(_normalize_own_jvp, symbolic_zeros=True)


def normalize_tangents(axes, groups, x, mean, inv, scale, x_dot, scale_dot, bias_dot):
    """Tangents of ``y = (x - mean) * inv * scale + bias`` with x's own statistics, ``inv = rsqrt(var + eps)``.

    With ``xc = x - mean`` and ``n`` values per statistic::

        mean_dot = sum(x_dot) / n
        var_dot  = 2 * sum(x_dot * xc) / n
        y_dot    = inv * scale * (x_dot - mean_dot) - xc * (inv**3 * scale * var_dot / 2 - inv * scale_dot) + bias_dot

    ``mean=None`` is RMS normalization (``var`` is then ``mean(x**2)``, ``xc = x`` and there is no ``mean_dot``);
    a None tangent is a zero one. The rule is linear in the tangents: reverse mode is its transpose, ``dx = inv * g
    - inv / n * sum(g) - inv**3 / n * xc * sum(g * xc)`` with ``g = dy * scale``, ``dscale = sum(dy * xc) * inv``,
    ``dbias = sum(dy)``, plus the paths through ``mean``/``var`` when those are differentiated.

    Below, each term of ``y_dot`` is one line. The constants are folded into per-statistic coefficients before they
    meet a full-size array (``-inv / n * sum(x_dot)`` is ``-inv * mean_dot``), and where ``scale`` is constant over
    the reduced axes (batch, instance, group norm) the ``var_dot`` and ``scale_dot`` terms share one ``xc``, so the
    transpose reduces ``dy`` and ``dy * xc`` once each. Each full-size product reads its own copy of its operands,
    named for its term: that is XLA:CPU's scheduling (``_one_copy_per_use``), and changes no value.
    """
    dtype = inv.dtype
    n = max(group_count(x.shape, axes, groups), 1.0)  # an empty reduction (n = 0): zero sums, zero tangents
    red = functools.partial(sum_over, axes=axes, groups=groups)
    centre, with_x, with_scale = mean is not None, x_dot is not None, scale_dot is not None
    # scale constant over the reduced axes: it goes into the per-statistic coefficients; else (layer/RMS norm) it
    # multiplies each full-size term
    per_group = scale is None or all(scale.shape[a] == 1 for a in axes)
    scale_terms = _present(("x_dot", with_x and not per_group), ("mean_dot", with_x and centre and not per_group),
                           ("var_dot", with_x and not per_group))
    xs, invs, scales = _one_copy_per_use(
        x, mean, inv, scale,
        xc_uses=_present(("var_dot", with_x), ("var_dot term", with_x and not per_group),
                         ("scale_dot term", with_scale and not per_group),
                         ("xc term", per_group and (with_x or with_scale))),
        inv_uses=_present(("x_dot", with_x), ("mean_dot", with_x and centre), ("var_dot", with_x),
                          ("scale_dot", with_scale)),
        scale_uses=scale_terms,
    )
    sf = None if scale is None else scale.astype(dtype)

    def xc(use):  # x - mean in the statistics dtype, from the copies of `use`
        x_use, mean_use = xs[use]
        x_use = x_use.astype(dtype)
        return x_use if mean_use is None else x_use - mean_use

    def scaled(c):  # scale * c for a per-statistic coefficient c (batch/instance/group norm)
        return c if sf is None or not per_group else sf * c

    terms, xc_coefs, mean_dot, var_dot = [], [], None, None
    if with_x:
        xd = x_dot.astype(dtype)
        sum_xd = red(xd) if centre else None
        sum_xdxc = red(xd * xc("var_dot"))
        mean_dot = sum_xd / n if centre else None
        var_dot = sum_xdxc * (2.0 / n)
        terms.append(scaled(invs["x_dot"]) * xd)  # inv * scale * x_dot
        if centre:
            terms.append(scaled(invs["mean_dot"] * (-1.0 / n)) * sum_xd)  # - inv * scale * mean_dot
        var_coef = scaled(invs["var_dot"] ** 3 * (-1.0 / n)) * sum_xdxc  # (- inv**3 * scale * var_dot / 2) * xc
        if per_group:
            xc_coefs.append(var_coef)
        else:  # scale * each term, a copy of scale per term: the transpose forms dy * scale inside each consumer
            terms.append(var_coef * xc("var_dot term"))
            terms = [scales[use].astype(dtype) * t for use, t in zip(scale_terms, terms, strict=True)]
    if with_scale and per_group:
        xc_coefs.append(invs["scale_dot"] * scale_dot.astype(dtype))  # (inv * scale_dot) * xc
    elif with_scale:  # xhat * scale_dot: the transpose is sum(dy * xhat), never sum(inv * (dy * xc))
        terms.append((xc("scale_dot term") * invs["scale_dot"]) * scale_dot.astype(dtype))
    if xc_coefs:  # one full-size xc term: for batch norm, its transpose gives dscale from sum(dy * xc)
        terms.append(functools.reduce(jnp.add, xc_coefs) * xc("xc term"))
    if bias_dot is not None:
        terms.append(bias_dot.astype(dtype))  # bias_dot
    return _sum_terms(terms, x, dtype), mean_dot, var_dot


def _present(*uses: tuple[str, bool]) -> tuple[str, ...]:
    """The names of the uses that occur, in order."""
    return tuple(name for name, occurs in uses if occurs)


def _one_copy_per_use(x, mean, inv, scale, *, xc_uses, inv_uses, scale_uses):
    """XLA:CPU's scheduling of the tangent map: one copy of each operand per full-size product, named for its use.

    All the copies pass one optimization barrier (CPU only, ``cpu_barrier``), so XLA recomputes ``x - mean`` and
    the broadcasts inside each fusion: a shared ``inv`` was written broadcast to x's full shape, and a shared
    ``dy * scale`` was written out at small sizes. Returns ``({use: (x, mean)}, {use: inv}, {use: scale})``.
    """
    xs, means, invs, scales = cpu_barrier(((x,) * 3, (mean,) * 3, (inv,) * 4, (scale,) * 3))
    named = lambda uses, copies: dict(zip(uses, copies[: len(uses)], strict=True))
    return named(xc_uses, tuple(zip(xs, means, strict=True))), named(inv_uses, invs), named(scale_uses, scales)


def _sum_terms(terms: list[Array], x: Array, dtype: Any) -> Array:
    """The terms (in the statistics ``dtype``) summed in x's shape and dtype.

    The small (broadcast) terms are added first, so their transposes share one reduction of dy. For a narrower x
    (bfloat16/float16) each full-size part is rounded to x's dtype on its own and the parts meet behind one barrier,
    so the transpose converts its own copy of dy for each consumer (one shared conversion made XLA:CPU write dy in
    float32 to memory and read it back).
    """
    small = [t for t in terms if t.shape != x.shape]
    parts = [t for t in terms if t.shape == x.shape] + ([functools.reduce(jnp.add, small)] if small else [])
    if x.dtype == dtype or len(parts) == 1:
        return jnp.broadcast_to(functools.reduce(jnp.add, parts), x.shape).astype(x.dtype)
    parts = cpu_barrier(tuple(jnp.broadcast_to(p, x.shape).astype(x.dtype) for p in parts))
    return functools.reduce(jnp.add, parts)
