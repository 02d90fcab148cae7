"""Statistics across devices (8 simulated CPU devices, see conftest.py) and across sub-batches.

Every case is compared with one device running the global batch: outputs, running stats and gradients.
"""

from __future__ import annotations

import json
import sys

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxnorm
from jaxnorm import _combine
from jaxnorm import linen as jl

N_DEV = 8
pytestmark = pytest.mark.skipif(jax.device_count() < N_DEV, reason="needs 8 (simulated) devices")


@pytest.fixture(scope="module")
def mesh():
    return Mesh(np.array(jax.devices()[:N_DEV]), ("batch",))


def _data(shape=(32, 3, 5), seed=0):
    rng = np.random.default_rng(seed)
    params, stats = jaxnorm.batch_norm_init(shape[1])
    params = {"scale": jnp.asarray(1 + 0.3 * rng.normal(size=shape[1]), jnp.float32),
              "bias": jnp.asarray(0.3 * rng.normal(size=shape[1]), jnp.float32)}
    x = jnp.asarray(rng.normal(size=shape) * 2 + 1, jnp.float32)
    w = jnp.asarray(rng.normal(size=shape), jnp.float32)
    return params, stats, x, w


def _global(params, stats, x, w):
    def loss(p, x):
        y, s = jaxnorm.batch_norm(p, stats, x, training=True)
        return jnp.sum(y * w), (y, s)

    (_, (y, s)), g = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(params, x)
    return y, s, g


def test_shard_map_with_axis_name_equals_global_batch(mesh):
    params, stats, x, w = _data()

    def local(p, s, x, w):
        def loss(p, x):
            y, s_new = jaxnorm.batch_norm(p, s, x, training=True, axis_name="batch")
            return jnp.sum(y * w), (y, s_new)

        # the gradient w.r.t. the replicated params comes back already summed over devices (shard_map's
        # transpose of the implicit broadcast), i.e. exactly the gradient of the global sum
        (_, (y, s_new)), (gp, gx) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(p, x)
        return y, s_new, gp, gx

    f = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P(), P(), P("batch"), P("batch")),
                              out_specs=(P("batch"), P(), P(), P("batch"))))
    y, s, gp, gx = f(params, stats, x, w)
    y_ref, s_ref, (gp_ref, gx_ref) = _global(params, stats, x, w)
    np.testing.assert_allclose(y, y_ref, atol=2e-6)
    chex.assert_trees_all_close(s, s_ref, rtol=2e-6, atol=1e-6)
    np.testing.assert_allclose(gx, gx_ref, atol=2e-5)
    chex.assert_trees_all_close(gp, gp_ref, rtol=2e-5, atol=2e-5)


def test_uneven_per_device_batches_with_mask_equal_the_unpadded_batch(mesh):
    """Each device holds 4 slots but only some are real; masked SyncBN == BN on the real examples."""
    params, stats, x, w = _data((32, 3, 5), seed=1)
    real = np.array([4, 1, 3, 2, 4, 2, 1, 3])
    mask = np.zeros((32, 1, 1), bool)
    for d, n in enumerate(real):
        mask[4 * d : 4 * d + n] = True
    mask = jnp.asarray(mask)
    f = jax.jit(jax.shard_map(
        lambda p, s, x, m: jaxnorm.batch_norm(p, s, x, training=True, axis_name="batch", mask=m),
        mesh=mesh, in_specs=(P(), P(), P("batch"), P("batch")), out_specs=(P("batch"), P())))
    y, s = f(params, stats, x, mask)
    keep = np.asarray(mask[:, 0, 0])
    y_ref, s_ref = jaxnorm.batch_norm(params, stats, x[keep], training=True)
    np.testing.assert_allclose(y[keep], y_ref, atol=2e-6)
    chex.assert_trees_all_close(s, s_ref, rtol=2e-6, atol=1e-6)


def test_axis_index_groups_average_within_each_group(mesh):
    params, stats, x, _ = _data()
    groups = [[0, 1, 2, 3], [4, 5, 6, 7]]
    f = jax.jit(jax.shard_map(
        lambda p, s, x: jaxnorm.batch_norm(p, s, x, training=True, axis_name="batch", axis_index_groups=groups)[0],
        mesh=mesh, in_specs=(P(), P(), P("batch")), out_specs=P("batch")))
    y = f(params, stats, x)
    for half in (slice(0, 16), slice(16, 32)):
        np.testing.assert_allclose(y[half], jaxnorm.batch_norm(params, stats, x[half], training=True)[0], atol=2e-6)


