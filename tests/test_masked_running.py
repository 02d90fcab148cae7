"""A mask never corrupts the running statistics: per channel, no valid value keeps mean and variance, one valid
value updates the mean only, two or more update both (n / (n - 1) with the channel's own count); a batch with no
valid value anywhere is not counted. Checked under jit for PyTorch's momentum, Flax's (biased, no count) and the
cumulative average, on one device and across devices (the global count decides), for batch norm, instance norm
with running statistics, batch renorm and the wrappers."""

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

C = 4
OLD = {"mean": jnp.asarray([0.5, -0.5, 0.25, 1.0]), "var": jnp.asarray([2.0, 3.0, 0.5, 1.5]),
       "count": jnp.asarray(3, jnp.int32)}
X = jnp.asarray(np.random.default_rng(0).normal(size=(5, C)) * 2 + 1)
# valid values per channel: 0, 1, 2, 5
MASK = jnp.asarray(np.arange(5)[:, None] < np.asarray([0, 1, 2, 5])[None, :])


def _expected(x, mask, old, momentum, unbiased=True):
    """float64 NumPy: the rule in the module docstring."""
    x, mask = np.asarray(x, np.float64), np.broadcast_to(np.asarray(mask), x.shape)
    n = mask.sum(0)
    counted = n.max() > 0
    count = int(old["count"]) + 1 if counted else int(old["count"])
    f = 1.0 / count if momentum is None else momentum
    mean, var = np.array(old["mean"], np.float64), np.array(old["var"], np.float64)
    for c in range(x.shape[1]):
        v = x[mask[:, c], c]
        if len(v) >= 1:
            mean[c] = (1 - f) * mean[c] + f * v.mean()
        if len(v) >= 2:
            var[c] = (1 - f) * var[c] + f * v.var(ddof=1 if unbiased else 0)
    return {"mean": mean, "var": var, "count": count}


@functools.partial(jax.jit, static_argnames=("momentum", "unbiased"))
def _bn(x, mask, stats, momentum, unbiased=True):
    params = {"scale": jnp.ones(C), "bias": jnp.zeros(C)}
    return jaxnorm.batch_norm(params, stats, x, training=True, axis=-1, mask=mask, momentum=momentum,
                              running_var_unbiased=unbiased)


@pytest.mark.parametrize("momentum,unbiased", [(0.1, True), (0.01, False), (None, True)],
                         ids=["torch", "flax", "cumulative"])
def test_batch_norm_counts_0_1_2_per_channel(momentum, unbiased):
    y, new = _bn(X, MASK, OLD, momentum, unbiased)
    want = _expected(X, MASK, OLD, momentum, unbiased)
    chex.assert_trees_all_close(new, want, rtol=1e-12)
    assert np.isfinite(np.asarray(y)).all()
    # a batch with no valid value: nothing changes, and it is not counted
    _, same = _bn(X, jnp.zeros_like(MASK), OLD, momentum, unbiased)
    chex.assert_trees_all_equal(same, OLD)


def test_batch_norm_with_flax_layout_state_keeps_no_count():
    old = {k: OLD[k] for k in ("mean", "var")}
    _, new = _bn(X, MASK, old, 0.01, False)
    want = _expected(X, MASK, OLD, 0.01, False)
    assert set(new) == {"mean", "var"}
    chex.assert_trees_all_close(new, {k: want[k] for k in ("mean", "var")}, rtol=1e-12)


