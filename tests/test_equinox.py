"""jaxnorm.equinox: Equinox modules with eqx.nn.State, against the PyTorch fixtures and the functional core, in a
training loop, in an ensemble, and as regression tests for three equinox.nn.BatchNorm bugs."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

eqx = pytest.importorskip("equinox", reason="jaxnorm.equinox needs the optional extra: pip install 'jaxnorm[equinox]'")
optax = pytest.importorskip("optax")

import jaxnorm  # noqa: E402
from jaxnorm import equinox as je  # noqa: E402
from tests.test_pytorch_fixtures import FIXTURE_DIR, load  # noqa: E402
from tests.tolerances import tol  # noqa: E402

BATCH = dict(axis_name="batch", in_axes=(0, None), out_axes=(0, None))


@eqx.filter_jit
def _batched(model, x, state):
    """``model`` over a batch of examples, statistics across it, in one compiled program per model structure."""
    return jax.vmap(model, **BATCH)(x, state)


@pytest.mark.parametrize("name", ["BatchNorm2d__16x3x5x3__default", "BatchNorm1d__16x4x3__momentum=None",
                                  "BatchNorm3d__16x2x3x2x4__eps=0.001-momentum=0.3"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_batch_norm_matches_pytorch_fixture(name, dtype):
    cfg, a = load(FIXTURE_DIR / f"{name}__{dtype}.npz")
    ctor = cfg["ctor"]
    bn, state = eqx.nn.make_with_state(je.BatchNorm)(ctor["num_features"], "batch", eps=ctor.get("eps", 1e-5),
                                                      torch_momentum=ctor.get("momentum", 0.1), dtype=dtype)
    bn = eqx.tree_at(lambda m: (m.weight, m.bias), bn, (jnp.asarray(a["weight"]), jnp.asarray(a["bias"])))
    t = tol(dtype)
    state0 = state
    for step in range(3):
        y, state = _batched(bn, jnp.asarray(a["x"][step]), state)
        np.testing.assert_allclose(y, a["y"][step], **t)
        stats = state.get(bn.state_index)
        np.testing.assert_allclose(stats["mean"], a["running_mean"][step], **t)
        np.testing.assert_allclose(stats["var"], a["running_var"][step], **t)
        assert int(stats["count"]) == int(a["num_batches_tracked"][step])
    y_eval, state_after = _batched(eqx.nn.inference_mode(bn), jnp.asarray(a["x_eval"]), state)
    np.testing.assert_allclose(y_eval, a["y_eval"], **t)
    assert state_after.get(bn.state_index)["count"] == state.get(bn.state_index)["count"]  # eval: unchanged
    dy = jnp.asarray(a["dy"])

    @eqx.filter_jit
    @eqx.filter_grad
    def grads(model_and_x):  # d/d(weight, bias) and d/dx in one program
        model, x = model_and_x
        return jnp.sum(jax.vmap(model, **BATCH)(x, state0)[0] * dy)

    g, dx = grads((bn, jnp.asarray(a["x"][0])))
    gt = tol(dtype, "grad")
    np.testing.assert_allclose(g.weight, a["dweight"], **gt)
    np.testing.assert_allclose(g.bias, a["dbias"], **gt)
    np.testing.assert_allclose(dx, a["dx"], **gt)


def test_instance_norm_with_running_stats_matches_pytorch_fixture():
    name = "InstanceNorm2d__16x2x3x4__affine=True-momentum=0.2-track_running_stats=True__float64.npz"
    cfg, a = load(FIXTURE_DIR / name)
    m, state = eqx.nn.make_with_state(je.InstanceNorm)(2, "batch", channelwise_affine=True, track_running_stats=True,
                                                        torch_momentum=0.2, dtype="float64")
    m = eqx.tree_at(lambda m: (m.weight, m.bias), m, (jnp.asarray(a["weight"]), jnp.asarray(a["bias"])))
    for step in range(3):
        y, state = _batched(m, jnp.asarray(a["x"][step]), state)
        np.testing.assert_allclose(y, a["y"][step], **tol("float64"))
        np.testing.assert_allclose(state.get(m.state_index)["var"], a["running_var"][step], **tol("float64"))
    y, _ = _batched(eqx.nn.inference_mode(m), jnp.asarray(a["x_eval"]), state)
    np.testing.assert_allclose(y, a["y_eval"], **tol("float64"))


def test_stateless_layers_equal_the_functional_core():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(5, 6, 4, 3)) * 2 + 1)  # a batch of (C=6, H, W) examples
    ln = je.LayerNorm((4, 3), use_bias=False)
    rms = je.RMSNorm(3, eps=1e-6)
    rms = eqx.tree_at(lambda m: m.bias, rms, jnp.asarray([0.5, -1.0, 2.0]))
    gn, inn = je.GroupNorm(3, 6), je.InstanceNorm(6)

    @jax.jit
    def pairs(x):  # (module over the batch, the functional core or the formula), in one program
        rms_ref = x / jnp.sqrt(jnp.mean(x**2, -1, keepdims=True) + 1e-6) + rms.bias.reshape(1, 1, 1, 3)
        return {"LayerNorm": (jax.vmap(ln)(x), jaxnorm.layer_norm({"scale": ln.weight}, x, normalized_shape=(4, 3))),
                "RMSNorm": (jax.vmap(rms)(x), rms_ref),
                "GroupNorm": (jax.vmap(gn)(x), jaxnorm.group_norm(jaxnorm.group_norm_init(3, 6), x, num_groups=3)),
                "InstanceNorm": (jax.vmap(inn)(x), jaxnorm.instance_norm({}, {}, x, training=True)[0])}

    for name, (got, want) in pairs(x).items():
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12, err_msg=name)
    assert inn.weight is None and inn.bias is None  # PyTorch's InstanceNorm default: affine=False
    old = je.LayerNorm(3, elementwise_affine=False)  # equinox's older switch (deprecated there) still works
    assert old.weight is None and old.bias is None
    # with a state, Equinox's calling convention returns it unchanged
    y, s = eqx.nn.make_with_state(je.LayerNorm)(3)[0](x[0], "state")
    assert s == "state" and y.shape == x[0].shape


LAYER_PAIRS = {  # name: (constructor for either module namespace, the example's shape)
    "LayerNorm": (lambda m, **kw: m.LayerNorm((6, 5), **kw), (6, 5)),
    "LayerNorm/no-bias": (lambda m, **kw: m.LayerNorm((6, 5), use_bias=False, **kw), (6, 5)),
    "LayerNorm/no-affine": (lambda m, **kw: m.LayerNorm(5, use_weight=False, use_bias=False, eps=1e-3, **kw), (5,)),
    "RMSNorm": (lambda m, **kw: m.RMSNorm((6, 5), **kw), (6, 5)),
    "RMSNorm/bias-only": (lambda m, **kw: m.RMSNorm(5, use_weight=False, **kw), (5,)),
    "RMSNorm/weight-only": (lambda m, **kw: m.RMSNorm(5, use_bias=False, eps=1e-6, **kw), (5,)),
    "GroupNorm": (lambda m, **kw: m.GroupNorm(2, 6, **kw), (6, 5)),
    "GroupNorm/no-affine": (lambda m, **kw: m.GroupNorm(3, 6, channelwise_affine=False, **kw), (6, 4, 2)),
}


# every configuration in float32; float64 (the tight check) for one of each layer, to keep the suite fast
@pytest.mark.parametrize(("name", "dtype"), [(n, "float32") for n in LAYER_PAIRS]
                         + [(n, "float64") for n in ("LayerNorm", "RMSNorm/bias-only", "GroupNorm")])
def test_matches_equinox_own_layers_where_they_agree(name, dtype):
    """LayerNorm, GroupNorm and RMSNorm equal equinox.nn's with the same keywords, parameters and gradients
    (equinox's layers normalize the whole example, so the example's shape is theirs)."""
    rng = np.random.default_rng(1)
    make, shape = LAYER_PAIRS[name]
    ours, theirs = make(je, dtype=dtype), make(eqx.nn, dtype=dtype)
    for field in ("weight", "bias"):
        assert (getattr(ours, field) is None) == (getattr(theirs, field) is None), field
        if getattr(theirs, field) is not None:
            chex.assert_equal_shape([getattr(ours, field), getattr(theirs, field)])
            chex.assert_type([getattr(ours, field), getattr(theirs, field)], dtype)
            v = jnp.asarray(rng.normal(size=getattr(theirs, field).shape), dtype)
            ours, theirs = (eqx.tree_at(lambda m, f=field: getattr(m, f), t, v) for t in (ours, theirs))
    x = jnp.asarray(rng.normal(size=(4, *shape)) + 2, dtype)
    t = dict(rtol=2e-5, atol=2e-5) if dtype == "float32" else dict(rtol=1e-12, atol=1e-12)
    (y_ours, (g_ours, dx_ours)), (y_theirs, (g_theirs, dx_theirs)) = (_value_and_grads(m, x) for m in (ours, theirs))
    np.testing.assert_allclose(y_ours, y_theirs, **t)
    for field in ("weight", "bias"):
        if getattr(theirs, field) is not None:
            np.testing.assert_allclose(getattr(g_ours, field), getattr(g_theirs, field), **t)
    np.testing.assert_allclose(dx_ours, dx_theirs, **t)


@eqx.filter_jit
def _value_and_grads(model, x):
    """The outputs on a batch, and the gradients of a loss by the parameters and by x, in one program."""
    loss = lambda model_and_x: jnp.sum(jnp.sin(jax.vmap(model_and_x[0])(model_and_x[1])))
    return jax.vmap(model)(x), eqx.filter_grad(loss)((model, x))


def test_plain_momentum_is_a_type_error_and_both_conventions_are_a_value_error():
    with pytest.raises(TypeError, match=r"`momentum`=0.99 is ambiguous.*`flax_momentum`=0.99"):
        je.BatchNorm(4, "batch", momentum=0.99)
    with pytest.raises(TypeError, match=r"InstanceNorm: `momentum`=0.1 is ambiguous"):
        je.InstanceNorm(4, "batch", momentum=0.1)
    with pytest.raises(ValueError, match="either `torch_momentum`.*or `flax_momentum`"):
        je.BatchNorm(4, "batch", torch_momentum=0.2, flax_momentum=0.9)
    with pytest.raises(ValueError, match=r"`mode`='ema' is not supported.*mode='batch'"):
        je.BatchNorm(4, "batch", mode="ema")
    assert je.BatchNorm(4, "batch", mode="batch").momentum == 0.1
    with pytest.raises(ValueError, match="needs the `axis_name` of the batch vmap"):
        je.InstanceNorm(4, track_running_stats=True)


# ------------------------------------------------------------------ the three equinox.nn.BatchNorm bugs


def test_training_normalizes_with_batch_statistics_equinox_659():
    """equinox#659: BatchNorm normalized training batches with the running statistics. Ours: the batch's own."""
    bn, state = eqx.nn.make_with_state(je.BatchNorm)(3, "batch")
    x = jnp.asarray(np.random.default_rng(2).normal(size=(32, 3)) * 5 + 10, jnp.float32)
    y, state = _batched(bn, x, state)
    np.testing.assert_allclose(jnp.mean(y, 0), 0, atol=1e-5)
    np.testing.assert_allclose(jnp.var(y, 0), 1, rtol=1e-3)


