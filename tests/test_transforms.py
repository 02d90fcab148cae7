"""Every layer in every mode under every JAX transformation, against autodiff of the textbook formula.

The matrix: ``registry.MODES`` (batch norm in training and eval, with ``mask``, ``axis_name`` and
``virtual_batch_size``; instance, layer, group and RMS norm; batch renorm; frozen batch norm; complex inputs; the
linen and NNX wrappers) x the transformations (``jvp``, ``linearize``, ``jacfwd``, ``vjp``, ``jacrev``, ``grad``,
``hessian`` (forward-over-reverse), ``jacrev(jacfwd)`` (reverse-over-forward), and ``vmap`` of ``jvp`` and of
``grad``) x how the layer is called (directly, under ``jax.vmap``, under ``jax.checkpoint``, inside ``lax.scan``).
Each layer is a function of all its floating-point inputs, ``x``, the params and the running statistics, and returns
``y`` and the updated statistics, so their tangents and cotangents are checked too. The reference is
``tests.textbook``, plain ``jax.numpy`` differentiated by JAX itself: float64 to 1e-10, float32 to
``tests/tolerances.py``.

What runs where (each program compiles once per mode, so the matrix is sized by what it can find):

- float64, the core modes: every transformation, called directly (fast tier), and under vmap, checkpoint and
  scan for one mode per derivative path (slow tier, ``CONTEXT_MODES``);
- float64, the wrapper modes (linen/NNX over the same core calls, no math of their own): values and the
  first-order transformations (``FIRST_ORDER``);
- float32, every real mode: values and the first-order transformations;
- complex x (``registry``'s ``.../complex`` modes: plain autodiff, as ``jaxnorm._derivative`` leaves complex
  inputs to JAX), in complex128, called directly, each complex leaf as its real and imaginary parts: every
  transformation for masked batch norm, the first-order ones for the others; complex64 in
  ``tests/test_complex.py``;
- bfloat16/float16: ``tests/test_low_precision.py``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import registry
from tests.tolerances import tol


def _seq(x):  # a second input for the mapped/scanned calls, a nonlinear function of x so tangents differ
    return jnp.stack([x, jnp.tanh(x) + 0.5])


def _scan(f, x, p, s):
    def body(stats, xi):
        y, new = f(xi, p, stats)
        return new, y

    new, ys = jax.lax.scan(body, s, _seq(x))
    return ys, new


CONTEXTS = {
    "direct": lambda f: f,
    "vmap": lambda f: lambda x, p, s: jax.vmap(f, in_axes=(0, None, None))(_seq(x), p, s),
    "checkpoint": jax.checkpoint,
    "scan": lambda f: functools.partial(_scan, f),
}


def _parts(t):
    """A real leaf as itself, a complex one as its real and imaginary parts."""
    return [jnp.real(t), jnp.imag(t)] if jnp.iscomplexobj(t) else [t]


def _float_function(f, inputs):
    """``f`` as a function of the list of real floating-point leaves of ``inputs`` (a complex leaf as its real and
    imaginary parts; integer counters held fixed), returning the list of real output leaves (y and the running
    statistics, complex ones as their parts): every transformation is then of a real function."""
    leaves, treedef = jax.tree.flatten(inputs)
    kinds = [2 if jnp.iscomplexobj(t) else 1 if jnp.issubdtype(t.dtype, jnp.floating) else 0 for t in leaves]

    def g(floats):
        it = iter(floats)
        merged = [leaf if k == 0 else next(it) if k == 1 else jax.lax.complex(next(it), next(it))
                  for leaf, k in zip(leaves, kinds, strict=True)]
        args = jax.tree.unflatten(treedef, merged)
        return [p for o in jax.tree.leaves(f(*args)) if jnp.issubdtype(o.dtype, jnp.inexact) for p in _parts(o)]

    return g, [p for leaf, k in zip(leaves, kinds, strict=True) if k for p in _parts(leaf)]


def _as_float64(inputs):
    """The same (dtype-rounded) inputs in float64 (complex128), for the textbook reference."""
    def widen(t):
        if jnp.iscomplexobj(t):
            return t.astype(jnp.complex128)
        return t.astype(jnp.float64) if jnp.issubdtype(t.dtype, jnp.floating) else t

    return jax.tree.map(widen, inputs)


def _randoms(like, seed):
    rng = np.random.default_rng(seed)
    return [jnp.asarray(rng.normal(size=t.shape), t.dtype) for t in like]


# complex modes (plain autodiff, no derivative rule of ours): every transformation in complex128, directly;
# complex64 values and dtypes in tests/test_complex.py
REAL_MODES = [m for m in registry.MODES if not m.complex]
# under vmap/checkpoint/scan (slow tier): one mode per derivative path, as a transformation of a transformation
# finds what differs between paths, not between axes. Left out (each still runs every transformation directly):
# the eval modes with running statistics, renorm's eval and frozen BN (an affine map of x: no rule of ours), the
# channels-last twins of batch and group norm (the same rule on another axis), and three of the five masked modes
# (the same masked statistics; batch norm's, with its running update, and RMS norm's mean square stay)
CONTEXT_MODES = [m for m in REAL_MODES if m.core and m.name not in {
    "batch_norm/eval", "instance_norm/eval", "batch_renorm/eval", "frozen_batch_norm",
    "batch_norm/train/channels_last", "group_norm/channels_last",
    "instance_norm/train/mask", "layer_norm/channels_first/mask", "group_norm/mask"}]
ALL = ("values", "jvp", "linearize", "jacfwd", "vjp", "jacrev", "grad", "hessian", "jacrev(jacfwd)", "vmap(jvp)",
       "vmap(grad)")
FIRST_ORDER = ("values", "jvp", "linearize", "vjp", "grad")


def transforms_for(mode: registry.Mode, dtype) -> tuple[str, ...]:
    """The transformations the matrix checks for ``mode`` in ``dtype`` (see the module docstring)."""
    if mode.complex:  # JAX's own autodiff: one mode shows it composes under every transformation
        return ALL if mode.name == "batch_norm/train/mask/complex" else FIRST_ORDER
    return ALL if mode.core and jnp.dtype(dtype) == jnp.float64 else FIRST_ORDER


def _all_transforms(g, floats, which=ALL):
    """The transformations ``which`` of ``g`` at ``floats``, as one jitted program (one compilation per mode)."""
    outs = jax.eval_shape(g, floats)
    weights = _randoms(outs, 1)
    loss = lambda fl: sum(jnp.sum(jnp.sin(o) * w) for o, w in zip(g(fl), weights, strict=True))
    tangents, cotangents = _randoms(floats, 2), _randoms(outs, 3)

    @jax.jit
    def run(floats, tangents, cotangents):
        pair = [jnp.stack([t, 0.5 * t + 0.1]) for t in floats]  # an ensemble of two points, for vmap of a transform
        pair_tangents = [jnp.stack([t, -t]) for t in tangents]
        every = {
            "values": lambda: g(floats),
            "jvp": lambda: jax.jvp(g, (floats,), (tangents,)),
            "linearize": lambda: jax.linearize(g, floats)[1](tangents),
            "jacfwd": lambda: jax.jacfwd(g)(floats),
            "vjp": lambda: jax.vjp(g, floats)[1](cotangents),
            "jacrev": lambda: jax.jacrev(g)(floats),
            "grad": lambda: jax.grad(loss)(floats),
            "hessian": lambda: jax.hessian(loss)(floats),
            "jacrev(jacfwd)": lambda: jax.jacrev(jax.jacfwd(loss))(floats),
            "vmap(jvp)": lambda: jax.vmap(lambda fl, t: jax.jvp(g, (fl,), (t,)))(pair, pair_tangents),
            "vmap(grad)": lambda: jax.vmap(jax.grad(loss))(pair),
        }
        return {k: every[k]() for k in which}

    return run(floats, tangents, cotangents)


def _check(mode: registry.Mode, context: str, dtype) -> None:
    wrap = CONTEXTS[context]
    inputs = mode.make(dtype)
    which = transforms_for(mode, dtype)
    g, floats = _float_function(wrap(mode.call), inputs)
    ref_inputs = _as_float64(inputs)
    g_ref, floats_ref = _float_function(wrap(mode.textbook), ref_inputs)
    got, want = _all_transforms(g, floats, which), _all_transforms(g_ref, floats_ref, which)
    name = jnp.dtype(dtype).name
    for key in got:
        leaves_got, leaves_want = jax.tree.leaves(got[key]), jax.tree.leaves(want[key])
        assert len(leaves_got) == len(leaves_want), key
        tolerance = tol(name) if key == "values" else tol(name, "grad")
        for a, b in zip(leaves_got, leaves_want, strict=True):
            np.testing.assert_allclose(a, b, **tolerance, err_msg=f"{mode.name}: {key} ({context})")


@pytest.mark.parametrize("mode", registry.MODES, ids=[m.name for m in registry.MODES])
def test_every_transformation_matches_the_textbook_formula_float64(mode):
    _check(mode, "direct", jnp.float64)


@pytest.mark.parametrize("mode", REAL_MODES, ids=[m.name for m in REAL_MODES])
def test_every_transformation_matches_the_textbook_formula_float32(mode):
    _check(mode, "direct", jnp.float32)


@pytest.mark.slow
@pytest.mark.parametrize("context", [c for c in CONTEXTS if c != "direct"])
@pytest.mark.parametrize("mode", CONTEXT_MODES, ids=[m.name for m in CONTEXT_MODES])
def test_every_transformation_under_vmap_checkpoint_and_scan(mode, context):
    _check(mode, context, jnp.float64)


# ------------------------------------------------------------------ what reverse mode keeps


def _memory_cases():
    import jaxnorm

    bn_stats = jaxnorm.batch_norm_init(16)[1]
    return {
        "batch_norm": ((8, 16, 8, 8), {"scale": (16,), "bias": (16,)},
                       lambda p, x: jaxnorm.batch_norm(p, bn_stats, x, training=True)[0]),
        "batch_norm/channels_last": ((8, 8, 8, 16), {"scale": (16,), "bias": (16,)},
                                     lambda p, x: jaxnorm.batch_norm(p, bn_stats, x, training=True, axis=-1)[0]),
        "instance_norm": ((8, 16, 8, 8), {"scale": (16,), "bias": (16,)},
                          lambda p, x: jaxnorm.instance_norm(p, {}, x, training=True)[0]),
        "group_norm": ((8, 16, 8, 8), {"scale": (16,), "bias": (16,)},
                       lambda p, x: jaxnorm.group_norm(p, x, num_groups=4)),
        "group_norm/channels_last": ((8, 8, 8, 16), {"scale": (16,), "bias": (16,)},
                                     lambda p, x: jaxnorm.group_norm(p, x, num_groups=4, axis=-1)),
        "layer_norm": ((256, 64), {"scale": (64,), "bias": (64,)},
                       lambda p, x: jaxnorm.layer_norm(p, x, normalized_shape=64)),
        "rms_norm": ((256, 64), {"scale": (64,)}, lambda p, x: jaxnorm.rms_norm(p, x, normalized_shape=64)),
    }


MEMORY_CASES = _memory_cases()


def _memory_inputs(case, dtype):
    shape, pshapes, f = MEMORY_CASES[case]
    x = jnp.asarray(np.random.default_rng(0).normal(size=shape), dtype)
    return f, {k: jnp.ones(s, jnp.float32) for k, s in pshapes.items()}, x


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("case", list(MEMORY_CASES))
def test_reverse_mode_saves_only_x_and_per_group_statistics(case, dtype):
    """The residuals of jax.vjp are x itself plus statistics-sized arrays: nothing else full-size is kept for the
    backward pass (under lax.scan or eager vjp these residuals are real memory)."""
    f, params, x = _memory_inputs(case, dtype)
    residuals = [r for r in jax.tree.leaves(jax.vjp(f, params, x)[1]) if hasattr(r, "shape")]
    full = [r for r in residuals if r.size == x.size]
    assert len(full) == 1 and np.array_equal(full[0], x), [(r.shape, r.dtype) for r in full]
    small = sum(r.nbytes for r in residuals if r.size != x.size)
    assert small <= x.nbytes // 8, f"{small} bytes of non-x residuals for a {x.nbytes}-byte input"


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("case", list(MEMORY_CASES))
def test_compiled_forward_backward_has_no_full_size_temporary(case, dtype):
    """XLA's compiled forward+backward (dy a runtime argument, as in training) writes no full-size temporary: the
    statistics passes are never differentiated and x - mean, inv * scale and a float32 copy of a narrower dy are
    recomputed inside the fused loops instead of written to memory."""
    f, params, x = _memory_inputs(case, dtype)
    fwd_bwd = jax.jit(lambda p, x, dy: jax.vjp(f, p, x)[1](dy))
    stats = fwd_bwd.lower(params, x, x).compile().memory_analysis()
    if stats is None:  # pragma: no cover - a backend without memory analysis
        pytest.skip("this backend reports no memory analysis")
    assert stats.temp_size_in_bytes < x.nbytes // 4, (stats.temp_size_in_bytes, x.nbytes)


# ------------------------------------------------------------------ zero-size batches


def _empty(x):
    return x[:0]


# the modes an empty batch applies to: all but the per-example calls under a named vmap (an empty batch is no call)
# and the masks with one flag per example (4 of them, which no empty batch broadcasts against)
EMPTY_MODES = [m for m in REAL_MODES if m.name not in {"batch_norm/train/axis_name", "batch_norm/train/mask"}]


def _unchanged(x, p, s):
    """What every layer does with a zero-size batch, as PyTorch: an empty output, the running statistics as they
    were (the batch counter, an integer, is held fixed here: tests/test_core.py counts it)."""
    return jnp.zeros_like(x), s


def _check_empty(mode: registry.Mode, context: str) -> None:
    wrap = CONTEXTS[context]
    x, p, s = mode.make(jnp.float64)
    inputs = (_empty(x), p, s)
    # every transformation for one mode per derivative path, called directly; the first-order ones elsewhere
    which = ALL if mode in CONTEXT_MODES and context == "direct" else FIRST_ORDER
    g, floats = _float_function(wrap(mode.call), inputs)
    g_ref, _ = _float_function(wrap(_unchanged), inputs)
    got, want = _all_transforms(g, floats, which), _all_transforms(g_ref, floats, which)
    assert jax.tree.leaves(got["values"])[0].shape == wrap(_unchanged)(*inputs)[0].shape
    for key in got:
        for a, b in zip(jax.tree.leaves(got[key]), jax.tree.leaves(want[key]), strict=True):
            assert a.shape == b.shape, (mode.name, key)
            np.testing.assert_array_equal(a, b, err_msg=f"{mode.name}: {key} (empty batch, {context})")


@pytest.mark.parametrize("mode", EMPTY_MODES, ids=[m.name for m in EMPTY_MODES])
def test_zero_size_batch_under_every_transformation(mode):
    """A batch of zero examples: y is empty with x's shape, the running statistics pass through unchanged, every
    derivative is the one of that map (zeros for the params, the identity for the statistics), all finite."""
    _check_empty(mode, "direct")


@pytest.mark.slow
@pytest.mark.parametrize("context", [c for c in CONTEXTS if c != "direct"])
@pytest.mark.parametrize("mode", [m for m in CONTEXT_MODES if m in EMPTY_MODES],
                         ids=[m.name for m in CONTEXT_MODES if m in EMPTY_MODES])
def test_zero_size_batch_under_vmap_checkpoint_and_scan(mode, context):
    _check_empty(mode, context)
