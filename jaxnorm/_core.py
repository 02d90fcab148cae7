"""The one math core every jaxnorm layer calls: moments -> normalize -> affine, plus shared checks.

Nothing here creates parameters or holds state; every function takes everything it needs as arguments.
Statistics are computed in ``promote_types(x.dtype, float32)`` (float32 for float16/bfloat16/float32 inputs,
float64 for float64 inputs), never losing digits to ``E[x^2] - E[x]^2`` cancellation when a channel's mean is large
against its spread: over many contiguous rows (layer norm) by the two-pass row formula, which XLA:CPU fuses with
the normalization into one kernel (``_row_moments``); otherwise from ``sum(x)`` and ``sum(x^2)`` where that is
provably accurate, else as shifted sums around the one-pass mean (``_checked_one_pass``).

Derivatives: layer/instance/group/batch norm and RMS norm share one ``jax.custom_jvp`` whose tangent rule
(``_normalize_tangents``) is linear in the tangents, so forward mode uses it as written and reverse mode is JAX's
transpose of it; every transformation works (jvp, jacfwd, linearize, grad, jacrev, both Hessian orders, under vmap,
checkpoint and scan), and reverse mode saves only x and the small statistics.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_derivatives import SymbolicZero

from jaxnorm import kernels

Array = jax.Array


# --------------------------------------------------------------------------------------------- dtypes


def stats_dtype(dtype: Any) -> np.dtype:
    """dtype statistics are computed in: float32, or float64 for float64 inputs."""
    return jnp.promote_types(dtype, jnp.float32)


# --------------------------------------------------------------------------------------------- checks


def check_training(training: Any, layer: str) -> bool:
    if isinstance(training, (bool, np.bool_)):
        return bool(training)
    raise TypeError(
        f"{layer}: `training` must be a Python bool, got {training!r} (type {type(training).__name__}). "
        "It selects the code path at trace time, so it cannot be a traced value: pass True/False, or mark it "
        "static, e.g. jax.jit(f, static_argnames='training')."
    )


def check_input(x: Any, layer: str, *, min_ndim: int, what: str) -> Array:
    if not hasattr(x, "dtype") or not hasattr(x, "shape"):
        raise TypeError(f"{layer}: `x` must be a JAX or NumPy array, got {type(x).__name__}.")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(
            f"{layer}: `x` must have a floating-point dtype, got {x.dtype}. "
            "Cast it first, e.g. x.astype(jnp.float32)."
        )
    if x.ndim < min_ndim:
        raise ValueError(f"{layer}: `x` must have {what}, got shape {tuple(x.shape)} (rank {x.ndim}).")
    return jnp.asarray(x)


def canonical_axis(axis: Any, ndim: int, layer: str, *, name: str = "axis") -> int:
    if not isinstance(axis, (int, np.integer)) or isinstance(axis, bool):
        raise TypeError(f"{layer}: `{name}` must be an int, got {axis!r}.")
    if not -ndim <= axis < ndim:
        raise ValueError(
            f"{layer}: `{name}`={axis} is out of range for an input of rank {ndim}; use a value in [{-ndim}, {ndim})."
        )
    return int(axis) % ndim


def canonical_axes(axes: Any, ndim: int, layer: str, *, name: str) -> tuple[int, ...]:
    """An int or a sequence of ints -> sorted tuple of distinct non-negative axes (duplicates merged, as Flax)."""
    items = axes if isinstance(axes, Sequence) and not isinstance(axes, str) else (axes,)
    if not items:
        raise ValueError(f"{layer}: `{name}` must name at least one axis, got {axes!r}.")
    return tuple(sorted({canonical_axis(a, ndim, layer, name=name) for a in items}))


def broadcast_shape(shape: Sequence[int], axes: Sequence[int]) -> tuple[int, ...]:
    """``shape`` with every dim outside ``axes`` set to 1: how a per-feature array broadcasts against x."""
    return tuple(d if i in axes else 1 for i, d in enumerate(shape))


def check_eps(eps: Any, layer: str) -> float:
    if isinstance(eps, bool) or not isinstance(eps, (int, float, np.floating, np.integer)):
        raise TypeError(f"{layer}: `eps` must be a Python float > 0, got {eps!r}.")
    if not eps > 0:
        raise ValueError(f"{layer}: `eps` must be > 0, got {eps!r}; PyTorch's default is 1e-5.")
    return float(eps)


def check_momentum(momentum: Any, layer: str) -> float | None:
    if momentum is None:
        return None
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float, np.floating, np.integer)):
        raise TypeError(f"{layer}: `momentum` must be a float in [0, 1] or None, got {momentum!r}.")
    if not 0.0 <= momentum <= 1.0:
        hint = ""
        if momentum > 1.0:
            hint = " (it looks like a percentage)"
        raise ValueError(
            f"{layer}: `momentum` must be in [0, 1] or None (cumulative average), got {momentum!r}{hint}. "
            "jaxnorm uses PyTorch's convention: momentum is the weight of the NEW batch, "
            "new = (1 - momentum) * old + momentum * batch; PyTorch's default is 0.1."
        )
    return float(momentum)


def check_state(
    state: Any,
    expected: Mapping[str, tuple[tuple[int, ...], str]],
    *,
    arg: str,
    layer: str,
    fix: str,
) -> None:
    """Check that ``state`` is a dict with exactly ``expected`` keys, shapes and dtype kinds.

    ``expected`` maps key -> (shape, kind) with kind "float" or "int". An empty ``expected`` means ``{}``.
    """
    if not isinstance(state, Mapping):
        raise TypeError(f"{layer}: `{arg}` must be a dict, got {type(state).__name__}. {fix}")
    want = {k: (shape, kind) for k, (shape, kind) in expected.items()}
    got_keys, want_keys = sorted(state.keys()), sorted(want.keys())
    if got_keys != want_keys:
        raise ValueError(
            f"{layer}: `{arg}` has keys {got_keys} but this layer expects {want_keys}. {fix}"
        )
    for key, (shape, kind) in want.items():
        value = state[key]
        vshape = tuple(getattr(value, "shape", ()))
        vdtype = getattr(value, "dtype", None)
        if vshape != tuple(shape):
            raise ValueError(
                f"{layer}: `{arg}['{key}']` has shape {vshape} but the input needs {tuple(shape)}. {fix}"
            )
        ok = vdtype is not None and (
            jnp.issubdtype(vdtype, jnp.floating) if kind == "float" else jnp.issubdtype(vdtype, jnp.integer)
        )
        if not ok:
            want_kind = "a floating-point" if kind == "float" else "an integer"
            raise TypeError(f"{layer}: `{arg}['{key}']` must have {want_kind} dtype, got {vdtype}. {fix}")


def normalized_shape_tuple(normalized_shape: Any, layer: str) -> tuple[int, ...]:
    shape: tuple[int, ...]
    if isinstance(normalized_shape, (int, np.integer)) and not isinstance(normalized_shape, bool):
        shape = (int(normalized_shape),)
    elif isinstance(normalized_shape, Sequence) and all(
        isinstance(d, (int, np.integer)) and not isinstance(d, bool) for d in normalized_shape
    ):
        shape = tuple(int(d) for d in normalized_shape)
    else:
        raise TypeError(
            f"{layer}: `normalized_shape` must be an int or a tuple of ints, got {normalized_shape!r}."
        )
    if not shape or any(d < 1 for d in shape):
        raise ValueError(f"{layer}: `normalized_shape` must be non-empty with positive sizes, got {shape}.")
    return shape


def check_trailing_shape(x: Array, normalized_shape: tuple[int, ...], layer: str) -> None:
    k = len(normalized_shape)
    if x.ndim < k or tuple(x.shape[x.ndim - k :]) != normalized_shape:
        raise ValueError(
            f"{layer}: `normalized_shape`={normalized_shape} must equal the trailing dims of `x`, but x has shape "
            f"{tuple(x.shape)}. Normalize the last {k} dim(s) of an input whose shape ends in {normalized_shape}, "
            "or move the axes to the end first (jnp.moveaxis)."
        )


def check_mask(mask: Any, x: Array, layer: str) -> Array | None:
    if mask is None:
        return None
    mask = jnp.asarray(mask)
    if mask.dtype != jnp.bool_:
        raise TypeError(f"{layer}: `mask` must be a boolean array (True = use this value), got dtype {mask.dtype}.")
    if mask.ndim != x.ndim or any(m not in (1, d) for m, d in zip(mask.shape, x.shape, strict=True)):
        raise ValueError(
            f"{layer}: `mask` has shape {tuple(mask.shape)}, which does not broadcast to x's shape "
            f"{tuple(x.shape)}; give it x's rank with size-1 dims where it is shared, e.g. "
            f"{(x.shape[0],) + (1,) * (x.ndim - 1)} for one flag per example."
        )
    return mask


# --------------------------------------------------------------------------------------------- math


def moments(
    x: Array,
    reduction_axes: Sequence[int],
    *,
    groups: tuple[int, int] | None = None,
    mask: Array | None = None,
    axis_name: Hashable | None = None,
    axis_index_groups: Any = None,
) -> tuple[Array, Array, Array]:
    """Mean, biased variance and element count over ``reduction_axes`` (kept as size-1 dims).

    Computed in ``stats_dtype(x.dtype)``, exact to a few eps whatever the data's offset (see below). With ``mask``
    only the True positions count. With ``axis_name`` the per-device (count, mean, M2) triples are combined exactly
    (Chan et al., see ``_combine_moments``), so uneven per-device counts are weighted correctly.
    ``groups=(axis, G)`` also pools the channels on ``axis`` in ``G`` contiguous groups (group norm); the
    statistics come back per channel (each channel gets its group's). Returns
    ``(mean, var, count)``; ``count`` broadcasts against ``mean`` and is float.
    """
    axes = tuple(reduction_axes)
    red = functools.partial(sum_over, axes=axes, groups=groups)
    dtype = stats_dtype(x.dtype)
    if mask is None:
        n = group_count(x.shape, axes, groups)
        count = jnp.full((1,) * x.ndim, n, dtype)
        mean, m2 = jax.lax.platform_dependent(
            x, cpu=functools.partial(_cpu_moments, axes=axes, groups=groups),
            default=functools.partial(_plain_moments, axes=axes, groups=groups))
    else:
        xf, maskb = x.astype(dtype), jnp.broadcast_to(mask, x.shape)
        count = red(maskb.astype(dtype))
        safe = jnp.maximum(count, 1)
        shift = red(jnp.where(maskb, xf, 0)) / safe
        d = jnp.where(maskb, xf - shift, 0)
        mean, m2 = _shifted_sums(red, d, d, shift, safe)
    if axis_name is not None:
        count, mean, m2 = _combine_moments(count, mean, m2, axis_name, axis_index_groups)
    var = m2 / jnp.maximum(count, 1)
    return mean, jnp.maximum(var, 0), count


def _cpu_moments(x: Array, *, axes: tuple[int, ...], groups: tuple[int, int] | None) -> tuple[Array, Array]:
    """(mean, M2) as measured fastest on XLA:CPU: one fused row kernel for ``ROW_FUSION_MIN_ROWS`` contiguous rows
    or more, else one checked pass (with shifted sums behind a ``lax.cond`` when the data sits far off zero)."""
    dtype, rows = stats_dtype(x.dtype), _contiguous_rows(x.shape, axes, groups)
    if rows is not None and np.prod(rows[:-1]) >= ROW_FUSION_MIN_ROWS:
        return _row_moments(x, dtype, rows, groups)
    red = functools.partial(sum_over, axes=axes, groups=groups)
    return _checked_one_pass(x, dtype, red, group_count(x.shape, axes, groups))


def _plain_moments(x: Array, *, axes: tuple[int, ...], groups: tuple[int, int] | None) -> tuple[Array, Array]:
    """(mean, M2) on platforms where nothing was measured yet (GPU, TPU): the exact two-pass formula, the mean
    then ``sum((x - mean)^2)``, with no data-dependent branch (a ``lax.cond`` on a GPU waits for its predicate)."""
    dtype, rows = stats_dtype(x.dtype), _contiguous_rows(x.shape, axes, groups)
    if rows is not None:
        return _row_moments(x, dtype, rows, groups)
    red = functools.partial(sum_over, axes=axes, groups=groups)
    xf = x.astype(dtype)
    mean = red(xf) / group_count(x.shape, axes, groups)
    return mean, red(jnp.square(xf - mean))


SLOTS_MAX_DEVICES = 64  # up to this many devices on the axis the triples are gathered in one collective


def _combine_moments(count: Array, mean: Array, m2: Array, axis_name: Any, groups: Any):
    """Chan et al.'s exact combination of every device's (count, mean, M2): ``M2 = sum(M2_i + n_i (mean_i - mean)^2)``.

    Up to ``SLOTS_MAX_DEVICES`` devices (real devices): ONE collective gathers all triples (``device_slots``), whose
    payload grows as devices^2 but stays tiny. Beyond that (a ``jax.vmap`` over examples with ``axis_name``, as
    Equinox users write batch norm: thousands of "devices"), the gather would be quadratic, so two psums of
    per-device size do it in linear time: ``(n_i, n_i mean_i)`` gives the global mean, then the M2 terms about it.
    Both give the same exact formula.
    """
    count = jnp.broadcast_to(count, mean.shape)
    if jax.lax.axis_size(axis_name) <= SLOTS_MAX_DEVICES:
        counts, means, m2s = device_slots(jnp.stack([count, mean, m2]), axis_name, groups)
        total = jnp.sum(counts, 0, keepdims=True)
        mean_all = jnp.sum(counts * means, 0, keepdims=True) / jnp.maximum(total, 1)
        return total[0], mean_all[0], jnp.sum(m2s + counts * jnp.square(means - mean_all), 0)
    total, weighted = group_psum(jnp.stack([count, count * mean]), axis_name, groups)
    mean_all = weighted / jnp.maximum(total, 1)
    return total, mean_all, group_psum(m2 + count * jnp.square(mean - mean_all), axis_name, groups)


def group_psum(v: Array, axis_name: Any, groups: Any) -> Array:
    """``psum`` of ``v`` over the devices of this device's ``axis_index_groups`` group (all when None), in linear
    time and under vmap, shard_map and jit alike: each device writes ``v`` into its group's slot (``G`` slots, one
    psum) and reads its group's sum back."""
    if groups is None:
        return jax.lax.psum(v, axis_name)
    size, index = jax.lax.axis_size(axis_name), jax.lax.axis_index(axis_name)
    mine = jnp.asarray(_group_of(groups, size))[index]
    hot = jax.nn.one_hot(mine, len(groups), dtype=v.dtype).reshape((len(groups),) + (1,) * v.ndim)
    return jax.lax.psum(hot * v[None], axis_name)[mine]


