"""bfloat16 and float16: the one home of the low-precision tests.

Statistics are computed and stored in float32 whatever the input's dtype; the output has the input's dtype. Checked
here: every layer's output dtype and values against the same layer on the float64 conversion; the first-order
derivatives of every core mode against the float64 textbook derivative; the Flax wrappers with float32 params and
statistics on narrow activations; values near the ends of float16's and bfloat16's range; and the functional, linen
and NNX levels giving the same bits in bfloat16.
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxnorm
from jaxnorm import linen as jl
from tests import registry, test_flax
from tests.test_transforms import _as_float64, _float_function, _randoms
from tests.tolerances import tol

RNG = np.random.default_rng(0)
LOW = [jnp.bfloat16, jnp.float16]


@pytest.mark.parametrize("dtype", [*LOW, jnp.float32, jnp.float64])
@pytest.mark.parametrize("name,ctor,shape", registry.LAYERS, ids=[t[0] for t in registry.LAYERS])
def test_output_dtype_matches_input_and_stats_stay_float32(name, ctor, shape, dtype):
    built = registry.build(name, ctor, jnp.float32)
    x = jnp.asarray(np.random.default_rng(1).normal(size=shape), dtype)
    run = jax.jit(functools.partial(built.apply, training=True))
    y, stats = run(built.params, built.batch_stats, x)
    chex.assert_type(y, dtype)
    chex.assert_shape(y, shape)
    if stats:
        chex.assert_type([stats["mean"], stats["var"]], jnp.float32)
    ref, _ = run(built.params, built.batch_stats, x.astype(jnp.float64))
    rtol = {jnp.float16: 5e-3, jnp.bfloat16: 3e-2, jnp.float32: 1e-5, jnp.float64: 1e-12}[dtype]
    np.testing.assert_allclose(np.asarray(y, np.float64), ref, atol=rtol * 4, rtol=rtol)


@pytest.mark.parametrize("layer", ["batch", "layer", "group", "rms"])
def test_statistics_of_narrow_inputs_are_accumulated_in_float32(layer):
    """4096 bfloat16 values per statistic, centred off zero: summed in bfloat16 (8 bits of mantissa) the mean and
    variance would be off by several percent; accumulated in float32 the output matches the float64 formula on the
    same rounded inputs to bfloat16's own rounding of y."""
    x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 4096)) * 0.5 + 3.0, jnp.bfloat16)
    run = {"batch": lambda x: jaxnorm.batch_norm({}, {}, x.T, training=True)[0].T,
           "layer": lambda x: jaxnorm.layer_norm({}, x, normalized_shape=4096),
           "group": lambda x: jaxnorm.group_norm({}, x[:, None], num_groups=1)[:, 0],
           "rms": lambda x: jaxnorm.rms_norm({}, x, normalized_shape=4096, eps=1e-5)}[layer]
    xd = np.asarray(x, np.float64)
    mean = 0.0 if layer == "rms" else xd.mean(1, keepdims=True)
    ref = (xd - mean) / np.sqrt(((xd - mean) ** 2).mean(1, keepdims=True) + 1e-5)
    y = jax.jit(run)(x)
    chex.assert_type(y, jnp.bfloat16)
    np.testing.assert_allclose(np.asarray(y, np.float64), ref, rtol=2 ** -7, atol=2 ** -7 * np.abs(ref).max())


@pytest.mark.parametrize("dtype", LOW)
def test_narrow_layers_keep_float32_running_statistics(dtype):
    """Params in the layer's dtype, running statistics in float32 (the init functions and every update)."""
    x = jnp.asarray(np.random.default_rng(3).normal(size=(8, 3, 4)), dtype)
    for init, fn in ((jaxnorm.batch_norm_init, jaxnorm.batch_norm),
                     (functools.partial(jaxnorm.instance_norm_init, affine=True, track_running_stats=True),
                      jaxnorm.instance_norm)):
        params, stats = init(3, dtype=dtype)
        chex.assert_type(jax.tree.leaves(params), dtype)
        chex.assert_type([stats["mean"], stats["var"]], jnp.float32)
        y, new = jax.jit(functools.partial(fn, training=True))(params, stats, x)
        chex.assert_type(y, dtype)
        chex.assert_trees_all_equal_dtypes(new, stats)


# bfloat16 for every core mode; float16 (the same code path, a different rounding) for one mode per layer family
FIRST_ORDER_CASES = ([(m, jnp.bfloat16) for m in registry.CORE_MODES if not m.complex]
                     + [(m, jnp.float16) for m in registry.CORE_MODES
                        if m.name in ("batch_norm/train/2d", "instance_norm/train", "layer_norm", "rms_norm",
                                      "group_norm/channels_last", "batch_norm/train/mask")])


@pytest.mark.parametrize("mode,dtype", FIRST_ORDER_CASES,
                         ids=[f"{m.name}-{jnp.dtype(d).name}" for m, d in FIRST_ORDER_CASES])