def test_jit_with_named_sharding_needs_no_axis_name(mesh):
    params, stats, x, w = _data()
    xs = jax.device_put(x, NamedSharding(mesh, P("batch")))
    ws = jax.device_put(w, NamedSharding(mesh, P("batch")))
    y, s, (gp, gx) = jax.jit(_global)(params, stats, xs, ws)
    assert y.sharding.is_equivalent_to(NamedSharding(mesh, P("batch")), y.ndim) or len(y.sharding.device_set) >= 1
    y_ref, s_ref, (gp_ref, gx_ref) = _global(params, stats, x, w)
    np.testing.assert_allclose(y, y_ref, atol=2e-6)
    np.testing.assert_allclose(gx, gx_ref, atol=2e-5)
    chex.assert_trees_all_close(s, s_ref, rtol=2e-6, atol=1e-6)


def test_vmap_with_axis_name_over_examples():
    """vmap over per-example (C, L) calls with axis_name == BN over the (N, C, L) batch."""
    params, stats, x, _ = _data((6, 3, 5))
    y, s = jax.vmap(lambda xi: jaxnorm.batch_norm(params, stats, xi, training=True, axis=0, axis_name="i"),
                    axis_name="i")(x)
    y_ref, s_ref = jaxnorm.batch_norm(params, stats, x, training=True)
    np.testing.assert_allclose(y, y_ref, atol=2e-6)
    chex.assert_trees_all_close(jax.tree.map(lambda a: a[0], s), s_ref, rtol=2e-6, atol=1e-6)


def test_ghost_batch_norm_equals_splitting_by_hand():
    params, stats, x, _ = _data((12, 3, 5))
    y, s = jaxnorm.batch_norm(params, stats, x, training=True, virtual_batch_size=4)
    parts = [jaxnorm.batch_norm(params, stats, x[i : i + 4], training=True) for i in range(0, 12, 4)]
    np.testing.assert_allclose(y, jnp.concatenate([p[0] for p in parts]), atol=2e-6)
    # one update with the average of the sub-batch statistics (each sub-batch's update is linear in its stats)
    for k in ("mean", "var"):
        np.testing.assert_allclose(s[k], np.mean([p[1][k] for p in parts], 0), rtol=2e-6)
    assert int(s["count"]) == 1
    y_eval, s_eval = jaxnorm.batch_norm(params, s, x, training=False, virtual_batch_size=4)
    assert s_eval is s  # eval uses running statistics; the option only matters in training
    with pytest.raises(ValueError, match="`virtual_batch_size`=5 must divide the batch size 12"):
        jaxnorm.batch_norm(params, stats, x, training=True, virtual_batch_size=5)
    with pytest.raises(ValueError, match="cannot be combined with `mask` or `axis_name`"):
        jaxnorm.batch_norm(params, stats, x, training=True, virtual_batch_size=4, mask=jnp.ones((12, 1, 1), bool))


class _Net(nn.Module):
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Dense(8)(x)
        x = jl.BatchNorm(use_running_average=not train, axis_name=self.axis_name)(x)
        return nn.Dense(2)(nn.relu(x))


def test_data_parallel_training_step_equals_single_device(mesh):
    """A shard_map'd optax step with SyncBN (pmean of grads) == the same step on the global batch."""
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(32, 4)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 2, 32), jnp.int32)
    v = _Net().init(jax.random.key(0), x, train=False)
    tx = optax.sgd(0.1)
    opt = tx.init(v["params"])

    def step(model, params, bs, opt, x, y, reduce):
        def loss_fn(p):  # `reduce` averages the per-device losses into the global mean loss
            logits, upd = model.apply({"params": p, "batch_stats": bs}, x, train=True, mutable=["batch_stats"])
            return reduce(optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()), upd

        (loss, upd), g = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt = tx.update(g, opt, params)
        return optax.apply_updates(params, updates), upd["batch_stats"], opt, loss

    ref = jax.jit(lambda *a: step(_Net(), *a, reduce=lambda t: t))(v["params"], v["batch_stats"], opt, x, y)
    sharded = jax.jit(jax.shard_map(
        lambda *a: step(_Net(axis_name="batch"), *a, reduce=lambda t: jax.lax.pmean(t, "batch")),
        mesh=mesh, in_specs=(P(), P(), P(), P("batch"), P("batch")), out_specs=(P(), P(), P(), P())))
    out = sharded(v["params"], v["batch_stats"], opt, x, y)
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(ref), strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)


