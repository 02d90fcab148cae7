"""Property tests: every layer on random shapes/options vs an independent float64 NumPy reference.

The reference below is written from the textbook formulas (forward, PyTorch's running-stat update and the
closed-form backward pass), not from jaxnorm's code. Example counts follow the hypothesis profile in conftest.py
(``HYPOTHESIS_PROFILE=thorough`` for the long run).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given
from hypothesis import strategies as st

import jaxnorm
from tests.tolerances import tol

# ------------------------------------------------------------------ the independent float64 reference


def ref_normalize(x, red, eps, w, b, center=True):
    """Forward and a closure for the backward pass of a normalization over axes ``red`` (keepdims)."""
    n = np.prod([x.shape[a] for a in red])
    mean = x.mean(red, keepdims=True) if center else 0.0
    xc = x - mean
    var = (xc**2).mean(red, keepdims=True)
    inv = 1.0 / np.sqrt(var + eps)
    xhat = xc * inv
    y = xhat * w + b

    # conditioning of the normalization: rounding the inputs (and the mean) costs a relative error of about
    # eps_dtype * max|x| / std in the output, so tolerances scale with it for ill-conditioned groups
    backward_kappa = float(np.max(np.abs(x) * inv)) if np.size(x) else 1.0

    def backward(dy):
        g = dy * w
        if center:  # d/dx of (x - mean) * rsqrt(var + eps)
            dx = inv / n * (n * g - g.sum(red, keepdims=True) - xhat * (g * xhat).sum(red, keepdims=True))
        else:  # RMS: x * rsqrt(mean(x^2) + eps)
            dx = inv * (g - xhat * (g * xhat).mean(red, keepdims=True))
        return dx, dy * xhat

    backward.kappa = max(1.0, backward_kappa)
    return y, mean, var, backward


def reduce_to(a, shape):
    """Sum a broadcast gradient back to a parameter of ``shape`` (right-aligned, like broadcasting)."""
    lead = a.ndim - len(shape)
    a = a.sum(tuple(range(lead)))
    return a.sum(tuple(i for i, s in enumerate(shape) if s == 1), keepdims=True).reshape(shape)


# ------------------------------------------------------------------ strategies


@st.composite
def channel_case(draw, layer):
    rank = draw(st.integers(3 if layer == "instance" else 2, 5))
    shape = [draw(st.integers(2, 4))] + [draw(st.integers(1, 4)) for _ in range(rank - 1)]
    axis = draw(st.integers(1, rank - 1))
    if layer == "group":
        shape[axis] = draw(st.sampled_from([2, 4, 6]))
        groups = draw(st.sampled_from([g for g in (1, 2, 3, 6) if shape[axis] % g == 0]))
    else:
        groups = None
    if layer == "instance":  # training needs more than one spatial element
        spatial = [i for i in range(1, rank) if i != axis]
        if np.prod([shape[i] for i in spatial]) < 2:
            shape[spatial[0]] = 2
    return dict(shape=tuple(shape), axis=axis if draw(st.booleans()) else axis - rank, groups=groups,
                affine=draw(st.booleans()), momentum=draw(st.sampled_from([0.1, 0.5, 1.0, 0.0, None])),
                eps=draw(st.sampled_from([1e-5, 1e-3, 0.1])), dtype=draw(st.sampled_from(["float32", "float64"])),
                seed=draw(st.integers(0, 2**16)))


@st.composite
def trailing_case(draw):
    rank = draw(st.integers(1, 4))
    shape = tuple(draw(st.integers(1, 5)) for _ in range(rank))
    k = draw(st.integers(1, rank))
    if np.prod(shape[rank - k :]) < 2:
        shape = shape[: rank - 1] + (2,)
    return dict(shape=shape, k=k, affine=draw(st.booleans()), bias=draw(st.booleans()),
                eps=draw(st.sampled_from([1e-5, 1e-3, None])), dtype=draw(st.sampled_from(["float32", "float64"])),
                seed=draw(st.integers(0, 2**16)))


def _arrays(case, pshape):
    rng = np.random.default_rng(case["seed"])
    x = rng.normal(size=case["shape"]) * rng.uniform(0.5, 3) + rng.normal()
    dy = rng.normal(size=case["shape"])
    w = 1 + 0.3 * rng.normal(size=pshape)
    b = 0.3 * rng.normal(size=pshape)
    # the reference sees exactly the values jaxnorm sees (rounded to the case's dtype), then computes in float64
    return tuple(a.astype(case["dtype"]).astype(np.float64) for a in (x, dy, w, b))


def _check(case, got, want, family=None, kappa=1.0):
    """The README's tolerance, scaled by the conditioning kappa = max|x| / std of the normalized groups."""
    t = {k: v * kappa for k, v in tol(case["dtype"], family).items()}
    np.testing.assert_allclose(np.asarray(got, np.float64), want, **t)


