"""Variants: batch renorm, frozen BN, folding, precise BN, the non-finite guard (mixed precision: see
test_low_precision.py)."""

from __future__ import annotations

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxnorm
from experiments import _common, lenet
from jaxnorm import linen as jl
from jaxnorm import nnx as jn
from jaxnorm.precise_bn import recalibrate

RNG = np.random.default_rng(0)


def _state(c=3, dtype=jnp.float64, seed=0):
    rng = np.random.default_rng(seed)
    params = {"scale": jnp.asarray(1 + 0.3 * rng.normal(size=c), dtype),
              "bias": jnp.asarray(0.3 * rng.normal(size=c), dtype)}
    stats = {"mean": jnp.asarray(rng.normal(size=c), dtype), "var": jnp.asarray(rng.uniform(0.5, 2, c), dtype),
             "count": jnp.asarray(5, jnp.int32)}
    return params, stats


# ------------------------------------------------------------------ batch renormalization


def renorm_reference(x, w, b, mu, var_run, r_max, d_max, eps, momentum):
    """Ioffe (2017), Algorithm 1, in float64 NumPy, channel on axis 1; sigma = sqrt(running var + eps)."""
    red = tuple(i for i in range(x.ndim) if i != 1)
    shp = lambda v: v.reshape([-1 if i == 1 else 1 for i in range(x.ndim)])
    mu_b, var_b = x.mean(red), x.var(red)
    sigma_b, sigma = np.sqrt(var_b + eps), np.sqrt(var_run + eps)
    r = np.clip(sigma_b / sigma, 1 / r_max, r_max)
    d = np.clip((mu_b - mu) / sigma, -d_max, d_max)
    x_hat = (x - shp(mu_b)) / shp(sigma_b) * shp(r) + shp(d)
    n = x.size / x.shape[1]
    new_mu = (1 - momentum) * mu + momentum * mu_b
    new_var = (1 - momentum) * var_run + momentum * var_b * n / (n - 1)
    return shp(w) * x_hat + shp(b), new_mu, new_var, r


@pytest.mark.parametrize("r_max,d_max", [(1.5, 0.5), (3.0, 5.0), (1.0, 0.0)])
def test_batch_renorm_matches_the_papers_algorithm(r_max, d_max):
    params, stats = _state()
    x = RNG.normal(size=(8, 3, 4)) * 2.5 + 1.5
    y, new = jaxnorm.batch_renorm(params, stats, jnp.asarray(x), training=True, r_max=r_max, d_max=d_max,
                                  momentum=0.1)
    y_ref, mu_ref, var_ref, _ = renorm_reference(x, *(np.asarray(params[k]) for k in ("scale", "bias")),
                                                 np.asarray(stats["mean"]), np.asarray(stats["var"]), r_max, d_max,
                                                 1e-5, 0.1)
    np.testing.assert_allclose(y, y_ref, atol=1e-12)
    np.testing.assert_allclose(new["mean"], mu_ref, atol=1e-12)
    np.testing.assert_allclose(new["var"], var_ref, atol=1e-12)
    y_eval, same = jaxnorm.batch_renorm(params, stats, jnp.asarray(x), training=False)
    assert same is stats
    np.testing.assert_allclose(y_eval, jaxnorm.batch_norm(params, stats, jnp.asarray(x), training=False)[0])


def test_batch_renorm_with_r1_d0_is_batch_norm_and_r_d_get_no_gradient():
    params, stats = _state()
    x = jnp.asarray(RNG.normal(size=(8, 3, 4)) * 2 + 1)
    a = jaxnorm.batch_renorm(params, stats, x, training=True, r_max=1.0, d_max=0.0, momentum=0.1)
    b = jaxnorm.batch_norm(params, stats, x, training=True, momentum=0.1)
    chex.assert_trees_all_close(a, b, atol=1e-13)
    # stop-gradient: d/dx of renorm == r * (d/dx of batch norm), since r and d are constants for the gradient
    w = jnp.asarray(RNG.normal(size=x.shape))
    g_renorm = jax.grad(lambda x: jnp.sum(jaxnorm.batch_renorm(params, stats, x, training=True)[0] * w))(x)
    g_bn = jax.grad(lambda x: jnp.sum(jaxnorm.batch_norm(params, stats, x, training=True)[0] * w))(x)
    *_, r = renorm_reference(np.asarray(x), np.ones(3), np.zeros(3), np.asarray(stats["mean"]),
                             np.asarray(stats["var"]), 3.0, 5.0, 1e-5, 0.01)
    np.testing.assert_allclose(g_renorm, g_bn * r.reshape(1, 3, 1), atol=1e-10)