def test_malformed_axis_index_groups_is_a_clear_error(mesh):
    params, stats, x, _ = _data()
    f = jax.jit(jax.shard_map(
        lambda x: jaxnorm.batch_norm(params, stats, x, training=True, axis_name="batch",
                                     axis_index_groups=[[0, 1], [2, 3]])[0],
        mesh=mesh, in_specs=P("batch"), out_specs=P("batch")))
    with pytest.raises(ValueError, match=r"`axis_index_groups`=.*must split the 8 devices"):
        f(x)


def test_sync_bn_example_matches_single_device():
    from experiments import sync_bn

    result = sync_bn.run(devices=N_DEV, steps=3, seed=0)
    assert result["count"] == 3
    for key, diff in result["max_abs_diff"].items():
        assert diff < 1e-5, key


def test_nnx_batch_norm_with_axis_index_groups(mesh):
    from flax import nnx

    from jaxnorm import nnx as jn

    x = jnp.asarray(np.random.default_rng(7).normal(size=(32, 3)), jnp.float32)
    bn = jn.BatchNorm(3, axis_name="batch", axis_index_groups=[[0, 1, 2, 3], [4, 5, 6, 7]])
    graphdef, state = nnx.split(bn)
    f = jax.jit(jax.shard_map(lambda s, x: nnx.merge(graphdef, s)(x), mesh=mesh, in_specs=(P(), P("batch")),
                              out_specs=P("batch")))
    y = f(state, x)
    for half in (slice(0, 16), slice(16, 32)):
        ref, _ = jaxnorm.batch_norm(*jaxnorm.batch_norm_init(3), x[half], training=True, axis=-1)
        np.testing.assert_allclose(y[half], ref, atol=2e-6)


def test_forward_mode_and_hessian_through_shard_map_equal_the_global_batch(mesh):
    """jax.jvp (tangents of y and of the running statistics) and jax.hessian of a loss, taken of a shard_map'd
    synchronized batch norm, equal the same transformations of batch norm over the global batch."""
    params, stats, x, w = _data((16, 2, 3))

    def sharded(x):
        local = lambda x: jaxnorm.batch_norm(params, stats, x, training=True, axis_name="batch")
        return jax.shard_map(local, mesh=mesh, in_specs=P("batch"), out_specs=(P("batch"), P()))(x)

    def whole(x):
        return jaxnorm.batch_norm(params, stats, x, training=True)

    t = jnp.asarray(np.random.default_rng(1).normal(size=x.shape), jnp.float32)
    (y, s), (y_dot, s_dot) = jax.jit(lambda x, t: jax.jvp(sharded, (x,), (t,)))(x, t)
    (y_ref, s_ref), (y_dot_ref, s_dot_ref) = jax.jvp(whole, (x,), (t,))
    np.testing.assert_allclose(y_dot, y_dot_ref, atol=2e-5)
    for k in ("mean", "var"):
        np.testing.assert_allclose(s_dot[k], s_dot_ref[k], rtol=2e-5, atol=2e-6)
    loss = lambda f: (lambda x: jnp.sum(jnp.sin(f(x)[0]) * w) + jnp.sum(f(x)[1]["var"]))
    x_small, w = x[:8, :, :1], w[:8, :, :1]  # one example per device, a Hessian of 16 x 16
    h = jax.jit(jax.hessian(loss(sharded)))(x_small)
    np.testing.assert_allclose(h, jax.hessian(loss(whole))(x_small), rtol=1e-4, atol=1e-4)


SPLIT_CASES = {
    # name: (x shape, axis split over the devices, function of (params, x, **named) -> y, params)
    "layer_norm/features": ((4, 16), 1, lambda p, x, **kw: jaxnorm.layer_norm(p, x, reduction_axes=1, **kw)),
    "rms_norm/features": ((4, 16), 1, lambda p, x, **kw: jaxnorm.rms_norm({}, x, reduction_axes=1, eps=1e-5, **kw)),
    "group_norm/space": ((2, 16, 4), 1, lambda p, x, **kw: jaxnorm.group_norm(p, x, num_groups=2, axis=-1, **kw)),
    "instance_norm/space": ((2, 16, 3), 1, lambda p, x, **kw: jaxnorm.instance_norm(
        p, {}, x, training=True, axis=-1, **kw)[0]),
}