def device_slots(mine: Array, axis_name: Any, axis_index_groups: Any) -> Array:
    """Every device's ``mine`` along a new leading axis, ONE collective (zeros for devices outside the group).

    Each device writes its array into its own slot and a ``psum`` gathers them (unlike ``all_gather``, psum's
    result is known to be replicated, so shard_map's checks pass). With ``axis_index_groups`` the slots of devices
    outside this device's group are zeroed afterwards (a static membership table), which works under shard_map,
    vmap and jit alike. Returns ``(devices, *mine.shape)``; the payload is devices x ``mine``, so callers use it
    for real device counts only (see ``_combine_moments``).
    """
    size, index = jax.lax.axis_size(axis_name), jax.lax.axis_index(axis_name)
    lift = lambda v: v.reshape(v.shape + (1,) * mine.ndim)
    stacked = jax.lax.psum(lift(jax.nn.one_hot(index, size, dtype=mine.dtype)) * mine[None], axis_name)
    if axis_index_groups is not None:
        stacked = stacked * lift(jnp.asarray(_group_membership(axis_index_groups, size), mine.dtype)[index])
    return jnp.moveaxis(stacked, 1, 0)


def cpu_barrier(tree: Any) -> Any:
    """``jax.lax.optimization_barrier`` of ``tree`` where the program is compiled for CPU; ``tree`` elsewhere.

    Every optimization barrier in jaxnorm is an XLA:CPU scheduling device, measured there: it hands each full-size
    consumer its own copy of an operand, so XLA:CPU recomputes ``x - mean`` or converts bfloat16 inside each
    fusion instead of writing the shared value to memory. GPUs and TPUs fuse differently and none of this was
    measured on them, so they get the plain program. ``jax.lax.platform_dependent`` is resolved when the program is
    lowered: a program lowered for one platform holds that platform's branch only (and a multi-platform export
    holds both).
    """
    return jax.lax.platform_dependent(tree, cpu=jax.lax.optimization_barrier, default=lambda t: t)