def _jax_value_and_grads(fn, params, x, dy):
    """jaxnorm forward + VJP in one jitted program: (y, aux, dparams, dx)."""

    def run(params, x, dy):
        y, vjp, aux = jax.vjp(fn, params, x, has_aux=True)
        dp, dx = vjp(dy.astype(y.dtype))
        return y, aux, dp, dx

    return jax.jit(run)(params, x, dy)


# ------------------------------------------------------------------ per-channel layers


def _channel_property(case, layer):
    dtype = jnp.dtype(case["dtype"])
    rank, ax = len(case["shape"]), case["axis"] % len(case["shape"])
    c = case["shape"][ax]
    bshape = tuple(c if i == ax else 1 for i in range(rank))
    x, dy, w, b = _arrays(case, (c,))
    wb, bb = (w.reshape(bshape), b.reshape(bshape)) if case["affine"] else (1.0, 0.0)

    if layer == "group":
        g = case["groups"]
        gshape = case["shape"][:ax] + (g, c // g) + case["shape"][ax + 1 :]
        red = tuple(i for i in range(1, rank + 1) if i != ax)
        xhat_y, _, _, _ = ref_normalize(x.reshape(gshape), red, case["eps"], 1.0, 0.0)
        xhat = xhat_y.reshape(case["shape"])
        y_ref = xhat * wb + bb
        g_ = (dy * wb).reshape(gshape)
        _, _, _, back = ref_normalize(x.reshape(gshape), red, case["eps"], 1.0, 0.0)
        dx_ref = back(g_)[0].reshape(case["shape"])
        kappa = back.kappa
        dw_ref = (dy * xhat).sum(tuple(i for i in range(rank) if i != ax))
        stats_ref = None
        params = jaxnorm.group_norm_init(g, c, affine=case["affine"], dtype=dtype)
        fn = lambda p, x: (jaxnorm.group_norm(p, x, num_groups=g, axis=case["axis"], eps=case["eps"]), {})
        stats0 = {}
    else:
        red = tuple(i for i in range(rank) if i != ax) if layer == "batch" else tuple(
            i for i in range(1, rank) if i != ax)
        y_ref, mean, var, back = ref_normalize(x, red, case["eps"], wb, bb)
        dx_ref, dwfull = back(dy)
        kappa = back.kappa
        dw_ref = dwfull.sum(tuple(i for i in range(rank) if i != ax))
        n = np.prod([case["shape"][i] for i in red])
        m = case["momentum"]
        init = jaxnorm.batch_norm_init if layer == "batch" else jaxnorm.instance_norm_init
        params, stats0 = init(c, affine=case["affine"], track_running_stats=True, dtype=dtype)
        batch_mean = mean.mean(tuple(i for i in range(rank) if i != ax)) if layer == "instance" else mean.reshape(c)
        batch_var = (var * n / (n - 1)).mean(tuple(i for i in range(rank) if i != ax))
        if layer == "instance" and m is None:  # PyTorch: InstanceNorm passes momentum 0.0 for None
            stats_ref = {"mean": np.zeros(c), "var": np.ones(c), "count": 0}
        else:
            f = 1.0 if m is None else m  # cumulative average after one batch = the batch itself
            stats_ref = {"mean": f * batch_mean, "var": (1 - f) + f * batch_var,
                         "count": 1 if layer == "batch" else 0}
        fn_ = jaxnorm.batch_norm if layer == "batch" else jaxnorm.instance_norm
        fn = lambda p, x: fn_(p, stats0, x, training=True, axis=case["axis"], momentum=m, eps=case["eps"])

    if case["affine"]:
        params = {"scale": jnp.asarray(w, dtype), "bias": jnp.asarray(b, dtype)}
    y, stats, dp, dx = _jax_value_and_grads(fn, params, jnp.asarray(x, dtype), jnp.asarray(dy, dtype))
    _check(case, y, y_ref, kappa=kappa)
    _check(case, dx, dx_ref, "grad", kappa=kappa)
    if case["affine"]:
        _check(case, dp["scale"], dw_ref, "grad", kappa=kappa)
        _check(case, dp["bias"], dy.sum(tuple(i for i in range(rank) if i != ax)), "grad")
    if stats_ref is not None:
        _check(case, stats["mean"], stats_ref["mean"])
        _check(case, stats["var"], stats_ref["var"])
        assert int(stats["count"]) == stats_ref["count"]


@given(channel_case("batch"))
def test_batch_norm_matches_float64_reference(case):
    _channel_property(case, "batch")


@given(channel_case("instance"))
def test_instance_norm_matches_float64_reference(case):
    _channel_property(case, "instance")


@given(channel_case("group"))
def test_group_norm_matches_float64_reference(case):
    _channel_property(case, "group")


# ------------------------------------------------------------------ trailing-dims layers


def _trailing_property(case, rms):
    dtype = jnp.dtype(case["dtype"])
    shape, k = case["shape"], case["k"]
    pshape = shape[len(shape) - k :]
    x, dy, w, b = _arrays(case, pshape)
    red = tuple(range(len(shape) - k, len(shape)))
    use_bias = case["bias"] and not rms
    wb = w if case["affine"] else 1.0
    bb = b if (case["affine"] and use_bias) else 0.0
    eps = case["eps"]
    ref_eps = float(np.finfo(case["dtype"]).eps) if (rms and eps is None) else (eps or 1e-5)
    y_ref, _, _, back = ref_normalize(x, red, ref_eps, wb, bb, center=not rms)
    dx_ref, dwfull = back(dy)
    kappa = back.kappa
    if rms:
        params = jaxnorm.rms_norm_init(pshape, elementwise_affine=case["affine"], dtype=dtype)
        fn = lambda p, x: (jaxnorm.rms_norm(p, x, normalized_shape=pshape, eps=eps), {})
    else:
        params = jaxnorm.layer_norm_init(pshape, elementwise_affine=case["affine"], bias=use_bias, dtype=dtype)
        fn = lambda p, x: (jaxnorm.layer_norm(p, x, normalized_shape=pshape, eps=ref_eps), {})
    if case["affine"]:
        params = {**{"scale": jnp.asarray(w, dtype)}, **({"bias": jnp.asarray(b, dtype)} if use_bias else {})}
    y, _, dp, dx = _jax_value_and_grads(fn, params, jnp.asarray(x, dtype), jnp.asarray(dy, dtype))
    _check(case, y, y_ref, kappa=kappa)
    _check(case, dx, dx_ref, "grad", kappa=kappa)
    if case["affine"]:
        _check(case, dp["scale"], reduce_to(dwfull, pshape), "grad", kappa=kappa)
        if use_bias:
            _check(case, dp["bias"], reduce_to(dy, pshape), "grad")


@given(trailing_case())
def test_layer_norm_matches_float64_reference(case):
    _trailing_property(case, rms=False)


@given(trailing_case())
def test_rms_norm_matches_float64_reference(case):
    _trailing_property(case, rms=True)


@st.composite
def masked_case(draw):
    rank = draw(st.integers(1, 4))
    shape = tuple(draw(st.integers(1, 4)) for _ in range(rank))
    red = tuple(sorted(draw(st.sets(st.integers(0, rank - 1), min_size=1))))
    mshape = tuple(d if draw(st.booleans()) else 1 for d in shape)
    return dict(shape=shape, red=red, mshape=mshape, rms=draw(st.booleans()),
                eps=draw(st.sampled_from([1e-5, 1e-3, 0.1])), dtype=draw(st.sampled_from(["float32", "float64"])),
                seed=draw(st.integers(0, 2**16)))


@given(masked_case())
def test_masked_layer_and_rms_norm_over_any_axes_match_float64_reference(case):
    """Statistics over the True positions of ``mask`` only (each pooled set keeps at least one), any axes."""
    rng = np.random.default_rng(case["seed"])
    x = rng.normal(size=case["shape"]) * rng.uniform(0.5, 3) + rng.uniform(-3, 3)
    mask = rng.random(case["mshape"]) < 0.6
    mask[tuple(0 if a in case["red"] else slice(None) for a in range(len(case["shape"])))] = True
    red, w = case["red"], np.broadcast_to(mask, x.shape).astype(np.float64)
    n = w.sum(red, keepdims=True)
    mean = 0.0 if case["rms"] else (w * x).sum(red, keepdims=True) / n
    var = (w * (x - mean) ** 2).sum(red, keepdims=True) / n
    want = (x - mean) / np.sqrt(var + case["eps"])
    fn = jaxnorm.rms_norm if case["rms"] else jaxnorm.layer_norm
    got = fn({}, jnp.asarray(x, case["dtype"]), reduction_axes=red, mask=jnp.asarray(mask), eps=case["eps"])
    kappa = float(np.max(np.abs(x) / np.sqrt(var + case["eps"])))
    _check(case, got, want, kappa=max(1.0, kappa))