def test_first_order_transformations_in_low_precision(mode, dtype):
    """jvp and vjp match the float64 textbook derivative on the same rounded inputs, to the low-precision tolerance
    scaled by the size of the tangent's terms. Forward mode's tangent is rounded to the input dtype in parts (the
    price of the fast narrow-dtype backward), so its error is bounded by the rounding of its largest term, about
    ``|scale| * max|x_dot| / std``, which these inputs keep near 1. (The wrappers add no math: their narrow dtypes
    are checked by the mixed-precision test below.)"""
    inputs = mode.make(dtype)
    g, floats = _float_function(mode.call, inputs)
    ref_inputs = _as_float64(inputs)
    g_ref, floats_ref = _float_function(mode.textbook, ref_inputs)
    tangents = [t.astype(f.dtype) for t, f in zip(_randoms(floats_ref, 2), floats, strict=True)]
    outs = jax.eval_shape(g, floats)
    cotangents = [c.astype(o.dtype) for c, o in zip(_randoms(outs, 3), outs, strict=True)]

    def first_order(g, floats, tangents, cotangents):
        return jax.jvp(g, (floats,), (tangents,))[1], jax.vjp(g, floats)[1](cotangents)[0]

    got = jax.jit(functools.partial(first_order, g))(floats, tangents, cotangents)
    want = jax.jit(functools.partial(first_order, g_ref))(
        floats_ref, [t.astype(jnp.float64) for t in tangents], [c.astype(jnp.float64) for c in cotangents])
    tolerance = tol(jnp.dtype(dtype).name)
    for kind, a_list, b_list in zip(("jvp", "vjp"), got, want, strict=True):
        for a, b in zip(a_list, b_list, strict=True):
            scale = max(1.0, float(jnp.max(jnp.abs(b))))
            np.testing.assert_allclose(np.asarray(a, np.float64), b, rtol=tolerance["rtol"],
                                       atol=tolerance["atol"] * scale, err_msg=f"{mode.name}: {kind}")


MIXED_TOL = {jnp.bfloat16: 2e-2, jnp.float16: 2e-3}  # relative to the output scale; see README


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("make", [lambda: jl.BatchNorm(), lambda: jl.InstanceNorm(affine=True),
                                  lambda: jl.LayerNorm(), lambda: jl.GroupNorm(num_groups=2),
                                  lambda: jl.RMSNorm()], ids=["BN", "IN", "LN", "GN", "RMS"])
def test_low_precision_activations_with_float32_params_and_stats(make, dtype):
    model = make()
    x32 = jnp.asarray(RNG.normal(size=(4, 5, 6, 4)) * 3 + 2, jnp.float32)
    kw = {"use_running_average": False} if isinstance(model, (jl.BatchNorm, jl.InstanceNorm)) else {}
    mut = {"mutable": ["batch_stats"]} if isinstance(model, jl.BatchNorm) else {}
    v = model.init(jax.random.key(0), x32, **kw)
    v = jax.tree.map(lambda p: p + 0.1 if p.dtype == jnp.float32 else p, v)
    apply = jax.jit(lambda v, x: model.apply(v, x, **kw, **mut))
    out_lo, out_32 = apply(v, x32.astype(dtype)), apply(v, x32)
    (y_lo, s_lo), (y_32, s_32) = (out_lo, out_32) if mut else ((out_lo, {}), (out_32, {}))
    chex.assert_type(y_lo, dtype)
    chex.assert_type(jax.tree.leaves(v["params"]), jnp.float32)
    np.testing.assert_allclose(np.asarray(y_lo, np.float32), y_32, atol=MIXED_TOL[dtype] * 4,
                               rtol=MIXED_TOL[dtype])
    chex.assert_trees_all_equal_dtypes(s_lo, s_32)  # statistics stay float32 (int32 count)
    chex.assert_trees_all_close(s_lo, s_32, rtol=MIXED_TOL[dtype], atol=MIXED_TOL[dtype])


# |x| stays below float16's max 65504; for bfloat16 the float32 sum of squared deviations must stay below float32's
# max 3.4e38, i.e. spread**2 * N (PyTorch also accumulates bfloat16 batch norm in float32; see README)
@pytest.mark.parametrize("dtype,loc,spread", [(jnp.float16, 5.5e4, 3.0e3), (jnp.float16, 0.0, 2.0e4),
                                              (jnp.bfloat16, 3e4, 3e3), (jnp.bfloat16, 0.0, 1e18)])
def test_huge_low_precision_values_normalize_in_float32(dtype, loc, spread):
    """float16/bfloat16 near their range: statistics in float32 stay finite and the output has unit variance."""
    rng = np.random.default_rng(1)
    x = jnp.asarray(loc + spread * np.clip(rng.normal(size=(64, 4)), -3, 3), dtype)
    assert np.isfinite(np.asarray(x, np.float32)).all()
    y, stats = jaxnorm.batch_norm(*jaxnorm.batch_norm_init(4), x, training=True)
    chex.assert_type(y, dtype)
    assert np.isfinite(np.asarray(y, np.float32)).all()
    np.testing.assert_allclose(np.var(np.asarray(y, np.float64), 0), 1, atol=2e-2)
    assert np.isfinite(stats["var"]).all()


@pytest.mark.parametrize("case", range(5), ids=[c[0] for c in test_flax._cases()])
def test_functional_linen_nnx_give_the_same_bits_in_bfloat16(case):
    test_flax.check_equivalence(case, jnp.bfloat16)
