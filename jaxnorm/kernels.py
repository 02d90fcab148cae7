"""Pallas kernels for the row-wise layers (LayerNorm, RMSNorm) on GPU: opt-in until measured on one.

The plain XLA program is the reference and the default everywhere. With the kernels enabled, ``layer_norm`` and
``rms_norm`` over trailing dims compute their forward pass with :func:`row_norm_forward` (one read of x, one
write of y, plus the per-row mean and 1/std) where the program is lowered for an NVIDIA GPU (``cuda``, through
Pallas' Triton backend); on every other platform nothing changes. Derivatives stay the closed-form tangent map of
the XLA path (``jax.custom_jvp``), so every transformation keeps working, forward mode and Hessians included::

    import jaxnorm
    with jaxnorm.kernels.pallas():            # or jaxnorm.kernels.enable_pallas(True)
        y = jax.jit(lambda p, x: jaxnorm.layer_norm(p, x, normalized_shape=x.shape[-1]))(params, x)

The setting is read when a function is traced: a function jitted before it changed keeps its compiled program.
:func:`row_norm_backward` (dx and per-block dscale/dbias partials in one pass over x and dy) is the backward
kernel; it is tested against the XLA backward but not yet used by autodiff: JAX has no public way to give a
``custom_jvp`` rule a custom transpose that still supports Hessians (``jax.custom_derivatives.linear_call`` does
not differentiate its residuals), and a ``custom_vjp`` would break forward mode. Both kernels run anywhere in
Pallas' interpreter (``interpret=True``), which is how they are tested without a GPU.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["enable_pallas", "pallas", "pallas_enabled", "pallas_mode", "row_norm_backward", "row_norm_forward",
           "row_norm_vjp"]

# The one process-wide setting, as jax.config's are: read when a function is traced (pallas_mode), never inside one.
_STATE = {"enabled": False, "interpret": False}


def enable_pallas(enabled: bool = True, *, interpret: bool = False) -> None:
    """Use the Pallas forward kernel for LayerNorm/RMSNorm over trailing dims on NVIDIA GPUs (read at trace time).

    ``interpret=True`` also runs it on every other platform, in Pallas' interpreter (slow; for testing).
    """
    if not isinstance(enabled, bool) or not isinstance(interpret, bool):
        raise TypeError(f"enable_pallas: `enabled` and `interpret` must be bools, got {enabled!r} and {interpret!r}.")
    _STATE.update(enabled=enabled, interpret=interpret and enabled)


def pallas_enabled() -> bool:
    """Whether :func:`enable_pallas` is on."""
    return _STATE["enabled"]


def pallas_mode() -> str | None:
    """The setting as the layers read it when traced: None (XLA only), ``"gpu"`` (Pallas on NVIDIA GPUs) or
    ``"interpret"`` (Pallas interpreted, everywhere).

    The core passes it on as a static argument, so every trace and cache (jit's, custom_jvp's) is keyed on it.
    """
    return ("interpret" if _STATE["interpret"] else "gpu") if _STATE["enabled"] else None


@contextlib.contextmanager
def pallas(enabled: bool = True, *, interpret: bool = False) -> Iterator[None]:
    """:func:`enable_pallas` for the duration of a ``with`` block (functions traced inside it)."""
    before = dict(_STATE)
    enable_pallas(enabled, interpret=interpret)
    try:
        yield
    finally:
        _STATE.update(before)


BLOCK_ELEMENTS = 4096  # elements per program's tile: rows of up to 4096 columns fit one tile, shorter rows share one
MAX_PROGRAMS = 512  # backward: programs walking the rows, each writing one row of dscale/dbias partial sums


def _block_rows(n_cols_padded: int) -> int:
    """Rows per tile: ``BLOCK_ELEMENTS`` elements, between 1 and 64 rows (a power of two, as Triton needs)."""
    return int(min(64, max(1, BLOCK_ELEMENTS // n_cols_padded)))


def _padded(n: int) -> int:
    return int(2 ** int(np.ceil(np.log2(max(n, 1)))))


def _compiler_params(interpret: bool, block_elements: int):
    """Triton's parameters (their presence selects Pallas' Triton backend on NVIDIA GPUs rather than Mosaic GPU).

    Warps as in Triton's layer-norm tutorial: one per 256 elements of the tile, between 1 and 8 (so 16-32 float32
    values per thread for 4096-8192-column rows). Not yet tuned on hardware.
    """
    if interpret:
        return None
    from jax.experimental.pallas import triton as pltriton

    return pltriton.CompilerParams(num_warps=int(min(8, max(1, block_elements // 256))))


def _forward_kernel(x_ref, scale_ref, bias_ref, y_ref, mean_ref, var_ref, *, n_cols, eps, centre):
    block = x_ref.shape
    valid = jax.lax.broadcasted_iota(jnp.int32, block, 1) < n_cols
    x = jnp.where(valid, x_ref[...].astype(jnp.float32), 0.0)
    if centre:
        mean = jnp.sum(x, axis=1) / n_cols
        xc = jnp.where(valid, x - mean[:, None], 0.0)
    else:
        mean = jnp.zeros((block[0],), jnp.float32)
        xc = x
    var = jnp.sum(xc * xc, axis=1) / n_cols
    rstd = jax.lax.rsqrt(var + eps)
    scale = jnp.where(valid, scale_ref[...].astype(jnp.float32), 0.0)  # padded columns: never written anyway
    y = xc * rstd[:, None] * scale + jnp.where(valid, bias_ref[...].astype(jnp.float32), 0.0)
    y_ref[...] = y.astype(y_ref.dtype)
    mean_ref[...] = mean
    var_ref[...] = var


def row_norm_forward(x: jax.Array, scale: jax.Array | None, bias: jax.Array | None, eps: float, *,
                     centre: bool = True, interpret: bool = False) -> tuple[jax.Array, jax.Array, jax.Array]:
    """LayerNorm or RMSNorm of each row of a 2-D x in one read: ``y = (x - mean) * rsqrt(var + eps) * scale + bias``.

    Statistics in float32, by the exact two-pass formula inside the block (the row is held on chip).

    Args:
      x: ``(rows, cols)``.
      scale, bias: ``(cols,)`` or None.
      eps: added to the variance.
      centre: True for LayerNorm; False for RMSNorm (no mean; ``var`` is the mean square).
      interpret: run in Pallas' interpreter (any platform).

    Returns:
      ``(y, mean, var)``: y as x; ``mean`` (zeros for RMSNorm) and ``var`` float32 ``(rows,)``.
    """
    from jax.experimental import pallas as pl

    rows, cols = x.shape
    cp = _padded(cols)
    br = _block_rows(cp)
    scale2 = (jnp.ones((cols,), x.dtype) if scale is None else scale).reshape(1, cols)
    bias2 = (jnp.zeros((cols,), x.dtype) if bias is None else bias).reshape(1, cols)
    row_block, vec_block = pl.BlockSpec((br, cp), lambda i: (i, 0)), pl.BlockSpec((1, cp), lambda i: (0, 0))
    stat_block = pl.BlockSpec((br,), lambda i: (i,))
    return pl.pallas_call(
        functools.partial(_forward_kernel, n_cols=cols, eps=float(eps), centre=centre),
        out_shape=(jax.ShapeDtypeStruct(x.shape, x.dtype), jax.ShapeDtypeStruct((rows,), jnp.float32),
                   jax.ShapeDtypeStruct((rows,), jnp.float32)),
        grid=(pl.cdiv(rows, br),),
        in_specs=[row_block, vec_block, vec_block],
        out_specs=(row_block, stat_block, stat_block),
        interpret=interpret,
        compiler_params=_compiler_params(interpret, br * cp),
        name="jaxnorm_layer_norm_fwd" if centre else "jaxnorm_rms_norm_fwd",
    )(x, scale2, bias2)


def _backward_kernel(x_ref, dy_ref, mean_ref, rstd_ref, scale_ref, dx_ref, dscale_ref, dbias_ref, *, n_rows,
                     n_cols, centre, block_rows, tiles):
    """One program: ``tiles`` consecutive tiles of ``block_rows`` rows, read with masked loads (x, dy, dx and the
    statistics stay in memory, ``pl.ANY``); dx written per tile, dscale/dbias accumulated over the tiles in
    float32 and written once, as this program's row of partial sums."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as pltriton

    br, cp = block_rows, dscale_ref.shape[1]
    col_ok = jax.lax.broadcasted_iota(jnp.int32, (br, cp), 1) < n_cols
    scale = jnp.where(col_ok, scale_ref[...].astype(jnp.float32), 0.0)  # (1, cp) block: padded columns masked
    first = pl.program_id(0) * tiles

    def tile(t, sums):
        r0 = ((first + t) * br).astype(jnp.int32)  # int32 indices, also under jax_enable_x64
        rows = r0 + jax.lax.broadcasted_iota(jnp.int32, (br,), 0)
        row_ok = rows < n_rows
        valid = col_ok & row_ok[:, None]
        block = (pl.ds(r0, br), pl.ds(jnp.int32(0), cp))
        x = pltriton.load(x_ref.at[block], mask=valid, other=0.0).astype(jnp.float32)
        dy = pltriton.load(dy_ref.at[block], mask=valid, other=0.0).astype(jnp.float32)
        rstd = pltriton.load(rstd_ref.at[pl.ds(r0, br)], mask=row_ok, other=0.0)[:, None]
        centred = x - pltriton.load(mean_ref.at[pl.ds(r0, br)], mask=row_ok, other=0.0)[:, None] if centre else x
        xhat = jnp.where(valid, centred * rstd, 0.0)
        g = dy * scale
        dx = g - xhat * (jnp.sum(g * xhat, axis=1, keepdims=True) / n_cols)
        if centre:
            dx = dx - jnp.sum(g, axis=1, keepdims=True) / n_cols
        pltriton.store(dx_ref.at[block], (dx * rstd).astype(dx_ref.dtype), mask=valid)
        return sums[0] + jnp.sum(dy * xhat, axis=0, keepdims=True), sums[1] + jnp.sum(dy, axis=0, keepdims=True)

    zeros = jnp.zeros((1, cp), jnp.float32)
    dscale, dbias = jax.lax.fori_loop(0, tiles, tile, (zeros, zeros))
    dscale_ref[...] = dscale
    dbias_ref[...] = dbias


