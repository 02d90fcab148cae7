"""A Flax model whose flax.linen normalization layers are swapped for jaxnorm's restores the checkpoint the Flax
version saved (flax.serialization and orbax) and continues training with the same numbers.

``count`` (PyTorch's num_batches_tracked) is made only with PyTorch's momentum; with Flax's (``flax_momentum``)
the variables are Flax's exactly. A layer configured with PyTorch's momentum also runs on Flax's saved variables:
a state without ``count`` simply does not count batches.
"""

from __future__ import annotations

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import serialization

from jaxnorm import linen as jl

X = jnp.asarray(np.random.default_rng(0).normal(size=(8, 6, 4)) * 2 + 1, jnp.float32)
Y = jnp.asarray(np.random.default_rng(1).normal(size=(8, 3)), jnp.float32)


class Net(nn.Module):
    norms: object  # the module namespace: flax.linen or jaxnorm.linen
    flax_style: bool = True

    @nn.compact
    def __call__(self, x, train: bool):
        n = self.norms
        fast = {"use_fast_variance": False} if n is nn else {}
        bn_momentum = {"momentum": 0.9} if n is nn else (
            {"flax_momentum": 0.9} if self.flax_style else {"torch_momentum": 0.1})
        x = nn.Dense(8)(x)
        x = n.BatchNorm(use_running_average=not train, **bn_momentum, **fast)(x)
        x = n.LayerNorm(epsilon=1e-6, **fast)(nn.relu(x))
        x = n.GroupNorm(num_groups=2, epsilon=1e-6, **fast)(x)
        x = n.RMSNorm(epsilon=1e-6, **fast)(x)
        x = n.InstanceNorm(epsilon=1e-6, use_scale=True, use_bias=True, **fast)(x)
        return nn.Dense(3)(jnp.mean(x, 1))


def _train(model, variables, steps):
    tx = optax.sgd(0.1)
    opt = tx.init(variables["params"])

    @jax.jit
    def step(params, stats, opt):
        def loss_fn(p):
            out, upd = model.apply({"params": p, "batch_stats": stats}, X, True, mutable=["batch_stats"])
            return jnp.mean((out - Y) ** 2), upd["batch_stats"]

        (loss, stats), g = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt = tx.update(g, opt)
        return optax.apply_updates(params, updates), stats, opt, loss

    params, stats, losses = variables["params"], variables["batch_stats"], []
    for _ in range(steps):
        params, stats, opt, loss = step(params, stats, opt)
        losses.append(float(loss))
    return {"params": params, "batch_stats": stats}, losses


def _close(a, b):
    chex.assert_trees_all_close(a, b, rtol=2e-5, atol=2e-6)


@pytest.fixture(scope="module")
def flax_run():
    model = Net(nn)
    v0 = model.init(jax.random.key(0), X, False)
    saved, _ = _train(model, v0, 2)
    after, losses = _train(model, saved, 2)
    return saved, after, losses


def test_same_variable_tree_as_flax():
    flax_v = Net(nn).init(jax.random.key(0), X, False)
    ours_v = Net(jl).init(jax.random.key(0), X, False)
    assert jax.tree.map(jnp.shape, ours_v) == jax.tree.map(jnp.shape, flax_v)


def test_restore_flax_serialization_checkpoint_and_continue_training(flax_run):
    saved, after, losses = flax_run
    blob = serialization.to_bytes(saved)
    ours = Net(jl)
    target = ours.init(jax.random.key(42), X, False)
    restored = serialization.from_bytes(target, blob)
    _close(restored, saved)
    ours_after, ours_losses = _train(ours, restored, 2)
    np.testing.assert_allclose(ours_losses, losses, rtol=2e-5)
    _close(ours_after, after)


def test_restore_orbax_checkpoint_and_continue_training(flax_run, tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    saved, after, losses = flax_run
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(tmp_path / "flax", saved)
        ckpt.wait_until_finished()
        ours = Net(jl)
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, ours.init(jax.random.key(42), X, False))
        restored = ckpt.restore(tmp_path / "flax", target)
    ours_after, ours_losses = _train(ours, restored, 2)
    np.testing.assert_allclose(ours_losses, losses, rtol=2e-5)
    _close(ours_after, after)


def test_pytorch_momentum_layer_runs_on_flaxs_variables_without_count(flax_run):
    saved, _, _ = flax_run
    ours = Net(jl, flax_style=False)
    assert "count" in ours.init(jax.random.key(0), X, False)["batch_stats"]["BatchNorm_0"]
    out, upd = ours.apply(saved, X, True, mutable=["batch_stats"])
    assert set(upd["batch_stats"]["BatchNorm_0"]) == {"mean", "var"}  # nothing added, nothing counted
    # PyTorch's rule on Flax's state: new = 0.9 * old + 0.1 * batch, the unbiased variance
    h = nn.Dense(8).apply({"params": saved["params"]["Dense_0"]}, X)
    n = h.shape[0] * h.shape[1]
    old = saved["batch_stats"]["BatchNorm_0"]["var"]
    np.testing.assert_allclose(upd["batch_stats"]["BatchNorm_0"]["var"],
                               0.9 * old + 0.1 * jnp.var(h, (0, 1)) * n / (n - 1), rtol=1e-5)
    assert np.all(np.isfinite(out))
