"""Numerical stress and hostile values: documented behaviour, no NaN where the math is finite."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxnorm
from tests import registry


def test_nan_and_inf_stay_inside_their_statistics_group():
    """A NaN/inf poisons exactly the statistic it enters (its channel for BN), never the other channels."""
    x = np.random.default_rng(0).normal(size=(4, 3, 5)).astype(np.float32)
    for bad in (np.nan, np.inf):
        xb = x.copy()
        xb[1, 0, 2] = bad
        params, stats = jaxnorm.batch_norm_init(3)
        y, s = jaxnorm.batch_norm(params, stats, jnp.asarray(xb), training=True)
        assert np.all(np.isnan(y[:, 0])), "the poisoned channel propagates NaN (as PyTorch does)"
        assert np.all(np.isfinite(y[:, 1:])) and np.all(np.isfinite(s["mean"][1:]))
        y_ln = jaxnorm.layer_norm({}, jnp.asarray(xb), normalized_shape=5)
        assert np.all(np.isnan(y_ln[1, 0])) and np.isfinite(np.delete(np.asarray(y_ln).reshape(12, 5), 3, 0)).all()


@pytest.mark.parametrize("name,ctor,shape", registry.LAYERS, ids=[t[0] for t in registry.LAYERS])
def test_near_constant_inputs_give_finite_outputs_and_grads(name, ctor, shape):
    built = registry.build(name, ctor)
    x = jnp.full(shape, 3.0, jnp.float32) + 1e-7 * jnp.asarray(np.random.default_rng(0).normal(size=shape),
                                                                jnp.float32)

    def loss(p, x):
        return jnp.sum(jnp.tanh(built.apply(p, built.batch_stats, x, training=True)[0]))

    y, _ = built.apply(built.params, built.batch_stats, x, training=True)
    gp, gx = jax.grad(loss, argnums=(0, 1))(built.params, x)
    assert np.isfinite(y).all() and np.isfinite(gx).all()
    assert all(np.isfinite(g).all() for g in jax.tree.leaves(gp))
    if name != "RMSNorm":  # variance ~1e-14 << eps: the output is ~(x - mean) / sqrt(eps), i.e. ~0
        assert np.abs(y).max() < 1e-2


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
    assert y.dtype == dtype and np.isfinite(np.asarray(y, np.float32)).all()
    np.testing.assert_allclose(np.var(np.asarray(y, np.float64), 0), 1, atol=2e-2)
    assert np.isfinite(stats["var"]).all()


@pytest.mark.parametrize("name,ctor,shape", registry.LAYERS, ids=[t[0] for t in registry.LAYERS])
def test_every_layer_compiles_once_per_shape_in_both_modes(name, ctor, shape):
    built = registry.build(name, ctor)
    traces = {True: 0, False: 0}  # counted at trace time (jit cache sizes can be evicted under load)

    def apply(p, s, x, t):
        traces[t] += 1
        return built.apply(p, s, x, training=t)

    fns = {t: jax.jit(lambda p, s, x, t=t: apply(p, s, x, t)) for t in (True, False)}
    rng = np.random.default_rng(2)
    for _ in range(3):
        x = jnp.asarray(rng.normal(size=shape), jnp.float32)
        for f in fns.values():
            f(built.params, built.batch_stats, x)
    assert traces == {True: 1, False: 1}