def test_batch_renorm_schedule_is_traced_without_recompiling():
    params, stats = _state(dtype=jnp.float32)
    x = jnp.asarray(RNG.normal(size=(8, 3)), jnp.float32)
    chex.clear_trace_counter()

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(r_max, d_max):
        return jaxnorm.batch_renorm(params, stats, x, training=True, r_max=r_max, d_max=d_max)[0]

    for t in range(4):  # the paper ramps r_max from 1 to 3 and d_max from 0 to 5
        step(jnp.float32(1 + 0.5 * t), jnp.float32(1.25 * t))
    with pytest.raises(ValueError, match="`r_max` must be >= 1.0, got 0.5"):
        jaxnorm.batch_renorm(params, stats, x, training=True, r_max=0.5)


def test_batch_renorm_schedule_warm_up_then_linear_relaxation():
    """(r_max, d_max) per step: (1, 0) before warmup_steps, then linear to the final bounds over relax_steps; a
    training step at step t equals batch_renorm with those bounds given directly."""
    from jaxnorm._variants import renorm_bounds

    want = {0: (1.0, 0.0), 2: (1.0, 0.0), 3: (1.0, 0.0), 4: (1.5, 1.25), 5: (2.0, 2.5), 7: (3.0, 5.0), 50: (3.0, 5.0)}
    for t, (r, d) in want.items():
        chex.assert_trees_all_close(renorm_bounds(jnp.asarray(t), 3.0, 5.0, 3, 4), (r, d))
    assert renorm_bounds(jnp.asarray(2), 3.0, 5.0, 3, 0) == (1.0, 0.0)  # a hard switch at warmup_steps
    assert renorm_bounds(jnp.asarray(3), 3.0, 5.0, 3, 0) == (3.0, 5.0)
    params, stats = _state()
    x = jnp.asarray(RNG.normal(size=(8, 3)) * 3 + 1)
    for t, (r, d) in want.items():
        s = {**stats, "count": jnp.asarray(t, jnp.int32)}
        got = jaxnorm.batch_renorm(params, s, x, training=True, warmup_steps=3, relax_steps=4)
        chex.assert_trees_all_close(got, jaxnorm.batch_renorm(params, s, x, training=True, r_max=r, d_max=d),
                                    rtol=1e-12)
    with pytest.raises(ValueError, match="`warmup_steps` must be an int >= 0, got -1"):
        jaxnorm.batch_renorm(params, stats, x, training=True, warmup_steps=-1)
    with pytest.raises(ValueError, match=r"reads the step from `batch_stats\['count'\]`"):
        jaxnorm.batch_renorm(params, {k: stats[k] for k in ("mean", "var")}, x, training=True, warmup_steps=2)


def _renorm_layers(c, **kw):
    """The three wrappers with the same keywords, each as ``step(x) -> y`` over its own running state."""
    import equinox as eqx

    from jaxnorm import equinox as je

    linen = jl.BatchRenorm(use_running_average=False, **kw)
    variables = {"batch_stats": linen.init(jax.random.key(0), jnp.zeros((2, c)))["batch_stats"],
                 "params": {"scale": jnp.ones(c), "bias": jnp.zeros(c)}}
    linen_step = jax.jit(lambda v, x: linen.apply(v, x, mutable=["batch_stats"]))
    nnx_layer = jn.BatchRenorm(c, **kw)
    eqx_layer, eqx_state = eqx.nn.make_with_state(je.BatchRenorm)(c, "batch", dtype=jnp.float32, **{
        ("eps" if k == "epsilon" else k): v for k, v in kw.items()})
    eqx_step = jax.jit(jax.vmap(eqx_layer, axis_name="batch", in_axes=(0, None), out_axes=(0, None)))
    holders = {"linen": variables, "equinox": eqx_state}

    def linen_call(x):
        y, new = linen_step(holders["linen"], x)
        holders["linen"] = {**holders["linen"], **new}
        return y, holders["linen"]["batch_stats"]

    def eqx_call(x):
        y, holders["equinox"] = eqx_step(x, holders["equinox"])
        return y, holders["equinox"].get(eqx_layer.state_index)

    def nnx_call(x):
        return nnx_layer(x), {k: getattr(nnx_layer, k)[...] for k in ("mean", "var", "count")}

    return {"linen": linen_call, "nnx": nnx_call, "equinox": eqx_call}


