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

    y, (gp, gx) = jax.jit(lambda p, x: (built.apply(p, built.batch_stats, x, training=True)[0],
                                        jax.grad(loss, argnums=(0, 1))(p, x)))(built.params, x)
    assert np.isfinite(y).all() and np.isfinite(gx).all()
    assert all(np.isfinite(g).all() for g in jax.tree.leaves(gp))
    if name != "RMSNorm":  # variance ~1e-14 << eps: the output is ~(x - mean) / sqrt(eps), i.e. ~0
        assert np.abs(y).max() < 1e-2