def test_inference_before_training_is_finite_and_identity_like_equinox_955_and_1010():
    """equinox#955: the running variance started at 0, so inference before training divided by sqrt(eps);
    equinox#1010: mode='batch' divided by zero before any step. Ours starts at mean 0, var 1 (PyTorch):
    y = x / sqrt(1 + eps) exactly, finite."""
    bn, state = eqx.nn.make_with_state(je.BatchNorm)(3, "batch", inference=True)
    x = jnp.asarray(np.random.default_rng(3).normal(size=(4, 3)) * 3, jnp.float32)
    y, state2 = _batched(bn, x, state)
    assert np.all(np.isfinite(y))
    np.testing.assert_allclose(y, x / np.sqrt(1 + 1e-5), rtol=1e-6)
    assert int(state2.get(bn.state_index)["count"]) == 0


# ------------------------------------------------------------------ in use


class _MLP(eqx.Module):
    l1: eqx.nn.Linear
    bn: je.BatchNorm
    l2: eqx.nn.Linear

    def __init__(self, key):
        k1, k2 = jax.random.split(key)
        self.l1, self.l2 = eqx.nn.Linear(2, 16, key=k1), eqx.nn.Linear(16, 2, key=k2)
        self.bn = je.BatchNorm(16, "batch")

    def __call__(self, x, state):
        h, state = self.bn(self.l1(x), state)
        return self.l2(jax.nn.relu(h)), state