@pytest.mark.parametrize("momentum", [{"torch_momentum": 0.1}, {"flax_momentum": 0.9}], ids=["torch", "flax"])
def test_batch_renorm_layers_follow_the_functional_schedule_in_every_framework(momentum):
    """linen, NNX and Equinox over 6 training steps crossing the warm-up and the relaxation: the functional core
    with the same arguments, the count (the step) in each running state."""
    pytest.importorskip("equinox", reason="jaxnorm.equinox needs the optional extra")
    c, kw = 3, dict(warmup_steps=2, relax_steps=2, r_max=2.0, d_max=1.0, epsilon=1e-3, **momentum)
    layers = _renorm_layers(c, **kw)
    flax_convention = "flax_momentum" in momentum
    stats = jaxnorm.batch_norm_init(c)[1]
    params = {"scale": jnp.ones(c), "bias": jnp.zeros(c)}
    fn = jax.jit(lambda s, x: jaxnorm.batch_renorm(
        params, s, x, training=True, warmup_steps=2, relax_steps=2, r_max=2.0, d_max=1.0, eps=1e-3,
        momentum=0.1 if not flax_convention else 1 - 0.9, running_var_unbiased=not flax_convention))
    for t in range(6):
        x = jnp.asarray(np.random.default_rng(t).normal(size=(16, c)) * (1 + t) + t, jnp.float32)
        y, stats = fn(stats, x)
        for name, call in layers.items():
            got_y, got_stats = call(x)
            chex.assert_trees_all_close((got_y, got_stats), (y, stats), rtol=1e-5, atol=1e-6, custom_message=name)
    assert int(stats["count"]) == 6


def test_batch_renorm_layer_resumes_its_schedule_from_a_checkpoint_and_never_recompiles():
    """The step lives in batch_stats: three steps, a save and a restore (flax.serialization), three more, equal the
    six uninterrupted; one trace for all of them."""
    from flax import serialization

    layer = jl.BatchRenorm(use_running_average=False, warmup_steps=2, relax_steps=3)
    xs = jnp.asarray(RNG.normal(size=(6, 8, 3)) * 2, jnp.float32)
    variables = layer.init(jax.random.key(0), xs[0])
    chex.clear_trace_counter()

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(v, x):
        y, new = layer.apply(v, x, mutable=["batch_stats"])
        return y, {**v, **new}

    v, ys = variables, []
    for x in xs:
        y, v = step(v, x)
        ys.append(y)
    resumed = variables
    for x in xs[:3]:
        _, resumed = step(resumed, x)
    resumed = serialization.from_bytes(variables, serialization.to_bytes(resumed))
    for i, x in enumerate(xs[3:]):
        y, resumed = step(resumed, x)
        chex.assert_trees_all_close(y, ys[3 + i], rtol=1e-6)
    chex.assert_trees_all_close(resumed, v, rtol=1e-6)


def test_batch_renorm_layers_refuse_what_they_cannot_do():
    with pytest.raises(TypeError, match="`momentum`=0.99 is ambiguous"):
        jl.BatchRenorm(momentum=0.99)
    with pytest.raises(ValueError, match="not both"):
        jl.BatchRenorm(use_running_average=False, torch_momentum=0.1, flax_momentum=0.99).init(
            jax.random.key(0), jnp.ones((2, 3)))
    with pytest.raises(TypeError, match="`track_running_stats` is always True"):
        jn.BatchRenorm(3, track_running_stats=False)
    with pytest.raises(ValueError, match="`relax_steps` must be an int >= 0"):
        jl.BatchRenorm(use_running_average=False, relax_steps=1.5).init(jax.random.key(0), jnp.ones((2, 3)))


# ------------------------------------------------------------------ frozen batch norm