@pytest.mark.parametrize("name", list(SPLIT_CASES))
@pytest.mark.parametrize("masked", [False, True])
def test_axis_name_on_a_split_reduced_axis_equals_one_device(mesh, name, masked):
    """Tensor/sequence parallelism: the reduced axis is split over 8 devices; with ``axis_name`` every layer's
    statistics (and so outputs and gradients) equal one device's on the whole array, masked or not."""
    shape, split, fn = SPLIT_CASES[name]
    rng = np.random.default_rng(7)
    x = jnp.asarray(rng.normal(size=shape) * 2 + 1, jnp.float32)
    w = jnp.asarray(rng.normal(size=shape), jnp.float32)
    c = shape[-1]
    params = {} if name.startswith(("layer", "rms")) else {"scale": jnp.asarray(1 + rng.random(c), jnp.float32),
                                                           "bias": jnp.asarray(rng.random(c), jnp.float32)}
    mshape = tuple(d if i == split else 1 for i, d in enumerate(shape))
    mask = jnp.asarray(rng.random(mshape) < 0.7).at[(0,) * len(shape)].set(True) if masked else None
    spec = P(*[("batch" if i == split else None) for i in range(len(shape))])

    def loss(p, x, m, **kw):
        y = fn(p, x, mask=m, **kw)
        return jnp.sum(y * (w if not kw else w_local(kw))), y

    def w_local(_):
        return jax.lax.dynamic_slice_in_dim(w, jax.lax.axis_index("batch") * (shape[split] // N_DEV),
                                            shape[split] // N_DEV, split)

    (_, y_ref), g_ref = jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True))(params, x, mask)

    def local(p, x, m):
        (_, y), (gp, gx) = jax.value_and_grad(lambda p, x: loss(p, x, m, axis_name="batch"), (0, 1),
                                              has_aux=True)(p, x)
        return y, gp, gx

    m_spec = spec if masked else P()
    y, gp, gx = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P(), spec, m_spec),
                                      out_specs=(spec, P(), spec)))(params, x, mask)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(gx, g_ref[1], rtol=1e-4, atol=1e-4)
    chex.assert_trees_all_close(gp, g_ref[0], rtol=1e-4, atol=1e-4)


@pytest.fixture(params=["gather", "psums"])
def combine(request, monkeypatch):
    """Both ways of combining per-device statistics: the one-collective gather (few devices) and the two
    linear-size psums (many devices, e.g. a vmap over examples); forced here on the same 8 devices."""
    if request.param == "psums":
        monkeypatch.setattr(_combine, "SLOTS_MAX_DEVICES", 0)
    return request.param


@pytest.mark.parametrize("grouped", [False, True])
def test_both_combines_equal_one_device_with_uneven_masks_and_groups(mesh, combine, grouped):
    params, stats, x, w = _data((32, 3, 5), seed=3)
    rng = np.random.default_rng(3)
    mask = jnp.asarray(rng.random((32, 1, 1)) < 0.6).at[0].set(True).at[16].set(True)
    groups = [[0, 2, 4, 6], [1, 3, 5, 7]] if grouped else None

    def local(p, x, m, w):
        def loss(p, x):
            y, s = jaxnorm.batch_norm(p, stats, x, training=True, mask=m, axis_name="batch", axis_index_groups=groups)
            return jnp.sum(jnp.where(m, y * w, 0)), (y, s)  # the masked-out rows are padding: no loss
        (_, (y, s)), (gp, gx) = jax.value_and_grad(loss, (0, 1), has_aux=True)(p, x)
        ms = jaxnorm.rms_norm({}, x, reduction_axes=(0, 2), eps=1e-5, mask=m, axis_name="batch",
                              axis_index_groups=groups)
        per_device = jax.tree.map(lambda t: t[None], s)  # the groups' running stats differ: one row per device
        return y, per_device, gx, ms

    spec = P("batch")
    y, s, gx, ms = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P(), spec, spec, spec),
                                         out_specs=(spec, spec, spec, spec)))(params, x, mask, w)
    members = [np.concatenate([np.arange(4 * d, 4 * d + 4) for d in g]) for g in (groups or [range(8)])]
    for rows in members:
        keep = rows[np.asarray(mask[rows, 0, 0])]
        y_ref, s_ref, (_, gx_ref) = _global(params, stats, x[keep], w[keep])
        np.testing.assert_allclose(y[keep], y_ref, atol=3e-6)
        np.testing.assert_allclose(gx[keep], gx_ref, atol=3e-5)
        device = rows[0] // 4
        chex.assert_trees_all_close(jax.tree.map(lambda a, d=device: a[d], s), s_ref, rtol=2e-6, atol=1e-6)
        ms_ref = x[keep] / jnp.sqrt(jnp.mean(jnp.square(x[keep]), (0, 2), keepdims=True) + 1e-5)
        np.testing.assert_allclose(ms[keep], ms_ref, rtol=2e-6, atol=2e-6)