def _circles(n=256, seed=0):
    rng = np.random.default_rng(seed)
    r = np.where(rng.random(n) < 0.5, 0.4, 1.0)
    t = rng.uniform(0, 2 * np.pi, n)
    x = np.stack([r * np.cos(t), r * np.sin(t)], 1) + 0.05 * rng.normal(size=(n, 2))
    return jnp.asarray(x, jnp.float32), jnp.asarray(r > 0.5, jnp.int32)


def test_training_loop_with_filter_jit_and_optax_learns():
    x, y = _circles()
    model, state = eqx.nn.make_with_state(_MLP)(jax.random.key(0))
    opt = optax.adam(1e-2)
    opt_state = opt.init(eqx.filter(model, eqx.is_inexact_array))

    @eqx.filter_jit
    def step(model, state, opt_state):
        def loss_fn(model):
            logits, new_state = jax.vmap(model, **BATCH)(x, state)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), new_state

        (loss, state), grads = eqx.filter_value_and_grad(loss_fn, has_aux=True)(model)
        updates, opt_state = opt.update(grads, opt_state, eqx.filter(model, eqx.is_inexact_array))
        return eqx.apply_updates(model, updates), state, opt_state, loss

    losses = []
    for _ in range(150):
        model, state, opt_state, loss = step(model, state, opt_state)
        losses.append(float(loss))
    logits, _ = jax.vmap(eqx.nn.inference_mode(model), **BATCH)(x, state)
    assert losses[-1] < 0.3 * losses[0]
    assert float(jnp.mean(jnp.argmax(logits, -1) == y)) > 0.9  # eval mode with the running statistics
    assert int(state.get(model.bn.state_index)["count"]) == 150


