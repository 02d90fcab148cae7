"""Complex inputs, with Flax's semantics: complex mean, real variance E|x - mean|^2, statistics in at least
complex64 (float32 for the variance), real (or complex) scale and bias. Checked against a complex128 NumPy reference
here, against Flax in tests/test_flax_dropin.py, and under the transformation matrix (tests/registry.py's complex
modes). Complex inputs take plain autodiff: the one custom_jvp serves real inputs only."""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxnorm
from jaxnorm import linen as jl
from jaxnorm import nnx as jn

EPS = 1e-5


def _x(shape, seed=0, dtype=np.complex128):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=shape) * 1.5 + 0.7 + 1j * (rng.normal(size=shape) * 0.8 - 0.4)).astype(dtype)


def _normalized(x, axes, mask=None):
    """complex128 NumPy: (x - mean) / sqrt(E|x - mean|^2 + eps) over ``axes``; mean, biased var and count."""
    w = np.ones(x.shape) if mask is None else np.broadcast_to(np.asarray(mask), x.shape).astype(float)
    n = w.sum(axes, keepdims=True)
    mean = (w * x).sum(axes, keepdims=True) / n
    var = (w * np.abs(x - mean) ** 2).sum(axes, keepdims=True) / n
    return (x - mean) / np.sqrt(var + EPS), mean, var, n


def _channel(v, ndim, axis=1):
    return np.reshape(v, tuple(-1 if i == axis else 1 for i in range(ndim)))


SCALE, BIAS = np.asarray([0.5, 1.5, 1.0]), np.asarray([0.1, -0.2, 0.3])
PARAMS = {"scale": jnp.asarray(SCALE), "bias": jnp.asarray(BIAS)}