def test_across_devices_the_global_count_decides():
    """Two devices (a named vmap axis): channel 1 has one valid value on each (global 2: variance updated),
    channel 0 none anywhere, channel 2 one on the first device only (global 1: mean only)."""
    x = jnp.stack([X[:2], X[2:4]])
    mask = jnp.asarray([[[0, 1, 1, 1], [0, 0, 0, 1]], [[0, 1, 0, 1], [0, 0, 0, 1]]], bool)
    params = {"scale": jnp.ones(C), "bias": jnp.zeros(C)}
    sync = jax.jit(jax.vmap(lambda x, m: jaxnorm.batch_norm(params, OLD, x, training=True, axis=-1, mask=m,
                                                            axis_name="d"), axis_name="d", out_axes=(0, None)))
    _, new = sync(x, mask)
    want = _expected(x.reshape(4, C), mask.reshape(4, C), OLD, 0.1)
    chex.assert_trees_all_close(new, want, rtol=1e-12)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_instance_norm_running_statistics_average_only_instances_with_values(momentum):
    """Per (example, channel): no value adds no mean, one value no variance; a channel no instance has stays."""
    x = jnp.asarray(np.random.default_rng(1).normal(size=(3, 2, 4)))  # (N, C, L)
    # example 0: channel 0 has 4 values, channel 1 has 1; example 1: 2 and 0; example 2: 0 and 0
    n = np.asarray([[4, 1], [2, 0], [0, 0]])
    mask = jnp.asarray(np.arange(4)[None, None, :] < n[:, :, None])
    old = {"mean": jnp.asarray([0.5, -1.0]), "var": jnp.asarray([2.0, 3.0]), "count": jnp.asarray(0, jnp.int32)}
    f = jax.jit(lambda x, m: jaxnorm.instance_norm({}, old, x, training=True, mask=m, momentum=momentum))
    y, new = f(x, mask)
    assert np.isfinite(np.asarray(y)).all()
    if momentum is None:  # PyTorch passes momentum 0 here: nothing moves
        chex.assert_trees_all_equal(new, old)
        return
    xs = np.asarray(x)
    m0 = (xs[0, 0, :4].mean() + xs[1, 0, :2].mean()) / 2
    v0 = (xs[0, 0, :4].var(ddof=1) + xs[1, 0, :2].var(ddof=1)) / 2
    want_mean = np.asarray([0.9 * 0.5 + 0.1 * m0, 0.9 * -1.0 + 0.1 * xs[0, 1, 0]])
    want_var = np.asarray([0.9 * 2.0 + 0.1 * v0, 3.0])  # channel 1: one value somewhere, no variance
    chex.assert_trees_all_close(new, {"mean": want_mean, "var": want_var, "count": old["count"]}, rtol=1e-12)
    # across devices: the same batch, one example per device, batch_axis_name pools the instances
    per = jax.jit(jax.vmap(lambda x, m: jaxnorm.instance_norm({}, old, x[None], training=True, mask=m[None],
                                                              batch_axis_name="b"), axis_name="b",
                           out_axes=(0, None)))
    _, pooled = per(x, mask)
    chex.assert_trees_all_close(pooled, new, rtol=1e-12)


def test_batch_renorm_with_one_value_per_channel_keeps_the_variance():
    old = {**OLD, "count": jnp.asarray(0, jnp.int32)}
    x = X[:1]
    _, new = jax.jit(lambda x: jaxnorm.batch_renorm({}, old, x, training=True, axis=-1, momentum=0.1))(x)
    want = _expected(x, jnp.ones_like(x, bool), old, 0.1)
    chex.assert_trees_all_close(new, want, rtol=1e-12)


def test_wrappers_follow_the_same_rule():
    want_torch = _expected(X, MASK, OLD, 0.1)
    variables = {"batch_stats": dict(OLD), "params": {"scale": jnp.ones(C), "bias": jnp.zeros(C)}}
    _, upd = jax.jit(lambda v, x, m: jl.BatchNorm(use_running_average=False).apply(
        v, x, mask=m, mutable=["batch_stats"]))(variables, X, MASK)
    chex.assert_trees_all_close(upd["batch_stats"], want_torch, rtol=1e-6)
    bn = jn.BatchNorm(C, flax_momentum=0.9)
    bn.mean.set_value(OLD["mean"]), bn.var.set_value(OLD["var"])
    bn(X, mask=MASK)
    want_flax = _expected(X, MASK, OLD, 0.1, unbiased=False)
    chex.assert_trees_all_close({"mean": bn.mean[...], "var": bn.var[...]},
                                {k: want_flax[k] for k in ("mean", "var")}, rtol=1e-6)