def test_frozen_batch_norm_is_torchvisions_formula_without_gradients():
    params, stats = _state(4)
    x = RNG.normal(size=(2, 4, 3, 3))
    # torchvision.ops.FrozenBatchNorm2d.forward, in NumPy
    scale = np.asarray(params["scale"]) * (np.asarray(stats["var"]) + 1e-5) ** -0.5
    bias = np.asarray(params["bias"]) - np.asarray(stats["mean"]) * scale
    ref = x * scale.reshape(1, -1, 1, 1) + bias.reshape(1, -1, 1, 1)
    y = jaxnorm.frozen_batch_norm(params, stats, jnp.asarray(x))
    np.testing.assert_allclose(y, ref, atol=1e-13)
    g = jax.grad(lambda p: jnp.sum(jaxnorm.frozen_batch_norm(p, stats, jnp.asarray(x))))(params)
    assert all(np.all(v == 0) for v in jax.tree.leaves(g))
    model = jl.FrozenBatchNorm()
    v = {"params": {k: params[k] for k in ("scale", "bias")}, "batch_stats": dict(stats)}
    y_nhwc = model.apply(v, jnp.moveaxis(jnp.asarray(x), 1, -1))
    np.testing.assert_allclose(jnp.moveaxis(y_nhwc, -1, 1), ref, atol=1e-13)


# ------------------------------------------------------------------ folding


def _add_bias(out, b):
    return out + jnp.reshape(jnp.asarray(b, out.dtype), (1,) * (out.ndim - 1) + (-1,))


@pytest.mark.parametrize("kind", ["dense", "conv", "torch_layout"])
def test_fold_equals_layer_then_eval_batch_norm(kind):
    params, stats = _state(5, jnp.float32)
    if kind == "dense":
        x = jnp.asarray(RNG.normal(size=(7, 4)), jnp.float32)
        kernel = jnp.asarray(RNG.normal(size=(4, 5)), jnp.float32)
        layer = lambda k, b: _add_bias(x @ k, b)
    else:
        x = jnp.asarray(RNG.normal(size=(2, 6, 6, 3)), jnp.float32)
        kernel = jnp.asarray(RNG.normal(size=(3, 3, 3, 5)), jnp.float32)
        layer = lambda k, b: _add_bias(jax.lax.conv_general_dilated(x, k, (1, 1), "SAME",
                                                                    dimension_numbers=("NHWC", "HWIO", "NHWC")), b)
    bias = jnp.asarray(RNG.normal(size=5), jnp.float32)
    ref, _ = jaxnorm.batch_norm(params, stats, layer(kernel, bias), training=False, axis=-1)
    if kind == "torch_layout":  # an (O, I, kh, kw) PyTorch weight: output channels on axis 0
        k_t = jnp.transpose(kernel, (3, 2, 0, 1))
        new_k, new_b = jaxnorm.fold(k_t, bias, params, stats, out_axis=0)
        new_k = jnp.transpose(new_k, (2, 3, 1, 0))
    else:
        new_k, new_b = jaxnorm.fold(kernel, bias, params, stats)
    np.testing.assert_allclose(layer(new_k, new_b), ref, rtol=1e-5, atol=1e-4)
    k0, b0 = jaxnorm.fold(kernel, None, params, stats)  # use_bias=False layers
    ref0, _ = jaxnorm.batch_norm(params, stats, layer(kernel, jnp.zeros(5, jnp.float32)), training=False, axis=-1)
    np.testing.assert_allclose(layer(k0, b0), ref0, rtol=1e-5, atol=1e-4)


def test_fold_keeps_eps_where_the_variance_is_of_its_order():
    """Running variances near eps (a channel that barely varies) and a non-default eps, in float64: the folded layer
    equals layer + eval BatchNorm to 1e-12, so eps must sit inside the square root exactly as in batch norm
    (``gamma * rsqrt(var)`` would be off by a factor of up to sqrt(1 + eps / var), here ~10)."""
    params, stats = _state(3, jnp.float64)
    stats = {**stats, "var": jnp.asarray([1e-5, 1e-4, 2.0])}
    x = jnp.asarray(RNG.normal(size=(6, 4)))
    kernel, bias = jnp.asarray(RNG.normal(size=(4, 3))), jnp.asarray(RNG.normal(size=3))
    ref, _ = jaxnorm.batch_norm(params, stats, _add_bias(x @ kernel, bias), training=False, axis=-1, eps=1e-3)
    new_k, new_b = jaxnorm.fold(kernel, bias, params, stats, eps=1e-3)
    np.testing.assert_allclose(_add_bias(x @ new_k, new_b), ref, rtol=1e-12, atol=1e-12)