ROW_FUSION_MIN_ROWS = 4096  # row statistics from this many rows on (see _contiguous_rows)


def _contiguous_rows(shape: Sequence[int], axes: tuple[int, ...], groups: tuple[int, int] | None):
    """``shape`` as ``(rows..., row_length)`` when each statistic pools one contiguous row, else None.

    Rows: the reduced axes are the trailing block (layer norm; instance norm in NCHW), or, with ``groups``, the
    trailing block right after the channel axis (group norm in NCHW: a group's channels are adjacent). On CPU the
    row path is taken from ``ROW_FUSION_MIN_ROWS`` rows on: there XLA:CPU (jax 0.10) compiles the row statistics
    and the normalization into one row-wise kernel; with fewer it does not, and the checked one-pass sums, two
    independent reductions that run side by side, are faster (measured: instance norm 16x64x64x64 4.4 -> 4.9 ms
    with rows).
    """
    k = len(shape) - len(axes)
    if not axes or tuple(sorted(axes)) != tuple(range(k, len(shape))):
        return None
    if groups is None:
        rows = tuple(shape[:k]) + (-1,)
    elif groups[0] == k - 1:
        rows = tuple(shape[: k - 1]) + (groups[1], -1)
    else:
        return None
    return rows


def _row_moments(x: Array, dtype: Any, rows: tuple[int, ...], groups: tuple[int, int] | None) -> tuple[Array, Array]:
    """(mean, M2) of contiguous rows by the exact two-pass formula: ``M2 = sum((x - mean)^2)``.

    A row is contiguous, so XLA:CPU fuses both reductions and the normalization that follows into one kernel
    that walks the rows (measured: layer norm's forward becomes a single fusion, one read of x and one write of
    y). No cancellation to guard against: the mean's rounding (eps * log2(n) * |mean|) enters M2 only squared,
    below the rounding already in x itself.
    """
    x1, x2 = (c.reshape(rows) for c in _converted_copies(x, 2, dtype))
    n = x1.shape[-1]
    mean = jnp.sum(x1, -1, keepdims=True) / n
    m2 = jnp.sum(jnp.square(x2 - cpu_barrier(mean)), -1, keepdims=True)
    if groups is not None:  # one statistic per group -> one per channel: (..., G, 1) -> (..., C, 1)
        ax, g = groups
        mean, m2 = (jnp.repeat(t, x.shape[ax] // g, axis=ax) for t in (mean, m2))
    keep = x.shape[: len(rows) - 1] if groups is None else x.shape[: groups[0] + 1]
    shape = tuple(keep) + (1,) * (x.ndim - len(keep))
    return mean.reshape(shape), m2.reshape(shape)


ONE_PASS_MAX_RATIO = 16.0  # the one-pass statistics stand when every group's mean^2 <= 16 x its variance


def _checked_one_pass(x: Array, dtype: Any, red: Callable[[Array], Array], n: float) -> tuple[Array, Array]:
    """(mean, M2) from one fused pass when that is provably accurate, else from shifted sums around its mean.

    One pass: ``sum(x)`` and ``sum(x^2)``, two independent reductions of x that XLA fuses into one loop or runs
    side by side (XLA:CPU's YNNPACK reductions). ``E[x^2] - E[x]^2`` loses
    digits when |mean| >> std: with sums accurate to g = eps * log2(n) relative to sum(|x|), the variance's error is
    at most g * (2 * var + 4 * mean^2). So the pass is kept only when every group has ``mean^2 <= 16 * var`` (and
    a finite variance), which bounds the error by 66 * g (~1e-4 relative in float32 for a million values; random
    rounding makes it far smaller in practice); the test cannot be fooled by the cancellation itself, because that
    error is far below ``mean^2`` (tested just inside and outside the limit).
    Otherwise (data far off zero, or sums of squares that overflow) a ``lax.cond`` runs two more passes: shifted
    sums (Chan, Golub & LeVeque) around the one-pass mean m, ``mean = m + sum(x - m)/n`` and
    ``M2 = sum((x - m)^2) - sum(x - m)^2/n``, exact to a few eps because m is within a few std of the mean
    (float32 with mean 1e6 and std 1 keeps its digits). m goes through an optimization barrier twice so that
    XLA:CPU fuses x - m into each reduction instead of writing x - m to memory (measured 2x slower).
    Under ``vmap`` the predicate is batched and the cond becomes a select: both branches run, still exact.
    """
    x1, x2 = _converted_copies(x, 2, dtype)
    s1, s2 = red(x1), red(jnp.square(x2))
    m = s1 / n
    var = s2 / n - jnp.square(m)
    one_pass_ok = jnp.all(jnp.isfinite(var) & (jnp.square(m) <= ONE_PASS_MAX_RATIO * var))

    def shifted(m):  # x is converted inside the branch, so the fast path never pays for it
        (x_a, x_b), (m_a, m_b) = cpu_barrier(((x, x), (m, m)))
        return _shifted_sums(red, x_a.astype(dtype) - m_a, x_b.astype(dtype) - m_b, m, n)

    return jax.lax.cond(one_pass_ok, lambda m: (m, var * n), shifted, m)


def _shifted_sums(red: Callable[[Array], Array], d_a: Array, d_b: Array, shift: Array, count: Any):
    """(mean, M2) from deviations ``d = x - shift`` (Chan, Golub & LeVeque): ``sum(d)`` repairs the shift's offset.

    ``d_a`` and ``d_b`` are the same deviations, given twice so each reduction can fuse its own copy.
    """
    t1, t2 = red(d_a), red(jnp.square(d_b))
    return shift + t1 / count, t2 - jnp.square(t1) / count


def _converted_copies(t: Array, k: int, dtype: Any):
    """An iterator over ``k`` copies of ``t`` in ``dtype``, one per full-size consumer.

    A narrower ``t`` (bfloat16/float16) is converted lazily from its own copy behind an optimization barrier, so
    each consumer converts inside its own fusion: one shared conversion made XLA:CPU write ``t`` in ``dtype`` to
    memory and read it back (bfloat16 batch norm's forward 2x slower, measured).
    """
    if t.dtype == dtype:
        return iter((t,) * k)
    return (c.astype(dtype) for c in cpu_barrier((t,) * k))


def group_count(shape: Sequence[int], axes: Sequence[int], groups: tuple[int, int] | None = None) -> float:
    """Number of elements each statistic of ``sum_over(t, axes, groups)`` pools."""
    n = float(np.prod([shape[a] for a in axes])) if axes else 1.0
    return n * (shape[groups[0]] // groups[1]) if groups else n


def sum_over(t: Array, axes: tuple[int, ...], groups: tuple[int, int] | None = None) -> Array:
    """``jnp.sum(t, axes, keepdims=True)``, staged so XLA:CPU sees reductions it emits well.

    ``groups=(axis, G)`` then also sums the channels on ``axis`` within each of ``G`` contiguous groups and gives
    every channel its group's sum: group norm reduces spatially in the input's own layout first, which XLA:CPU
    does ~10x faster than one reduction over a ``(..., G, C/G)`` view in channels-last layout (measured).
    A reduction over some outer axes *and* a trailing block (batch norm in NCHW: ``(0, 2, 3)``) runs as two: the
    outer axes first (keeping the contiguous minor dims), then the trailing block (measured ~10% faster).
    """
    if groups is not None:
        return group_combine(sum_over(t, axes), groups)
    axes = tuple(sorted(axes))
    trailing = []
    for a in range(t.ndim - 1, -1, -1):
        if a not in axes:
            break
        trailing.append(a)
    rest = tuple(a for a in axes if a not in trailing)
    if not trailing or not rest:
        return jnp.sum(t, axes, keepdims=True)
    return jnp.sum(jnp.sum(t, rest, keepdims=True), tuple(trailing), keepdims=True)


def group_combine(s: Array, groups: tuple[int, int] | None) -> Array:
    """Sum the channels on ``groups[0]`` within each of ``groups[1]`` contiguous groups, per channel."""
    if groups is None:
        return s
    ax, g = groups
    c = s.shape[ax]
    s = jnp.sum(s.reshape(s.shape[:ax] + (g, c // g) + s.shape[ax + 1 :]), ax + 1)
    return jnp.repeat(s, c // g, axis=ax)


def _group_of(groups: Any, size: int) -> np.ndarray:
    """Each device's group index (``(size,)`` ints); the groups must partition range(size)."""
    flat = sorted(int(i) for g in groups for i in g)
    if flat != list(range(size)):
        raise ValueError(
            f"`axis_index_groups`={groups!r} must split the {size} devices of the axis into disjoint groups that "
            f"cover each index 0..{size - 1} exactly once."
        )
    group_of = np.zeros(size, np.int32)
    for g, members in enumerate(groups):
        group_of[list(members)] = g
    return group_of


def _group_membership(groups: Any, size: int) -> np.ndarray:
    """(size, size) table: row i marks the devices in device i's group."""
    group_of = _group_of(groups, size)
    return (group_of[:, None] == group_of[None, :]).astype(np.float64)


def mean_square(
    x: Array,
    reduction_axes: Sequence[int],
    *,
    mask: Array | None = None,
    axis_name: Hashable | None = None,
    axis_index_groups: Any = None,
) -> Array:
    """Mean of ``x**2`` over ``reduction_axes`` (kept), in ``stats_dtype(x.dtype)`` (RMSNorm's statistic); with
    ``mask`` over the True positions only, with ``axis_name`` over every device's positions (one collective)."""
    axes = tuple(reduction_axes)
    xf = x.astype(stats_dtype(x.dtype))
    if mask is None and axis_name is None:
        return jnp.mean(jnp.square(xf), axes, keepdims=True)
    sq = jnp.square(xf)
    if mask is None:
        total, count = jnp.sum(sq, axes, keepdims=True), jnp.full((1,) * x.ndim, group_count(x.shape, axes), xf.dtype)
    else:
        maskb = jnp.broadcast_to(mask, x.shape)
        total, count = jnp.sum(jnp.where(maskb, sq, 0), axes, keepdims=True), sum_over(maskb.astype(xf.dtype), axes)
    if axis_name is not None:
        count = jnp.broadcast_to(count, total.shape)
        total, count = group_psum(jnp.stack([total, count]), axis_name, axis_index_groups)
    return total / jnp.maximum(count, 1)


def normalize(
    x: Array,
    mean: Array | None,
    var: Array,
    eps: float,
    scale: Array | None = None,
    bias: Array | None = None,
) -> Array:
    """``(x - mean) * rsqrt(var + eps) * scale + bias`` in the statistics dtype, returned in ``x.dtype``.

    ``mean``/``var``/``scale``/``bias`` must already broadcast against ``x`` at equal rank; ``mean=None``
    skips centring (RMSNorm). The per-element work is one subtract and one fused multiply-add.
    """
    dtype = var.dtype
    mul = jax.lax.rsqrt(var + jnp.asarray(eps, dtype))
    if scale is not None:
        mul = mul * scale.astype(dtype)
    xf = x.astype(dtype)
    if mean is not None:
        xf = xf - mean
    y = xf * mul
    if bias is not None:
        y = y + bias.astype(dtype)
    return y.astype(x.dtype)


def normalize_batch(
    x: Array,
    reduction_axes: Sequence[int],
    eps: float,
    scale: Array | None = None,
    bias: Array | None = None,
    *,
    groups: tuple[int, int] | None = None,
    mask: Array | None = None,
    axis_name: Hashable | None = None,
    axis_index_groups: Any = None,
) -> tuple[Array, Array, Array, Array]:
    """Normalize ``x`` with its own statistics over ``reduction_axes``: returns ``(y, mean, var, count)``.

    ``moments`` then ``normalize``. Without ``mask``/``axis_name`` the derivative is the closed-form tangent map
    of ``_normalize_tangents`` (a ``custom_jvp``), so forward and reverse mode both get the textbook batch-norm
    derivative instead of differentiating the statistics' passes; the results are the same to rounding.
    """
    if mask is None and axis_name is None:
        axes = tuple(reduction_axes)
        y, mean, var = _normalize_fused(x, axes, groups, float(eps), True, kernels._mode(), scale, bias)
        count = jnp.full((1,) * x.ndim, group_count(x.shape, axes, groups), mean.dtype)
        return y, mean, var, count
    mean, var, count = moments(
        x, reduction_axes, groups=groups, mask=mask, axis_name=axis_name, axis_index_groups=axis_index_groups
    )
    return normalize(x, mean, var, eps, scale, bias), mean, var, count


def normalize_rms(
    x: Array,
    reduction_axes: Sequence[int],
    eps: float,
    scale: Array | None = None,
    *,
    bias: Array | None = None,
    mask: Array | None = None,
    axis_name: Hashable | None = None,
    axis_index_groups: Any = None,
) -> Array:
    """RMS normalization ``x * rsqrt(mean(x**2) + eps) * scale (+ bias)`` over ``reduction_axes``.

    Differentiated by the same closed-form tangent map as the centred layers (``_normalize_tangents`` with no
    mean): reverse mode saves x and 1/rms only (differentiating the forward instead made XLA:CPU write four
    full-size temporaries: the broadcast scale, 1/rms, their product and ``x * dy``). With ``mask`` or
    ``axis_name`` the statistic is ``mean_square``'s and JAX differentiates it.
    """
    if mask is None and axis_name is None:
        return _normalize_fused(x, tuple(reduction_axes), None, float(eps), False, kernels._mode(), scale, bias)[0]
    ms = mean_square(x, reduction_axes, mask=mask, axis_name=axis_name, axis_index_groups=axis_index_groups)
    return normalize(x, None, ms, eps, scale, bias)


def _fused_statistics(x: Array, axes: tuple[int, ...], groups: tuple[int, int] | None, centre: bool):
    """(mean, var) as ``moments`` computes them, or (None, mean(x**2)) for RMS normalization (``centre=False``)."""
    if centre:
        return moments(x, axes, groups=groups)[:2]
    return None, mean_square(x, axes)


def _xla_forward(x, axes, groups, eps, centre, scale, bias):
    mean, var = _fused_statistics(x, axes, groups, centre)
    return normalize(x, mean, var, eps, scale, bias), mean, var


def _pallas_rows(x, axes, groups, scale, bias) -> bool:
    """Whether this call is one the Pallas row kernel computes: statistics over trailing dims (layer/RMS norm),
    float32/bfloat16/float16 x, and a scale and bias (if any) over exactly those dims."""
    k = x.ndim - len(axes)
    if groups is not None or not axes or tuple(sorted(axes)) != tuple(range(k, x.ndim)) or k == 0:
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


def _forward(x, axes, groups, eps, centre, mode, scale, bias):
    """``(y, mean, var)``: the XLA program, or on NVIDIA GPUs with ``jaxnorm.kernels`` enabled the Pallas row
    kernel for layer/RMS norm (``kernels.enable_pallas(interpret=True)`` runs it everywhere, interpreted)."""
    def xla(x, scale, bias):
        return _xla_forward(x, axes, groups, eps, centre, scale, bias)

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


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2, 3, 4, 5))
def _normalize_fused(x, axes, groups, eps, centre, mode, scale, bias):
    """``(y, mean, var)`` of ``normalize`` with x's own statistics; the derivative is ``_normalize_tangents``.

    ``mode`` is ``kernels._mode()`` at the call (static: traces and caches are keyed on it)."""
    return _forward(x, axes, groups, eps, centre, mode, scale, bias)


def _normalize_fused_jvp(axes, groups, eps, centre, mode, primals, tangents):
    x, scale, bias = primals
    y, mean, var = _forward(x, axes, groups, eps, centre, mode, scale, bias)
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
    n = group_count(x.shape, axes, groups)
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


def channel_shape(ndim: int, axis: int, size: int) -> tuple[int, ...]:
    """Shape that broadcasts a (size,) per-channel vector along ``axis`` of a rank-``ndim`` array."""
    return tuple(size if i == axis else 1 for i in range(ndim))


def update_running(
    batch_stats: Mapping[str, Array],
    batch_mean: Array,
    batch_var: Array,
    count: Array | None,
    momentum: float | None,
    unbiased: bool = True,
) -> dict[str, Array]:
    """PyTorch's running-statistics update from per-channel batch statistics.

    ``momentum`` is the weight of the new batch; ``None`` is the cumulative average over ``count`` batches.
    The running variance takes the unbiased batch variance ``var * n / (n - 1)`` (``unbiased=False``: the biased
    one, as flax.linen.BatchNorm does). A state without ``count`` (Flax's layout) stays without it.
    State made with ``nonfinite_guard=True`` (a ``skipped`` counter) keeps its
    statistics when the batch's are not finite and counts the skipped batch instead.
    """
    dtype = batch_stats["mean"].dtype
    new_count = batch_stats["count"] + 1 if "count" in batch_stats else None
    if momentum is None:  # the callers check that "count" is there
        assert new_count is not None
        factor = 1.0 / new_count.astype(dtype)
    else:
        factor = jnp.asarray(momentum, dtype)
    if unbiased:
        assert count is not None, "the unbiased update needs the batch's element count"
        batch_var = batch_var * (count / (count - 1))
    mean = (1 - factor) * batch_stats["mean"] + factor * batch_mean.astype(dtype)
    var = (1 - factor) * batch_stats["var"] + factor * batch_var.astype(dtype)
    new = {"mean": mean.astype(dtype), "var": var.astype(dtype)}
    if new_count is not None:
        new["count"] = new_count
    if "skipped" in batch_stats:  # non-finite guard: a NaN/inf batch leaves the statistics as they were
        ok = jnp.all(jnp.isfinite(batch_mean)) & jnp.all(jnp.isfinite(batch_var))
        new = {k: jnp.where(ok, v, batch_stats[k]) for k, v in new.items()}
        new["skipped"] = batch_stats["skipped"] + jnp.where(ok, 0, 1).astype(batch_stats["skipped"].dtype)
    return new