def row_norm_backward(x: jax.Array, dy: jax.Array, mean: jax.Array, rstd: jax.Array, scale: jax.Array | None, *,
                      centre: bool = True, interpret: bool = False,
                      max_programs: int = MAX_PROGRAMS) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The backward of :func:`row_norm_forward` in one pass over x and dy: ``dx = rstd * (g - mean(g) - xhat *
    mean(g * xhat))`` with ``g = dy * scale`` (RMSNorm: no ``mean(g)`` term), ``dscale = sum(dy * xhat)``,
    ``dbias = sum(dy)``.

    At most ``max_programs`` programs each walk a contiguous run of row tiles, writing dx and accumulating
    ``dy * xhat`` and ``dy`` over their rows in float32; each writes one row of partial sums (a ``(programs,
    cols)`` array, small next to x), summed afterwards.

    Args:
      x, dy: ``(rows, cols)``.
      mean, rstd: the forward's mean and ``1 / sqrt(var + eps)``, ``(rows,)``.
      scale: ``(cols,)`` or None.
      centre, interpret: as in :func:`row_norm_forward`.
      max_programs: the most programs walking the rows.

    Returns:
      ``(dx, dscale, dbias)``; ``dbias`` for RMSNorm too (the gradient of a bias, if there is one).
    """
    from jax.experimental import pallas as pl

    rows, cols = x.shape
    cp = _padded(cols)
    br = _block_rows(cp)
    n_tiles = pl.cdiv(rows, br)
    if isinstance(max_programs, bool) or not isinstance(max_programs, int) or max_programs < 1:
        raise ValueError(f"row_norm_backward: `max_programs` must be an int >= 1, got {max_programs!r}.")
    programs = min(n_tiles, max_programs)
    tiles = pl.cdiv(n_tiles, programs)
    programs = pl.cdiv(n_tiles, tiles)  # no program left without rows
    scale2 = (jnp.ones((cols,), x.dtype) if scale is None else scale).reshape(1, cols)
    whole = pl.BlockSpec(memory_space=pl.ANY)
    vec_block, partial_block = pl.BlockSpec((1, cp), lambda i: (0, 0)), pl.BlockSpec((1, cp), lambda i: (i, 0))
    dx, dscale, dbias = pl.pallas_call(
        functools.partial(_backward_kernel, n_rows=rows, n_cols=cols, centre=centre, block_rows=br, tiles=tiles),
        out_shape=(jax.ShapeDtypeStruct(x.shape, x.dtype), jax.ShapeDtypeStruct((programs, cols), jnp.float32),
                   jax.ShapeDtypeStruct((programs, cols), jnp.float32)),
        grid=(programs,),
        in_specs=[whole, whole, whole, whole, vec_block],
        out_specs=(whole, partial_block, partial_block),
        interpret=interpret,
        compiler_params=_compiler_params(interpret, br * cp),
        name="jaxnorm_layer_norm_bwd" if centre else "jaxnorm_rms_norm_bwd",
    )(x, dy, mean.astype(jnp.float32), rstd.astype(jnp.float32), scale2)
    return dx, jnp.sum(dscale, axis=0), jnp.sum(dbias, axis=0)


def row_norm_vjp(centre: bool, eps: float, *, interpret: bool = False):
    """Experimental, reverse mode only: ``f(params, x)``, LayerNorm (``centre``) or RMSNorm of a 2-D ``x`` by
    :func:`row_norm_forward`, differentiated by :func:`row_norm_backward` through a ``jax.custom_vjp``.

    Not the library's path: a ``custom_vjp`` loses forward mode (``jvp``, ``jacfwd``, Hessians), which the layers
    keep. It exists so the benchmark can measure on a GPU what the backward kernel would gain. ``params`` holds
    ``"scale"`` and, optionally, ``"bias"`` (``(cols,)`` each).
    """
    def forward(params, x):
        return row_norm_forward(x, params["scale"], params.get("bias"), eps, centre=centre, interpret=interpret)

    @jax.custom_vjp
    def rows(params, x):
        return forward(params, x)[0]

    def rows_fwd(params, x):
        y, mean, var = forward(params, x)
        return y, (params, x, mean, jax.lax.rsqrt(var + eps))

    def rows_bwd(residuals, dy):
        params, x, mean, rstd = residuals
        dx, dscale, dbias = row_norm_backward(x, dy, mean, rstd, params["scale"], centre=centre, interpret=interpret)
        grads = {"scale": dscale.astype(params["scale"].dtype)}
        if "bias" in params:
            grads["bias"] = dbias.astype(params["bias"].dtype)
        return grads, dx

    rows.defvjp(rows_fwd, rows_bwd)
    return rows