def test_folded_lenet_gives_the_same_eval_logits():
    data = lenet.load_digits_28()
    x, y = jnp.asarray(data[0][:64]), jnp.asarray(data[1][:64])
    model = lenet.LeNet(norm="jaxnorm")
    state = _common.create_state(model, jax.random.key(0), x[:2], optax.sgd(0.5))
    step = _common.make_train_step(_common.cross_entropy)
    for _ in range(3):  # non-trivial statistics and parameters
        state, _ = step(state, x, y)
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    pairs = {"Conv_0": "BatchNorm_0", "Conv_1": "BatchNorm_1", "Dense_0": "BatchNorm_2", "Dense_1": "BatchNorm_3"}
    folded = jaxnorm.fold_variables(variables, pairs)
    want = model.apply(variables, x, train=False)
    got = lenet.LeNet(norm="none").apply({"params": folded}, x, train=False)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_folded_deep_mlp_gives_the_same_eval_logits():
    model = _common.MLP(hidden=(16,) * 6, out=3, use_bn=True)
    x = jnp.asarray(RNG.normal(size=(32, 8)), jnp.float32)
    state = _common.create_state(model, jax.random.key(1), x[:2], optax.sgd(0.1))
    step = _common.make_train_step(_common.cross_entropy)
    for _ in range(3):
        state, _ = step(state, x, jnp.asarray(RNG.integers(0, 3, 32), jnp.int32))
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    folded = jaxnorm.fold_variables(variables, {f"Dense_{i}": f"BatchNorm_{i}" for i in range(6)})
    want = model.apply(variables, x, train=False)
    got = _common.MLP(hidden=(16,) * 6, out=3, use_bn=False).apply({"params": folded}, x, train=False)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------ precise BN


def test_recalibrate_gives_the_exact_population_statistics():
    model = _common.MLP(hidden=(6, 6), out=2, use_bn=True, bn_input=True)
    data = [jnp.asarray(RNG.normal(size=(16, 4)) * (i + 1) + i, jnp.float32) for i in range(5)]
    variables = model.init(jax.random.key(0), data[0], train=False)
    new = recalibrate(model, variables, iter(data), num_batches=4, progress=True, train=True)
    everything = np.concatenate([np.asarray(d, np.float64) for d in data[:4]])
    first = new["BatchNorm_0"]
    np.testing.assert_allclose(first["mean"], everything.mean(0), rtol=1e-5)
    np.testing.assert_allclose(first["var"], everything.var(0, ddof=1), rtol=1e-5)
    assert int(first["count"]) == 0
    # deeper layers: their recalibrated statistics make eval mode reproduce the population-normalized activations
    for path in ("BatchNorm_1", "BatchNorm_2"):
        assert np.all(np.isfinite(new[path]["var"])) and not np.allclose(new[path]["var"], 1.0)
    with pytest.raises(ValueError, match="yielded no batch"):
        recalibrate(model, variables, iter([]), train=True, progress=False)


class _TupleAxisNet(nn.Module):
    """A BatchNorm over two feature axes (linen.BatchNorm's tuple ``axis``), then one whose statistics skip the
    positions a mask drops."""

    @nn.compact
    def __call__(self, x):
        h = jnp.tanh(jl.BatchNorm(use_running_average=False, axis=(1, 2))(x))
        return jl.BatchNorm(use_running_average=False)(h, mask=x[..., :1] > -0.5)