def test_batch_norm_training_and_running_statistics():
    x = _x((4, 3, 5))
    mask = np.arange(5) < 4  # lower rank: lines up with the trailing axis
    stats = {"mean": jnp.zeros(3), "var": jnp.ones(3), "count": jnp.asarray(0, jnp.int32)}
    f = jax.jit(lambda x: jaxnorm.batch_norm(PARAMS, stats, x, training=True, mask=mask))
    y, new = f(jnp.asarray(x))
    ref, mean, var, n = _normalized(x, (0, 2), mask)
    np.testing.assert_allclose(y, ref * _channel(SCALE, 3) + _channel(BIAS, 3), rtol=1e-12, atol=1e-12)
    assert new["mean"].dtype == jnp.complex128 and new["var"].dtype == jnp.float64
    np.testing.assert_allclose(new["mean"], 0.1 * mean.ravel(), rtol=1e-12)
    np.testing.assert_allclose(new["var"], 0.9 + 0.1 * (var * n / (n - 1)).ravel(), rtol=1e-12)
    # evaluation with the complex running mean
    y_eval, _ = jax.jit(lambda x: jaxnorm.batch_norm(PARAMS, new, x, training=False))(jnp.asarray(x))
    want = (x - _channel(np.asarray(new["mean"]), 3)) / np.sqrt(_channel(np.asarray(new["var"]), 3) + EPS)
    np.testing.assert_allclose(y_eval, want * _channel(SCALE, 3) + _channel(BIAS, 3), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("layer", ["layer_norm", "rms_norm", "group_norm", "instance_norm"])
def test_per_example_layers_match_complex128_numpy(layer):
    x = _x((2, 3, 4, 2), seed=1)
    mask = np.asarray([True, False, True, True]).reshape(4, 1)  # lower rank, over (H, W)
    if layer == "layer_norm":
        y = jaxnorm.layer_norm({}, jnp.asarray(x), normalized_shape=(4, 2), mask=mask)
        ref = _normalized(x, (2, 3), mask)[0]
    elif layer == "rms_norm":
        y = jaxnorm.rms_norm({}, jnp.asarray(x), normalized_shape=(4, 2), eps=EPS, mask=mask)
        w = np.broadcast_to(mask, x.shape)
        ref = x / np.sqrt((w * np.abs(x) ** 2).sum((2, 3), keepdims=True) / w.sum((2, 3), keepdims=True) + EPS)
    elif layer == "group_norm":
        xg = _x((2, 4, 3, 2), seed=1)
        y = jaxnorm.group_norm({}, jnp.asarray(xg), num_groups=2)
        ref = _normalized(xg.reshape(2, 2, 2, 3, 2), (2, 3, 4))[0].reshape(xg.shape)
    else:
        y, _ = jaxnorm.instance_norm(PARAMS, {}, jnp.asarray(x), training=True, mask=mask)
        ref = _normalized(x, (2, 3), mask)[0] * _channel(SCALE, 4) + _channel(BIAS, 4)
    assert y.dtype == jnp.complex128
    np.testing.assert_allclose(y, ref, rtol=1e-12, atol=1e-12)


def test_complex64_keeps_its_dtype_and_computes_in_complex64_and_float32():
    x = jnp.asarray(_x((6, 3), seed=2, dtype=np.complex64))
    params, stats = jaxnorm.batch_norm_init(3, dtype=jnp.complex64)
    chex.assert_type([params["scale"], stats["mean"], stats["var"]], [jnp.complex64, jnp.complex64, jnp.float32])
    y, new = jax.jit(lambda x: jaxnorm.batch_norm({}, stats, x, training=True))(x)
    chex.assert_type([y, new["mean"], new["var"]], [jnp.complex64, jnp.complex64, jnp.float32])
    ref = _normalized(np.asarray(x, np.complex128), (0,))[0]
    np.testing.assert_allclose(y, ref, rtol=2e-6, atol=2e-6)
    for fn in (lambda x: jaxnorm.layer_norm({}, x, normalized_shape=3),
               lambda x: jaxnorm.rms_norm({}, x, normalized_shape=3)):
        assert fn(x).dtype == jnp.complex64


def test_gradients_are_plain_autodiff_of_the_formula():
    """Complex x bypasses the custom_jvp: its gradient is JAX's own differentiation of the same formula."""
    x = jnp.asarray(_x((4, 3, 2), seed=3))
    dy = jnp.asarray(_x((4, 3, 2), seed=4))

    def formula(x):
        mean = jnp.mean(x, (0, 2), keepdims=True)
        var = jnp.mean(jnp.abs(x - mean) ** 2, (0, 2), keepdims=True)
        return (x - mean) / jnp.sqrt(var + EPS) * SCALE.reshape(1, 3, 1) + BIAS.reshape(1, 3, 1)

    ours = lambda x, p: jaxnorm.batch_norm(p, {}, x, training=True)[0]
    ref = lambda x, p: formula(x)
    loss = lambda f: jax.jit(jax.grad(lambda x: jnp.sum(jnp.real(f(x, PARAMS) * jnp.conj(dy)))))
    np.testing.assert_allclose(loss(ours)(x), loss(ref)(x), rtol=1e-10, atol=1e-12)
    jvp = lambda f: jax.jit(lambda x, t: jax.jvp(functools.partial(f, p=PARAMS), (x,), (t,))[1])
    np.testing.assert_allclose(jvp(ours)(x, dy), jvp(ref)(x, dy), rtol=1e-10, atol=1e-12)


def test_wrappers_take_complex_inputs():
    x = jnp.asarray(_x((4, 5, 3), seed=5, dtype=np.complex64))
    ref = _normalized(np.asarray(x, np.complex128), (0, 1))[0]
    v = jl.BatchNorm(use_running_average=False).init(jax.random.key(0), x)
    y, upd = jl.BatchNorm(use_running_average=False).apply(v, x, mutable=["batch_stats"])
    np.testing.assert_allclose(y, ref, rtol=3e-6, atol=3e-6)
    assert upd["batch_stats"]["mean"].dtype == jnp.complex64
    np.testing.assert_allclose(jn.BatchNorm(3)(x), ref, rtol=3e-6, atol=3e-6)
    ln = _normalized(np.asarray(x, np.complex128), (2,))[0]
    np.testing.assert_allclose(jn.LayerNorm(3)(x), ln, rtol=3e-6, atol=3e-6)
    eqx = pytest.importorskip("equinox")
    from jaxnorm import equinox as je

    rows = x.reshape(20, 3)
    run = lambda model, state: jax.vmap(model, axis_name="batch", in_axes=(0, None), out_axes=(0, None))(
        rows, state)
    model, state = eqx.nn.make_with_state(je.BatchNorm)(3, axis_name="batch", dtype=jnp.complex64)
    y_eqx, new = run(model, state)
    np.testing.assert_allclose(y_eqx, _normalized(np.asarray(rows, np.complex128), (0,))[0], rtol=3e-6, atol=3e-6)
    assert new.get(model.state_index)["mean"].dtype == jnp.complex64
    real_model, real_state = eqx.nn.make_with_state(je.BatchNorm)(3, axis_name="batch")
    with pytest.raises(TypeError, match=r"complex input makes the running mean complex.*dtype=jnp.complex64"):
        run(real_model, real_state)


def test_layers_without_complex_support_say_so():
    x = jnp.asarray(_x((4, 3, 5)))
    with pytest.raises(TypeError, match=r"`x` must have a (real )?floating-point dtype, got complex128"):
        jaxnorm.batch_renorm({}, jaxnorm.batch_norm_init(3)[1], x, training=True)
