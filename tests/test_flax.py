"""Flax linen / NNX wrappers: conventions, equivalence with the functional core, Flax and PyTorch parity."""

from __future__ import annotations

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx, serialization

import jaxnorm
from jaxnorm import linen as jl
from jaxnorm import nnx as jn
from tests.test_pytorch_fixtures import FIXTURE_DIR, load

RNG = np.random.default_rng(0)
X = jnp.asarray(RNG.normal(size=(6, 4, 3, 4)) * 2 + 1, jnp.float32)  # NHWC, C = 4


def test_flax_configured_batch_norm_matches_flax_linen_over_steps():
    flax_bn = nn.BatchNorm(momentum=0.9, epsilon=1e-5)
    ours = jl.BatchNorm(flax_momentum=0.9, epsilon=1e-5)
    fv, ov = (m.init(jax.random.key(0), X, use_running_average=False) for m in (flax_bn, ours))
    for step in range(4):
        x = jnp.asarray(RNG.normal(size=X.shape) * (step + 1) + step, jnp.float32)
        fy, fu = flax_bn.apply(fv, x, use_running_average=False, mutable=["batch_stats"])
        oy, ou = ours.apply(ov, x, use_running_average=False, mutable=["batch_stats"])
        fv, ov = {**fv, **fu}, {**ov, **ou}
        np.testing.assert_allclose(oy, fy, atol=2e-6)
        np.testing.assert_allclose(ov["batch_stats"]["mean"], fv["batch_stats"]["mean"], rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(ov["batch_stats"]["var"], fv["batch_stats"]["var"], rtol=1e-6)
    fy = flax_bn.apply(fv, X, use_running_average=True)
    oy = ours.apply(ov, X, use_running_average=True)
    np.testing.assert_allclose(oy, fy, atol=2e-6)


def test_torch_configured_batch_norm_matches_pytorch_fixture():
    cfg, a = load(FIXTURE_DIR / "BatchNorm2d__16x3x5x3__eps=0.001-momentum=0.3__float32.npz")
    model = jl.BatchNorm(torch_momentum=0.3, epsilon=1e-3)
    nhwc = lambda t: jnp.moveaxis(jnp.asarray(t), 1, -1)
    v = model.init(jax.random.key(0), nhwc(a["x"][0]), use_running_average=True)
    v = {"params": {"scale": jnp.asarray(a["weight"]), "bias": jnp.asarray(a["bias"])},
         "batch_stats": v["batch_stats"]}
    step = jax.jit(lambda v, x: model.apply(v, x, use_running_average=False, mutable=["batch_stats"]))
    for i in range(3):
        y, upd = step(v, nhwc(a["x"][i]))
        v = {**v, **upd}
        np.testing.assert_allclose(jnp.moveaxis(y, -1, 1), a["y"][i], atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(v["batch_stats"]["mean"], a["running_mean"][i], atol=1e-6, rtol=1e-6)
        np.testing.assert_allclose(v["batch_stats"]["var"], a["running_var"][i], atol=1e-6, rtol=1e-6)
        assert int(v["batch_stats"]["count"]) == a["num_batches_tracked"][i]
    y_eval = model.apply(v, nhwc(a["x_eval"]), use_running_average=True)
    np.testing.assert_allclose(jnp.moveaxis(y_eval, -1, 1), a["y_eval"], atol=1e-5, rtol=1e-5)


# (linen module, nnx module, functional call) for every layer, channels-last
def _cases():
    c = X.shape[-1]
    ps, st = jaxnorm.batch_norm_init(c)
    ips, ist = jaxnorm.instance_norm_init(c, affine=True, track_running_stats=True)
    return [
        ("BatchNorm", jl.BatchNorm(), jn.BatchNorm(c),
         lambda x, tr: jaxnorm.batch_norm(ps, st, x, training=tr, axis=-1)),
        ("InstanceNorm", jl.InstanceNorm(affine=True, track_running_stats=True),
         jn.InstanceNorm(c, affine=True, track_running_stats=True),
         lambda x, tr: jaxnorm.instance_norm(ips, ist, x, training=tr, axis=-1)),
        ("LayerNorm", jl.LayerNorm(normalized_shape=(3, 4)), jn.LayerNorm((3, 4)),
         lambda x, tr: (jaxnorm.layer_norm(jaxnorm.layer_norm_init((3, 4)), x, normalized_shape=(3, 4)), {})),
        ("GroupNorm", jl.GroupNorm(num_groups=2), jn.GroupNorm(c, num_groups=2),
         lambda x, tr: (jaxnorm.group_norm(jaxnorm.group_norm_init(2, c), x, num_groups=2, axis=-1), {})),
        ("RMSNorm", jl.RMSNorm(), jn.RMSNorm(c),
         lambda x, tr: (jaxnorm.rms_norm(jaxnorm.rms_norm_init(c), x, normalized_shape=c), {})),
    ]


@pytest.mark.parametrize("case", range(5), ids=[c[0] for c in _cases()])
def test_functional_linen_nnx_are_equivalent(case):
    check_equivalence(case, jnp.float32)  # bfloat16: tests/test_low_precision.py


def check_equivalence(case, dtype):
    """Functional, linen and NNX give the same bits, in training (statistics too) and in evaluation."""
    name, lin, nx, fn = _cases()[case]
    x = X.astype(dtype)
    stateful = name in ("BatchNorm", "InstanceNorm")
    kw = {"use_running_average": False} if stateful else {}
    v = lin.init(jax.random.key(0), x, **kw)
    for training in (True, False):
        y_fn, new_stats = fn(x, training)
        if stateful:
            y_lin, upd = lin.apply(v, x, use_running_average=not training, mutable=["batch_stats"])
            y_nnx = nx(x, use_running_average=not training)
            if training:
                chex.assert_trees_all_equal(upd["batch_stats"], new_stats)
                chex.assert_trees_all_equal({k: getattr(nx, k)[...] for k in ("mean", "var", "count")}, new_stats)
                nx = _cases()[case][2]  # fresh NNX module so the eval pass sees the initial statistics
        else:
            y_lin, y_nnx = lin.apply(v, x), nx(x)
        chex.assert_type([y_lin, y_nnx], dtype)
        np.testing.assert_array_equal(np.asarray(y_lin, np.float32), np.asarray(y_fn, np.float32))
        np.testing.assert_array_equal(np.asarray(y_nnx, np.float32), np.asarray(y_fn, np.float32))


def test_nnx_train_eval_switch_and_jit():
    bn = jn.BatchNorm(4)
    step = nnx.jit(lambda m, x: m(x))
    step(bn, X)
    step(bn, X)
    assert int(bn.count[...]) == 2
    bn.eval()
    before = np.asarray(bn.mean[...])
    y = step(bn, X)
    np.testing.assert_array_equal(bn.mean[...], before)
    ref, _ = jaxnorm.batch_norm({"scale": bn.scale[...], "bias": bn.bias[...]},
                                {k: getattr(bn, k)[...] for k in ("mean", "var", "count")}, X, training=False, axis=-1)
    np.testing.assert_allclose(y, ref, atol=1e-6)
    bn.train()
    assert bn.use_running_average is False


def test_convention_mistakes_are_impossible():
    with pytest.raises(TypeError, match="momentum"):
        jl.BatchNorm(momentum=0.99)  # a Flax habit: there is no ambiguous `momentum` field
    with pytest.raises(TypeError, match="momentum"):
        jn.BatchNorm(4, momentum=0.99)
    with pytest.raises(ValueError, match="either `torch_momentum`.*or `flax_momentum`.*not both"):
        jl.BatchNorm(use_running_average=False, torch_momentum=0.2, flax_momentum=0.9).init(jax.random.key(0), X)
    with pytest.raises(ValueError, match=r"`flax_momentum` must be in \[0, 1\], got 99"):
        jn.BatchNorm(4, flax_momentum=99)
    with pytest.raises(ValueError, match="no `use_running_average` was given"):
        jl.BatchNorm().init(jax.random.key(0), X)


def test_training_without_mutable_batch_stats_is_a_clear_error():
    model = jl.BatchNorm(use_running_average=False)
    v = model.init(jax.random.key(0), X)
    with pytest.raises(ValueError, match=r"not mutable.*mutable=\['batch_stats'\]"):
        model.apply(v, X)
    model.apply(v, X, use_running_average=True)  # eval needs nothing mutable


def test_init_does_not_update_statistics():
    v = jl.BatchNorm(use_running_average=False).init(jax.random.key(0), X)
    assert int(v["batch_stats"]["count"]) == 0
    np.testing.assert_array_equal(v["batch_stats"]["mean"], 0)


def test_checkpoint_round_trip_is_bit_exact(tmp_path):
    model = jl.BatchNorm(use_running_average=False)
    v = model.init(jax.random.key(0), X)
    _, upd = model.apply(v, X, mutable=["batch_stats"])
    v = {**v, **upd}
    path = tmp_path / "ckpt.msgpack"
    path.write_bytes(serialization.to_bytes(v))
    restored = serialization.from_bytes(jax.tree.map(jnp.zeros_like, v), path.read_bytes())
    chex.assert_trees_all_equal(v, restored)
    chex.assert_trees_all_equal_dtypes(v, restored)
    state = nnx.state(jn.BatchNorm(4))
    restored_nnx = serialization.from_state_dict(state, serialization.to_state_dict(state))
    chex.assert_trees_all_equal(state, restored_nnx)