def test_recalibrate_accepts_every_axis_linen_batch_norm_accepts_and_its_mask():
    data = [jnp.asarray(RNG.normal(size=(8, 3, 2)) * (i + 1) + i / 2, jnp.float32) for i in range(3)]
    model = _TupleAxisNet()
    variables = model.init(jax.random.key(0), data[0])
    new = recalibrate(model, variables, iter(data), progress=False)
    seen = np.concatenate([np.asarray(d, np.float64) for d in data])
    np.testing.assert_allclose(new["BatchNorm_0"]["mean"], seen.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(new["BatchNorm_0"]["var"], seen.var(0, ddof=1), rtol=1e-5)
    # the second layer's input, batch by batch (the first normalizes each batch with its own statistics)
    h = np.concatenate([np.tanh((d - d.mean(0)) / np.sqrt(d.var(0) + 1e-5)) for d in seen.reshape(3, 8, 3, 2)])
    kept = h[np.broadcast_to(seen[..., :1] > -0.5, h.shape)].reshape(-1, 2)
    np.testing.assert_allclose(new["BatchNorm_1"]["mean"], kept.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(new["BatchNorm_1"]["var"], kept.var(0, ddof=1), rtol=1e-5, atol=1e-6)


class _NNXNet(nnx.Module):
    def __init__(self, rngs):
        self.bn0 = jn.BatchNorm(4, rngs=rngs)
        self.dense = nnx.Linear(4, 3, rngs=rngs)
        self.bn1 = jn.BatchNorm(3, axis=-1, rngs=rngs)

    def __call__(self, x):
        return self.bn1(self.dense(self.bn0(x)) + self.bn0(2 * x).mean())  # bn0 is called twice


def test_recalibrate_an_nnx_model_in_place_equals_the_linen_population_statistics():
    data = [jnp.asarray(RNG.normal(size=(16, 4)) * (i + 1) + i, jnp.float32) for i in range(4)]
    model = _NNXNet(nnx.Rngs(0))
    before = {k: np.asarray(v) for k, v in nnx.to_flat_state(nnx.state(model, nnx.BatchStat))}
    assert recalibrate(model, iter(data), num_batches=3, progress=False) is model
    seen = np.concatenate([np.asarray(d, np.float64) for d in data[:3]] + [2 * np.asarray(d, np.float64)
                                                                             for d in data[:3]])
    np.testing.assert_allclose(model.bn0.mean[...], seen.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(model.bn0.var[...], seen.var(0, ddof=1), rtol=1e-5)
    assert int(model.bn0.count[...]) == before[("bn0", "count")]  # count untouched, nothing else trained
    assert not np.allclose(model.bn1.var[...], before[("bn1", "var")])
    model.eval()
    with pytest.raises(ValueError, match=r"BatchNorm 'bn0' is in evaluation mode; call model.train\(\) first"):
        recalibrate(model, iter(data), progress=False)


def test_recalibrate_says_why_it_cannot_read_equinox_batch_norms():
    eqx = pytest.importorskip("equinox")
    from jaxnorm import equinox as je

    bn = eqx.nn.make_with_state(je.BatchNorm)(3, "batch")[0]
    with pytest.raises(TypeError, match=r"sees one example under the caller's jax.vmap.*torch_momentum=None"):
        recalibrate(bn, iter([jnp.ones((4, 3))]))


# ------------------------------------------------------------------ non-finite guard


def test_nonfinite_guard_keeps_statistics_and_reports_the_skip():
    params, stats = jaxnorm.batch_norm_init(3, nonfinite_guard=True)
    x = RNG.normal(size=(4, 3)).astype(np.float32)
    step = jax.jit(lambda s, x: jaxnorm.batch_norm(params, s, x, training=True))
    _, stats = step(stats, jnp.asarray(x))
    bad = x.copy()
    bad[2, 1] = np.inf
    _, after = step(stats, jnp.asarray(bad))
    chex.assert_trees_all_equal({k: after[k] for k in ("mean", "var", "count")},
                                {k: stats[k] for k in ("mean", "var", "count")})
    assert int(after["skipped"]) == 1 and int(after["count"]) == 1
    _, later = step(after, jnp.asarray(x))
    assert int(later["count"]) == 2 and int(later["skipped"]) == 1
    # unguarded state (the default) is corrupted by the same batch, as in PyTorch
    _, plain = jaxnorm.batch_norm(params, jaxnorm.batch_norm_init(3)[1], jnp.asarray(bad), training=True)
    assert not np.isfinite(plain["mean"][1])
    # the wrapper flag
    v = jl.BatchNorm(nonfinite_guard=True).init(jax.random.key(0), jnp.asarray(x), use_running_average=True)
    _, upd = jl.BatchNorm(nonfinite_guard=True).apply(v, jnp.asarray(bad), use_running_average=False,
                                                      mutable=["batch_stats"])
    assert int(upd["batch_stats"]["skipped"]) == 1