def test_ensemble_under_filter_vmap_equals_each_member():
    x, _ = _circles(64)
    keys = jax.random.split(jax.random.key(1), 3)
    models, states = eqx.filter_vmap(lambda k: eqx.nn.make_with_state(_MLP)(k))(keys)
    out, new_states = eqx.filter_jit(eqx.filter_vmap(lambda m, s: _batched(m, x, s)))(models, states)
    for i in range(3):
        pick = lambda v, i=i: v[i] if eqx.is_array(v) else v
        o, s = _batched(jax.tree.map(pick, models), x, jax.tree.map(pick, states))
        chex.assert_trees_all_close(jax.tree.map(pick, (out, new_states)), (o, s), rtol=1e-5, atol=1e-6)


def test_flax_momentum_and_call_time_inference_equal_the_functional_core():
    """Equinox's own momentum convention (flax_momentum, biased running variance, no `count` semantics change)
    and ``inference=`` at call time, on a batch large enough (100 > 64) for the linear-time combine."""
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.normal(size=(100, 4, 3)) * 2 + 3, jnp.float32)
    bn, state = eqx.nn.make_with_state(je.BatchNorm)(4, "batch", flax_momentum=0.9)
    params, stats = jaxnorm.batch_norm_init(4)
    for _ in range(2):
        y, state = _batched(bn, x, state)
        y_ref, stats = jaxnorm.batch_norm(params, stats, x, training=True, momentum=0.1, running_var_unbiased=False)
        np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
        chex.assert_trees_all_close(state.get(bn.state_index), stats, rtol=1e-5, atol=1e-6)
    y_eval, same = jax.vmap(lambda xi, s: bn(xi, s, inference=True), **BATCH)(x, state)
    np.testing.assert_allclose(y_eval, jaxnorm.batch_norm(params, stats, x, training=False)[0], rtol=1e-5, atol=1e-5)
    assert same is state or jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.all(a == b)), same, state))
