"""Closed-form cases, numerics, dtypes and JAX transforms of the functional API."""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxnorm
from jaxnorm import _xla_cpu
from tests import registry

# ------------------------------------------------------------------ the classic tutorials' worked examples


@pytest.mark.parametrize("spatial", [(), (2,), (2, 3)], ids=["1d", "2d", "3d"])
def test_tutorial_running_stats_momentum_03(spatial):
    """Feature k is the constant k, batch 3, momentum 0.3: mean 0.3k then 0.51k; var 0.7 then 0.49."""
    c = 4
    x = jnp.broadcast_to(jnp.arange(1, c + 1, dtype=jnp.float32).reshape((1, c) + (1,) * len(spatial)),
                         (3, c) + spatial)
    params, stats = jaxnorm.batch_norm_init(c)
    _, stats = jaxnorm.batch_norm(params, stats, x, training=True, momentum=0.3)
    np.testing.assert_allclose(stats["mean"], 0.3 * np.arange(1, c + 1), rtol=1e-6)
    np.testing.assert_allclose(stats["var"], 0.7, rtol=1e-6)
    _, stats = jaxnorm.batch_norm(params, stats, x, training=True, momentum=0.3)
    np.testing.assert_allclose(stats["mean"], 0.51 * np.arange(1, c + 1), rtol=1e-6)
    np.testing.assert_allclose(stats["var"], 0.49, rtol=1e-6)
    assert int(stats["count"]) == 2


def test_tutorial_layer_norm_two_channels():
    x = jnp.stack([jnp.ones((3, 4)), 2 * jnp.ones((3, 4))])[None]  # (1, 2, 3, 4)
    y = jaxnorm.layer_norm(jaxnorm.layer_norm_init((2, 3, 4)), x, normalized_shape=(2, 3, 4))
    np.testing.assert_allclose(y[0, 0], -1, atol=1e-4)
    np.testing.assert_allclose(y[0, 1], 1, atol=1e-4)


def test_tutorial_instance_norm_constant_maps():
    x = jnp.arange(1.0, 7.0).reshape(2, 3, 1, 1) * jnp.ones((2, 3, 4, 5))
    y, _ = jaxnorm.instance_norm({}, {}, x, training=True)
    np.testing.assert_array_equal(y, 0.0)


def test_tutorial_group_norm_two_groups():
    x = jnp.arange(1.0, 5.0).reshape(1, 4, 1, 1) * jnp.ones((1, 4, 2, 2))
    y = jaxnorm.group_norm({}, x, num_groups=2, eps=1e-12)
    np.testing.assert_allclose(y[0, :, 0, 0], [-1, 1, -1, 1], atol=1e-5)


# ------------------------------------------------------------------ closed-form running statistics


@pytest.mark.parametrize("momentum", [0.0, 1.0])
def test_momentum_at_its_bounds_keeps_or_replaces_the_running_statistics(momentum):
    """momentum=1 (allowed, as in PyTorch): the running statistics become the batch's, the variance unbiased;
    momentum=0: they stay. Both count the batch."""
    xb = np.random.default_rng(5).normal(size=(6, 3)) * 2 + 1
    params, stats = jaxnorm.batch_norm_init(3, affine=False)
    stats = {**stats, "mean": jnp.full(3, 7.0), "var": jnp.full(3, 9.0)}
    _, new = jaxnorm.batch_norm(params, stats, jnp.asarray(xb), training=True, momentum=momentum)
    want_mean, want_var = (xb.mean(0), xb.var(0, ddof=1)) if momentum else (np.full(3, 7.0), np.full(3, 9.0))
    chex.assert_trees_all_close((new["mean"], new["var"]), (want_mean, want_var), rtol=1e-6)
    assert int(new["count"]) == 1


def test_momentum_none_is_cumulative_average():
    params, stats = jaxnorm.batch_norm_init(2, affine=False)
    batches = [np.random.default_rng(i).normal(size=(5, 2)) + i for i in range(4)]
    for xb in batches:
        _, stats = jaxnorm.batch_norm(params, stats, jnp.asarray(xb, jnp.float32), training=True, momentum=None)
    # cumulative average of the batch means (and of the unbiased batch variances), initial state included 0 times
    np.testing.assert_allclose(stats["mean"], np.mean([b.mean(0) for b in batches], 0), rtol=1e-5)
    np.testing.assert_allclose(stats["var"], np.mean([b.var(0, ddof=1) for b in batches], 0), rtol=1e-5)