def test_vmap_over_many_examples_is_linear_not_quadratic():
    """Equinox-style batch norm (a vmap over thousands of examples with axis_name) combines the statistics with
    linear-size psums: no intermediate in the program grows as examples^2, and the result equals the batch."""
    n = 2000
    params, stats, x, _ = _data((n, 3, 2), seed=4)
    f = jax.vmap(lambda xi: jaxnorm.batch_norm(params, stats, xi, training=True, axis=0, axis_name="i"),
                 axis_name="i")
    jaxpr = jax.make_jaxpr(f)(x)
    sizes = [int(np.prod(v.aval.shape)) for eqn in jaxpr.jaxpr.eqns for v in eqn.outvars if hasattr(v.aval, "shape")]
    assert max(sizes) < n * n // 10, max(sizes)
    y, s = jax.jit(f)(x)
    y_ref, s_ref = jaxnorm.batch_norm(params, stats, x, training=True)
    np.testing.assert_allclose(y, y_ref, atol=3e-6)
    chex.assert_trees_all_close(jax.tree.map(lambda a: a[0], s), s_ref, rtol=2e-6, atol=1e-6)


@pytest.mark.slow
@pytest.mark.skipif(sys.platform not in ("linux", "darwin"),
                    reason="multi-process CPU JAX (jax.distributed with gloo collectives) runs on Linux and macOS only")
def test_two_processes_train_like_one_device_on_the_global_batch(tmp_path, capsys):
    """2 processes x 2 CPU devices joined by jax.distributed on 127.0.0.1: shard_map with axis_name and jit over a
    global NamedSharding both match one device on the global batch (params, batch_stats, loss) at every step."""
    from experiments import sync_bn

    assert sync_bn.main(["--processes", "2", "--devices", "2", "--steps", "4", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "sync_bn_processes.json").read_text())
    assert (result["processes"], result["devices"], result["count"]) == (2, 4, 4)
    assert set(result["max_abs_diff"]) == {"shard_map", "jit over NamedSharding"}
    for way, diffs in result["max_abs_diff"].items():
        for key, diff in diffs.items():
            assert diff < 1e-5, (way, key, diff)
    assert "2 processes x 2 devices" in capsys.readouterr().out


def test_instance_norm_running_statistics_over_a_batch_split_across_devices(mesh):
    """``batch_axis_name``: each device normalizes its own examples; the running statistics average the
    per-instance statistics over every device's examples, as one device does over the whole batch."""
    rng = np.random.default_rng(9)
    x = jnp.asarray(rng.normal(size=(16, 3, 5)) * 2 + 1, jnp.float32)
    params, stats = jaxnorm.instance_norm_init(3, affine=True, track_running_stats=True)
    step = lambda x, **kw: jaxnorm.instance_norm(params, stats, x, training=True, momentum=0.3, **kw)
    y_ref, s_ref = jax.jit(step)(x)
    y, s = jax.jit(jax.shard_map(lambda x: step(x, batch_axis_name="batch"), mesh=mesh, in_specs=P("batch"),
                                 out_specs=(P("batch"), P())))(x)
    np.testing.assert_allclose(y, y_ref, atol=2e-6)
    chex.assert_trees_all_close(s, s_ref, rtol=2e-6, atol=1e-6)
    per_device = lambda x: jax.tree.map(lambda t: t[None], step(x)[1])  # without it: each device's own examples
    s_local = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=P("batch"), out_specs=P("batch")))(x)
    assert not np.allclose(s_local["var"][0], s_ref["var"])