def test_eval_mode_does_not_move_statistics_and_uses_them():
    params, stats = jaxnorm.batch_norm_init(3)
    stats = {"mean": jnp.array([1.0, 2.0, 3.0]), "var": jnp.array([4.0, 1.0, 0.25]), "count": jnp.array(7, jnp.int32)}
    x = jnp.ones((2, 3))
    y, new = jaxnorm.batch_norm(params, stats, x, training=False, eps=1e-12)
    assert new is stats
    np.testing.assert_allclose(y, np.broadcast_to((1 - np.array([1, 2, 3])) / np.array([2, 1, 0.5]), (2, 3)), rtol=1e-6)


def test_no_running_stats_normalizes_with_batch_stats_in_eval():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(8, 3)) * 3 + 1, jnp.float32)
    y, stats = jaxnorm.batch_norm({}, {}, x, training=False)
    assert stats == {}
    np.testing.assert_allclose(np.mean(y, 0), 0, atol=1e-6)
    np.testing.assert_allclose(np.var(y, 0), 1, atol=1e-4)


# ------------------------------------------------------------------ numerics and dtypes


@pytest.mark.parametrize("loc", [1e4, 1e6])
def test_large_mean_small_spread_is_stable(loc):
    """Float32 with mean >> std: E[x^2]-E[x]^2 would lose every digit; two-pass keeps unit variance."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(loc + rng.normal(size=(256, 4)), jnp.float32)
    y, _ = jaxnorm.batch_norm({}, {}, x, training=True)
    # the input itself only resolves deviations to ulp(loc); the result must match the float64 ground truth
    xd = np.asarray(x, np.float64)
    ref = (xd - xd.mean(0)) / np.sqrt(xd.var(0) + 1e-5)
    np.testing.assert_allclose(np.var(np.asarray(y, np.float64), 0), 1, atol=1e-3)
    np.testing.assert_allclose(y, ref, atol=2e-3 if loc == 1e4 else 5e-2)



def _normalize_with(layer, x):
    """(y, reduction axes, reshape of x for the float64 reference) for a normalization layer with default options."""
    if layer == "batch":
        return jaxnorm.batch_norm({}, {}, x, training=True)[0], (0,), x.shape
    if layer == "layer":
        return jaxnorm.layer_norm({}, x, normalized_shape=x.shape[-1]), (1,), x.shape
    if layer == "group":  # (N, C, L) with 2 groups of C/2 channels
        return jaxnorm.group_norm({}, x, num_groups=2), (2, 3), (x.shape[0], 2, x.shape[1] // 2, x.shape[2])
    return jaxnorm.instance_norm({}, {}, x, training=True)[0], (2,), x.shape


LAYER_SHAPES = {"batch": (256, 4), "layer": (4, 256), "group": (2, 4, 128), "instance": (2, 3, 256)}


@pytest.mark.parametrize("layer", ["batch", "layer", "group", "instance"])
@pytest.mark.parametrize("offset", [3.9, 4.1, 1e4], ids=["inside-one-pass-limit", "outside", "one-hostile-group"])
def test_statistics_stay_exact_on_both_sides_of_the_one_pass_limit(layer, offset):
    """The statistics come from one pass (sum x, sum x^2) only while every group has mean^2 <= 16 var, else from
    shifted sums. Put ONE group's mean `offset` std away from zero (the others at 0.5 std) and check the output and
    its variance against float64: just inside the limit (one pass, its worst case), just outside, and far off."""
    rng = np.random.default_rng(3)
    shape = LAYER_SHAPES[layer]
    xn = rng.normal(size=shape)
    _, axes, ref_shape = _normalize_with(layer, jnp.zeros(shape, jnp.float32))
    xr = xn.reshape(ref_shape)
    xr = (xr - xr.mean(axes, keepdims=True)) / xr.std(axes, keepdims=True) + 0.5  # exact mean 0.5, std 1
    first = tuple(0 if i not in axes else slice(None) for i in range(len(ref_shape)))
    xr[first] += offset - 0.5
    x = jnp.asarray(xr.reshape(shape), jnp.float32)
    y, _, _ = _normalize_with(layer, x)
    xd = np.asarray(x, np.float64).reshape(ref_shape)
    ref = (xd - xd.mean(axes, keepdims=True)) / np.sqrt(xd.var(axes, keepdims=True) + 1e-5)
    yd = np.asarray(y, np.float64).reshape(ref_shape)
    # the one-pass bound: 66 * eps * log2(n) relative (see jaxnorm._statistics.checked_one_pass); far off zero the input
    # itself only resolves deviations to ulp(1e4)
    bound = 66 * np.finfo(np.float32).eps * np.log2(np.prod([ref_shape[a] for a in axes]))
    np.testing.assert_allclose(yd, ref, atol=2e-3 if offset > 100 else 2 * bound)
    np.testing.assert_allclose(np.var(yd, axes), np.var(ref, axes), atol=1e-4 if offset > 100 else bound)


ROW_CASES = {  # x shape, its reduced axes, float64 reference view, its reduced axes: >= ROW_FUSION_MIN_ROWS rows
    "layer": ((4096, 16), (1,), (4096, 16), (1,)),
    "instance": ((64, 64, 2, 8), (2, 3), (64, 64, 16), (2,)),
    "group": ((2048, 4, 8), (2,), (2048, 2, 16), (2,)),  # 2 groups of 2 channels, NCHW
}


@pytest.mark.parametrize("layer", list(ROW_CASES))
def test_row_statistics_are_exact_far_from_zero(layer):
    """Trailing-axes statistics over many rows take the fused two-pass row path (_statistics.row_moments). Rows sit at
    offsets from 0 to 1e4 std; output and variance must match float64 (E[x^2]-E[x]^2 would lose every digit)."""
    shape, red, view, axes = ROW_CASES[layer]
    assert _xla_cpu.contiguous_rows(shape, red, (1, 2) if layer == "group" else None) is not None
    rng = np.random.default_rng(5)
    xr = rng.normal(size=view)
    xr = (xr - xr.mean(axes, keepdims=True)) / xr.std(axes, keepdims=True)
    xr = xr + 10.0 ** rng.integers(-1, 5, size=view[:-1] + (1,))  # per-row offsets 0.1 .. 1e4 std
    x = jnp.asarray(xr.reshape(shape), jnp.float32)
    y = _normalize_with(layer, x)[0]
    xd = np.asarray(x, np.float64).reshape(view)
    ref = (xd - xd.mean(axes, keepdims=True)) / np.sqrt(xd.var(axes, keepdims=True) + 1e-5)
    yd = np.asarray(y, np.float64).reshape(view)
    np.testing.assert_allclose(yd, ref, atol=2e-3)  # 1e4 off zero the input resolves deviations to ulp(1e4)
    np.testing.assert_allclose(np.var(yd, axes), np.var(ref, axes), atol=1e-4)


def test_sums_of_squares_that_overflow_fall_back_to_the_shifted_statistics():
    """float32 values near 1e19: sum(x^2) overflows to inf (and inf passes `mean^2 <= 16 var`); the shifted sums
    around the mean do not, so the output is still normalized."""
    rng = np.random.default_rng(4)
    x = jnp.asarray(1e19 + 1e17 * rng.normal(size=(64, 2)), jnp.float32)
    with np.errstate(over="ignore"):
        assert not np.isfinite(np.sum(np.square(np.asarray(x)), 0, dtype=np.float32)).any()
    y, _ = jaxnorm.batch_norm({}, {}, x, training=True)
    np.testing.assert_allclose(np.var(np.asarray(y, np.float64), 0), 1, atol=1e-3)


def test_constant_channel_gives_zero_and_finite_grads():
    x = jnp.full((4, 3, 5), 2.5, jnp.float32)
    params, stats = jaxnorm.batch_norm_init(3)
    y, _ = jaxnorm.batch_norm(params, stats, x, training=True)
    np.testing.assert_array_equal(y, 0)
    g = jax.grad(lambda x: jnp.sum(jnp.sin(jaxnorm.batch_norm(params, stats, x, training=True)[0])))(x)
    assert np.all(np.isfinite(g))


# ------------------------------------------------------------------ transforms


@pytest.mark.parametrize("name,ctor,shape", registry.LAYERS, ids=[t[0] for t in registry.LAYERS])
def test_jit_compiles_once_per_shape_in_both_modes_and_matches_eager(name, ctor, shape):
    """The one compile-once check: a jitted training step and a jitted evaluation, called with new values of the
    same shapes (and the statistics they return), trace once each and give the eager results."""
    built = registry.build(name, ctor)
    chex.clear_trace_counter()

    @jax.jit
    @chex.assert_max_traces(n=1)
    def train_step(params, stats, x):
        return built.apply(params, stats, x, training=True)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def eval_step(params, stats, x):
        return built.apply(params, stats, x, training=False)

    steps = {True: train_step, False: eval_step}
    rng = np.random.default_rng(0)
    stats = built.batch_stats
    for _ in range(3):
        x = jnp.asarray(rng.normal(size=shape), jnp.float32)
        outs = {t: step(built.params, stats, x) for t, step in steps.items()}
        for training, got in outs.items():
            chex.assert_trees_all_close(got, built.apply(built.params, stats, x, training=training), atol=1e-6)
        stats = outs[True][1]  # the next call gets the updated statistics: same shapes, no new trace


@pytest.mark.parametrize("with_output", [True, False], ids=["y-and-stats", "stats-only"])
@pytest.mark.parametrize("layer", ["batch", "instance"])
def test_grad_through_the_running_statistics_matches_finite_differences(layer, with_output):
    """Differentiating the updated running mean/var (the transpose of the tangent rule's mean/var tangents, alone
    when only the statistics are used) agrees with central differences in float64."""
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.normal(size=(4, 3, 5)) * 2 + 1)
    if layer == "batch":
        params, stats = jaxnorm.batch_norm_init(3, dtype=jnp.float64)
        apply = lambda x: jaxnorm.batch_norm(params, stats, x, training=True, momentum=0.3)
    else:
        params, stats = jaxnorm.instance_norm_init(3, affine=True, track_running_stats=True, dtype=jnp.float64)
        apply = lambda x: jaxnorm.instance_norm(params, stats, x, training=True, momentum=0.3)
    a, b, w = (jnp.asarray(rng.normal(size=s)) for s in ((3,), (3,), x.shape))

    @jax.jit
    def loss(x):
        y, new = apply(x)
        out = jnp.sum(new["mean"] * a) + jnp.sum(jnp.sqrt(new["var"]) * b)
        return out + (jnp.sum(jnp.tanh(y) * w) if with_output else 0.0)

    v = jnp.asarray(rng.normal(size=x.shape))
    h = 1e-6
    fd = (loss(x + h * v) - loss(x - h * v)) / (2 * h)
    np.testing.assert_allclose(jnp.vdot(jax.jit(jax.grad(loss))(x), v), fd, rtol=1e-6, atol=1e-8)

@pytest.mark.parametrize("name,ctor,shape", registry.LAYERS, ids=[t[0] for t in registry.LAYERS])
def test_grad_matches_finite_differences(name, ctor, shape):
    built = registry.build(name, ctor, jnp.float64)
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=shape))
    params = jax.tree.map(lambda p: p + 0.1 * jnp.asarray(rng.normal(size=p.shape)), built.params)
    w = jnp.asarray(rng.normal(size=shape))

    @jax.jit
    def loss(params, x):
        return jnp.sum(jnp.tanh(built.apply(params, built.batch_stats, x, training=True)[0]) * w)

    gp, gx = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x)
    v = jnp.asarray(rng.normal(size=shape))
    h = 1e-6
    fd = (loss(params, x + h * v) - loss(params, x - h * v)) / (2 * h)
    np.testing.assert_allclose(jnp.vdot(gx, v), fd, rtol=1e-6, atol=1e-8)
    for k, g in gp.items():
        dv = jnp.asarray(rng.normal(size=g.shape))
        plus = {**params, k: params[k] + h * dv}
        minus = {**params, k: params[k] - h * dv}
        np.testing.assert_allclose(jnp.vdot(g, dv), (loss(plus, x) - loss(minus, x)) / (2 * h), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("name,ctor,shape", registry.LAYERS, ids=[t[0] for t in registry.LAYERS])
def test_vmap_over_an_ensemble_of_layers(name, ctor, shape):
    """Stacked params/state of E independent layers == a Python loop over them."""
    built = registry.build(name, ctor)
    e = 3
    rng = np.random.default_rng(3)
    params = jax.tree.map(lambda p: jnp.stack([p + 0.1 * i for i in range(e)]), built.params)
    stats = jax.tree.map(lambda s: jnp.stack([s] * e), built.batch_stats)
    xs = jnp.asarray(rng.normal(size=(e,) + shape), jnp.float32)
    member = jax.jit(functools.partial(built.apply, training=True))
    ys, new = jax.jit(jax.vmap(member))(params, stats, xs)
    for i in range(e):
        pi, si, newi = (jax.tree.map(lambda t, i=i: t[i], tree) for tree in (params, stats, new))
        chex.assert_trees_all_close((ys[i], newi), member(pi, si, xs[i]), atol=1e-6)


def test_equivalences_between_layers():
    """LayerNorm over (C,H,W) == GroupNorm(1); InstanceNorm == GroupNorm(C)."""
    x = jnp.asarray(np.random.default_rng(4).normal(size=(3, 4, 5, 2)))
    ln = jaxnorm.layer_norm({}, x, normalized_shape=(4, 5, 2))
    np.testing.assert_allclose(jaxnorm.group_norm({}, x, num_groups=1), ln, atol=1e-12)
    inn, _ = jaxnorm.instance_norm({}, {}, x, training=True)
    np.testing.assert_allclose(jaxnorm.group_norm({}, x, num_groups=4), inn, atol=1e-12)


def test_masked_statistics_equal_statistics_of_the_unpadded_batch():
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.normal(size=(6, 3, 4)))
    mask = jnp.asarray([True, True, False, True, False, True]).reshape(6, 1, 1)
    params, stats = jaxnorm.batch_norm_init(3, dtype=jnp.float64)
    y, s1 = jaxnorm.batch_norm(params, stats, x, training=True, mask=mask)
    keep = np.asarray(mask[:, 0, 0])
    y_ref, s2 = jaxnorm.batch_norm(params, stats, x[keep], training=True)
    np.testing.assert_allclose(y[keep], y_ref, atol=1e-12)
    chex.assert_trees_all_close(s1, s2, atol=1e-12)


def test_per_position_mask_for_padded_sequences():
    """(N, C, L) sequences padded to L: a (N, 1, L) mask == statistics over the real positions only."""
    rng = np.random.default_rng(6)
    lengths = [5, 2, 4]
    x = jnp.asarray(rng.normal(size=(3, 2, 5)) * 3 + 1)
    mask = jnp.asarray(np.arange(5)[None, None, :] < np.asarray(lengths)[:, None, None])
    params, stats = jaxnorm.batch_norm_init(2, dtype=jnp.float64)
    y, s = jaxnorm.batch_norm(params, stats, x, training=True, mask=mask)
    real = np.concatenate([np.asarray(x[i, :, :n]) for i, n in enumerate(lengths)], axis=1)  # (C, total)
    mean, var = real.mean(1), real.var(1)
    np.testing.assert_allclose(y[0], (x[0] - mean[:, None]) / np.sqrt(var[:, None] + 1e-5), atol=1e-12)
    np.testing.assert_allclose(s["mean"], 0.1 * mean, atol=1e-12)
    np.testing.assert_allclose(s["var"], 0.9 + 0.1 * real.var(1, ddof=1), atol=1e-12)


@pytest.mark.parametrize("keys", [("bias",), ("scale", "bias")])
def test_rms_norm_with_a_bias_matches_the_formula_in_every_autodiff_mode(keys):
    """rms_norm's optional bias (equinox.nn.RMSNorm's use_bias): output, reverse- and forward-mode derivatives
    equal the formula x / sqrt(mean(x^2) + eps) * scale + bias differentiated by JAX."""
    rng = np.random.default_rng(11)
    x = jnp.asarray(rng.normal(size=(3, 4, 5)) + 1.5, jnp.float64)
    params = {k: jnp.asarray(rng.normal(size=(5,)), jnp.float64) for k in keys}

    def ref(p, x):
        y = x / jnp.sqrt(jnp.mean(x**2, -1, keepdims=True) + 1e-6)
        return y * p.get("scale", jnp.ones(5)).reshape(1, 1, 5) + p["bias"].reshape(1, 1, 5)

    ours = lambda p, x: jaxnorm.rms_norm(p, x, normalized_shape=5, eps=1e-6)
    np.testing.assert_allclose(ours(params, x), ref(params, x), rtol=1e-12, atol=1e-12)
    jacobians = jax.jit(lambda f, p, x: (jax.jacrev(f, (0, 1))(p, x), jax.jacfwd(f, (0, 1))(p, x)), static_argnums=0)
    chex.assert_trees_all_close(jacobians(ours, params, x), jacobians(ref, params, x), rtol=1e-10, atol=1e-12)
