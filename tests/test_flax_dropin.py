"""jaxnorm.linen / jaxnorm.nnx as drop-ins for flax.linen / flax.nnx: the same arguments give the same numbers.

Each configuration is drawn at random (shapes, axes, masks of x's rank or lower, groups, affine switches, epsilon,
momentum, real or complex dtype, which leading arguments are positional) from a fixed seed and run through Flax's
own layer (``use_fast_variance=False``) and ours with identical variables: outputs, updated ``batch_stats`` and the
gradients with respect to x and every parameter must agree.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxnorm
from jaxnorm import linen as jl
from jaxnorm import nnx as jn

N_CONFIGS = 6
TOL = dict(rtol=2e-5, atol=2e-5)  # float32: Flax's two-pass variance vs ours, and the gradient formulas


def _axes_subset(rng, ndim, *, lo=0, k=None):
    axes = list(range(lo, ndim))
    k = k or int(rng.integers(1, len(axes) + 1))
    picked = sorted(rng.choice(axes, size=k, replace=False).tolist())
    # Flax accepts negative axes: use them half of the time
    return tuple(a - ndim if rng.random() < 0.5 else a for a in picked)


def _mask(rng, shape, constant_on=(), ensure_on=(), lower=False):
    """A random bool mask broadcastable to ``shape``; size 1 on ``constant_on``; at least one True in every set of
    positions the statistics pool (index 0 along ``ensure_on`` is always True). ``lower``: of lower rank, lined up
    with x's trailing axes as NumPy broadcasts (its leading axes then size 1 and dropped)."""
    lead = int(rng.integers(1, len(shape))) if lower else 0
    mshape = tuple(1 if (i < lead or i in constant_on or rng.random() < 0.25) else d for i, d in enumerate(shape))
    m = rng.random(mshape) < 0.7
    m[tuple(0 if i in ensure_on else slice(None) for i in range(len(shape)))] = True
    return jnp.asarray(m.reshape(mshape[lead:]))


def _config(layer, seed):
    rng = np.random.default_rng(seed)
    ndim = int(rng.integers(2 if layer in ("BatchNorm", "LayerNorm", "RMSNorm") else 3, 5))
    shape = [int(d) for d in rng.integers(2, 5, size=ndim)]
    kw = {"epsilon": float(rng.choice([1e-6, 1e-5, 1e-3, 0.1]))}
    call = {}
    if layer != "RMSNorm":
        kw["use_bias"] = bool(rng.random() < 0.7)
    kw["use_scale"] = bool(rng.random() < 0.7)
    if layer == "BatchNorm":
        axis = _axes_subset(rng, ndim, k=1)[0] if ndim < 3 or rng.random() < 0.7 else _axes_subset(rng, ndim, k=2)
        kw["axis"] = axis
        kw["momentum"] = float(rng.choice([0.0, 0.5, 0.9, 0.99]))
        feats = {a % ndim for a in ((axis,) if isinstance(axis, int) else axis)}
        if rng.random() < 0.5 or seed % 2:
            call["mask"] = _mask(rng, shape, constant_on=feats,
                                 ensure_on=[i for i in range(ndim) if i not in feats], lower=seed % 2 == 1)
    elif layer in ("LayerNorm", "RMSNorm"):
        kw["reduction_axes"] = _axes_subset(rng, ndim)
        kw["feature_axes"] = _axes_subset(rng, ndim)
        if rng.random() < 0.5 or seed % 2:
            red = {a % ndim for a in kw["reduction_axes"]}
            call["mask"] = _mask(rng, shape, ensure_on=red, lower=seed % 2 == 1)
    elif layer == "GroupNorm":
        size, groups = int(rng.integers(1, 4)), int(rng.integers(1, 4))
        shape[-1] = size * groups
        if rng.random() < 0.5:
            kw["num_groups"] = groups
        else:
            kw["num_groups"], kw["group_size"] = None, size
        if rng.random() < 0.5:  # Flax's reduction_axes: must include the last (feature) axis
            kw["reduction_axes"] = tuple(sorted(set(_axes_subset(rng, ndim - 1, lo=1)) | {ndim - 1}))
        if rng.random() < 0.5 or seed % 2:
            red = set(range(1, ndim)) if "reduction_axes" not in kw else set(kw["reduction_axes"])
            m = np.array(_mask(rng, shape, ensure_on=red, lower=seed % 2 == 1))
            m = np.broadcast_to(m, m.shape[:-1] + (shape[-1],)).copy()  # Flax: the full channel axis
            # one valid position in every (example, group): index 0 on the other reduced axes, a group's first channel
            m[tuple(slice(None, None, size) if a == ndim - 1 else 0 if a in red else slice(None)
                    for a in range(ndim - m.ndim, ndim))] = True
            call["mask"] = jnp.asarray(m)
    elif layer == "InstanceNorm":
        feats = _axes_subset(rng, ndim, lo=1, k=1 if rng.random() < 0.7 else 2)
        if len(feats) == ndim - 1:
            feats = feats[:1]
        kw["feature_axes"] = feats
        if rng.random() < 0.5 or seed % 2:
            fset = {a % ndim for a in feats}
            call["mask"] = _mask(rng, shape, constant_on=fset | {0} if rng.random() < 0.5 else fset,
                                 ensure_on=[i for i in range(1, ndim) if i not in fset], lower=seed % 2 == 1)
    x = rng.normal(size=shape) * rng.uniform(0.5, 3) + rng.uniform(-2, 2)
    if seed % 3 == 1:  # complex: Flax's complex mean and real variance E|x - mean|^2
        x = x + 1j * (rng.normal(size=shape) * rng.uniform(0.5, 3) + rng.uniform(-2, 2))
    return kw, call, jnp.asarray(x, jnp.complex64 if np.iscomplexobj(x) else jnp.float32)


def _cotangent(x, seed):
    rng = np.random.default_rng(seed + 100)
    dy = rng.normal(size=x.shape) + (1j * rng.normal(size=x.shape) if jnp.iscomplexobj(x) else 0)
    return jnp.asarray(dy, x.dtype)


def _positional(cls, kw, seed, stop=None):
    """``(args, kw)``: a random prefix of ``cls``'s constructor fields (Flax's positional order) moved out of
    ``kw`` into positional ``args``, fields not in ``kw`` at Flax's default; never past ``stop``."""
    names = [f.name for f in dataclasses.fields(cls) if f.init and f.name not in ("parent", "name")]
    names = names[:names.index(stop)] if stop else names
    given = [i for i, n in enumerate(names) if n in kw]
    k = int(np.random.default_rng(seed + 7).integers(0, (given[-1] + 2) if given else 2))
    fields = {f.name: f for f in dataclasses.fields(cls)}
    args = [kw.pop(n) if n in kw else fields[n].default for n in names[:k]]
    return args, kw


def _ours_kw(layer, kw):
    """The same keywords for jaxnorm, except the one that must be explicit there: momentum."""
    ours = dict(kw)
    if layer == "BatchNorm":
        ours["flax_momentum"] = ours.pop("momentum")
    return ours


def _random_like(tree, seed):
    leaves, treedef = jax.tree.flatten(tree)
    rng = np.random.default_rng(seed)
    return jax.tree.unflatten(treedef, [jnp.asarray(rng.normal(size=v.shape) + 1, v.dtype) for v in leaves])


LAYERS = ["BatchNorm", "LayerNorm", "RMSNorm", "GroupNorm", "InstanceNorm"]
CASES = [(layer, seed) for layer in LAYERS for seed in range(N_CONFIGS)]


@pytest.mark.parametrize("layer,seed", CASES, ids=[f"{lay}-{s}" for lay, s in CASES])
def test_linen_matches_flax_linen_keyword_for_keyword(layer, seed):
    kw, call, x = _config(layer, seed)
    train = layer == "BatchNorm"
    args, kw = _positional(getattr(nn, layer), dict(kw), seed, stop="momentum" if train else None)
    flax_mod = getattr(nn, layer)(*args, use_fast_variance=False, **kw)
    ours = getattr(jl, layer)(*args, **_ours_kw(layer, kw))
    extra = {"use_running_average": False} if train else {}
    fv = jax.jit(functools.partial(flax_mod.init, **extra, **call))(jax.random.key(0), x)
    ov = jax.jit(functools.partial(ours.init, **extra, **call))(jax.random.key(0), x)
    # the same variable names and shapes as Flax (momentum given Flax's way: no `count`)
    assert jax.tree.map(jnp.shape, ov) == jax.tree.map(jnp.shape, fv), (ov, fv)
    params = _random_like(fv["params"], seed) if "params" in fv else {}
    variables = {**fv, "params": params} if params else fv
    dy = _cotangent(x, seed)

    def loss(module, p, x):
        v = {**variables, "params": p} if p else variables
        if train:  # use_running_average positional, as Flax's __call__ takes it
            y, upd = module.apply(v, x, False, mutable=["batch_stats"], **call)
        else:
            y, upd = module.apply(v, x, **call), {}
        return jnp.sum(jnp.real(y * dy)), (y, upd)

    grads = lambda module: jax.jit(jax.value_and_grad(lambda p, x: loss(module, p, x), (0, 1), has_aux=True))
    (_, (fy, fupd)), fg = grads(flax_mod)(params, x)
    (_, (oy, oupd)), og = grads(ours)(params, x)
    np.testing.assert_allclose(oy, fy, **TOL)
    chex.assert_trees_all_equal_dtypes(oy, fy)
    chex.assert_trees_all_close(og, fg, **TOL)
    chex.assert_trees_all_close(oupd, fupd, **TOL)
    if train:  # and evaluation with the updated statistics
        ev = {**variables, **fupd}
        evaluate = lambda module: jax.jit(functools.partial(module.apply, use_running_average=True))(ev, x)
        np.testing.assert_allclose(evaluate(ours), evaluate(flax_mod), **TOL)


def _nnx_pair(layer, kw, x, seed=0):
    kw = dict(kw)
    rngs = dict(rngs=nnx.Rngs(0))
    if layer in ("LayerNorm", "RMSNorm"):  # NNX params are (num_features,): one feature axis
        kw["feature_axes"] = kw["feature_axes"][:1]
        c = x.shape[kw["feature_axes"][0]]
    elif layer == "BatchNorm":
        kw["axis"] = kw["axis"] if isinstance(kw["axis"], int) else kw["axis"][0]
        c = x.shape[kw["axis"]]
    elif layer == "InstanceNorm":
        kw["feature_axes"] = kw["feature_axes"][:1]
        c = x.shape[kw["feature_axes"][0]]
    else:
        c = x.shape[-1]
        # flax.nnx.GroupNorm (0.12) repeats the group statistics along axis 1 instead of the channel axis, which
        # is wrong when reduction_axes leave out a non-batch axis; that case is compared with flax.linen below
        kw.pop("reduction_axes", None)
    args = [c]
    if layer == "GroupNorm" and seed % 2:  # NNX's positional GroupNorm(num_features, num_groups, group_size)
        args += [kw.pop("num_groups", 32), kw.pop("group_size", None)]
    flax_mod = getattr(nnx, layer)(*args, use_fast_variance=False, **kw, **rngs)
    ours = getattr(jn, layer)(*args, **_ours_kw(layer, kw), **rngs)
    return flax_mod, ours


@pytest.mark.parametrize("layer,seed", CASES, ids=[f"{lay}-{s}" for lay, s in CASES])
def test_nnx_matches_flax_nnx_keyword_for_keyword(layer, seed):
    kw, call, x = _config(layer, seed)
    if layer == "BatchNorm":  # flax.nnx.BatchNorm 0.12 writes a complex mean into its float32 one with x[...] = v,
        x = x.real  # which JAX refuses; linen's complex BatchNorm is compared above, and ours in test_complex.py
    flax_mod, ours = _nnx_pair(layer, kw, x, seed)
    fstate, ostate = nnx.state(flax_mod, nnx.Param), nnx.state(ours, nnx.Param)
    assert jax.tree.map(jnp.shape, nnx.to_pure_dict(ostate)) == jax.tree.map(jnp.shape, nnx.to_pure_dict(fstate))
    new = _random_like(nnx.to_pure_dict(fstate), seed)
    for m in (flax_mod, ours):
        nnx.replace_by_pure_dict(st := nnx.state(m, nnx.Param), new)
        nnx.update(m, st)
    if layer == "BatchNorm":
        fb, ob = (nnx.to_pure_dict(nnx.state(m, nnx.BatchStat)) for m in (flax_mod, ours))
        assert jax.tree.map(jnp.shape, ob) == jax.tree.map(jnp.shape, fb)  # no `count` with Flax's momentum
    dy = _cotangent(x, seed)

    def loss(m, x):
        y = m(x, **call)
        return jnp.sum(jnp.real(y * dy)), y

    grads = nnx.jit(nnx.value_and_grad(loss, argnums=(0, 1), has_aux=True))
    (_, fy), (fg, fgx) = grads(flax_mod, x)
    (_, oy), (og, ogx) = grads(ours, x)
    np.testing.assert_allclose(oy, fy, **TOL)
    np.testing.assert_allclose(ogx, fgx, **TOL)
    fgp, ogp = (nnx.to_pure_dict(nnx.state(g, nnx.Param)) for g in (fg, og))
    chex.assert_trees_all_close(ogp, fgp, **TOL)
    if layer == "BatchNorm":
        fb, ob = (nnx.to_pure_dict(nnx.state(m, nnx.BatchStat)) for m in (flax_mod, ours))
        chex.assert_trees_all_close(ob, fb, **TOL)
        flax_mod.eval(), ours.eval()
        evaluate = nnx.jit(lambda m, x: m(x))
        np.testing.assert_allclose(evaluate(ours, x), evaluate(flax_mod, x), **TOL)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64, jnp.bfloat16])
@pytest.mark.parametrize("x_dtype", [jnp.bfloat16, jnp.float32])
def test_dtype_keyword_gives_flaxs_output_dtype_and_numbers(dtype, x_dtype):
    x = jnp.asarray(np.random.default_rng(1).normal(size=(3, 5, 8)) * 2 + 1, x_dtype)
    for layer, kw in (("LayerNorm", {}), ("RMSNorm", {}), ("GroupNorm", {"num_groups": 4})):
        f, o = getattr(nn, layer)(dtype=dtype, use_fast_variance=False, **kw), getattr(jl, layer)(dtype=dtype, **kw)
        v = f.init(jax.random.key(0), x)
        fy, oy = f.apply(v, x), o.apply(v, x)
        chex.assert_type([oy, fy], dtype)
        tol = 1e-2 if jnp.dtype(dtype) == jnp.bfloat16 else 1e-5
        np.testing.assert_allclose(np.asarray(oy, np.float64), np.asarray(fy, np.float64), rtol=tol, atol=tol)


def test_default_output_dtype_is_the_inputs_where_flax_promotes_with_the_params():
    x = jnp.ones((2, 8), jnp.bfloat16).at[:, 0].set(3)
    v = nn.LayerNorm().init(jax.random.key(0), x)
    assert nn.LayerNorm().apply(v, x).dtype == jnp.float32  # Flax: result_type(x, f32 params)
    assert jl.LayerNorm().apply(v, x).dtype == jnp.bfloat16  # jaxnorm: x's dtype, as PyTorch


@pytest.mark.parametrize("make,match", [
    (lambda: jl.GroupNorm(num_groups=4, group_size=2), r"both `num_groups`=4 and `group_size`=2"),
    (lambda: jl.LayerNorm(normalized_shape=8, reduction_axes=-1), r"both `normalized_shape`=8.*`reduction_axes`"),
    (lambda: jl.LayerNorm(elementwise_affine=False, use_scale=True), r"both `elementwise_affine`=False.*`use_scale`"),
    (lambda: jl.BatchNorm(affine=True, use_scale=False), r"both `affine`=True.*`use_scale`=False"),
    (lambda: jl.InstanceNorm(affine=True, use_bias=True), r"both `affine`=True.*`use_bias`=True"),
    (lambda: jl.InstanceNorm(axis=1, feature_axes=2), r"both `axis`=1 and `feature_axes`=2"),
])
def test_conflicting_linen_keywords_name_both(make, match):
    module = make()
    call = {"use_running_average": False} if isinstance(module, (jl.BatchNorm, jl.InstanceNorm)) else {}
    with pytest.raises(ValueError, match=match):
        module.init(jax.random.key(0), jnp.ones((2, 4, 8)), **call)


@pytest.mark.parametrize("make,match", [
    (lambda: jn.GroupNorm(8, num_groups=4, group_size=2), r"both `num_groups`=4 and `group_size`=2"),
    (lambda: jn.GroupNorm(8, num_channels=8), r"both `num_features`=8.*`num_channels`=8"),
    (lambda: jn.LayerNorm(8, normalized_shape=8), r"both `num_features`=8.*`normalized_shape`=8"),
    (lambda: jn.LayerNorm((4, 8), reduction_axes=-1), r"both `normalized_shape`=\(4, 8\).*`reduction_axes`"),
    (lambda: jn.BatchNorm(8, affine=False, use_bias=True), r"both `affine`=False.*`use_bias`=True"),
    (lambda: jn.RMSNorm(8, elementwise_affine=True, use_scale=False), r"both `elementwise_affine`=True"),
])
def test_conflicting_nnx_keywords_name_both(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_pytorch_defaults_kept_where_flax_differs():
    x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 5, 6)), jnp.float32)
    # InstanceNorm: PyTorch has no affine by default, Flax has both; Flax's keyword turns on Flax's pair
    assert jl.InstanceNorm().init(jax.random.key(0), x) == {}
    assert set(jl.InstanceNorm(use_scale=True).init(jax.random.key(0), x)["params"]) == {"scale", "bias"}
    assert set(jl.InstanceNorm(use_scale=True, use_bias=False).init(jax.random.key(0), x)["params"]) == {"scale"}
    # epsilon: PyTorch's 1e-5 (Flax's LayerNorm: 1e-6)
    assert jl.LayerNorm().epsilon == 1e-5 and nn.LayerNorm().epsilon == 1e-6
    # GroupNorm: 32 groups unless group_size is given, as Flax
    assert jl.GroupNorm(group_size=3, use_scale=False, use_bias=False).apply({}, x).shape == x.shape
    with pytest.raises(ValueError, match="`num_groups`=32 must divide the number of channels 6"):
        jl.GroupNorm().init(jax.random.key(0), x)


def test_layer_norm_over_channels_first_is_timms_layernorm2d():
    """LayerNorm over C of an NCHW tensor (ConvNeXt's LayerNorm2d): the same as channels-last LayerNorm."""
    x = jnp.asarray(np.random.default_rng(3).normal(size=(2, 6, 3, 4)) + 2, jnp.float32)
    m = jl.LayerNorm(reduction_axes=1, feature_axes=1)
    v = m.init(jax.random.key(0), x)
    v = {"params": _random_like(v["params"], 3)}
    y = m.apply(v, x)
    ref = jl.LayerNorm().apply(v, jnp.moveaxis(x, 1, -1))
    np.testing.assert_allclose(y, jnp.moveaxis(ref, -1, 1), rtol=1e-6, atol=1e-6)


def test_nnx_group_norm_with_partial_reduction_axes_matches_flax_linen():
    """Statistics over (H, C-group) only, per (N, W): flax.linen's answer (flax.nnx.GroupNorm 0.12 puts them on
    the wrong axis here)."""
    x = jnp.asarray(np.random.default_rng(4).normal(size=(2, 3, 4, 6)) + 1, jnp.float32)
    mask = jnp.asarray(np.random.default_rng(5).random((2, 3, 4, 6)) < 0.7).at[:, 0].set(True)
    ref_mod = nn.GroupNorm(num_groups=3, reduction_axes=(1, 3), epsilon=1e-5, use_fast_variance=False)
    ref = ref_mod.apply(ref_mod.init(jax.random.key(0), x), x, mask=mask)
    ours = jn.GroupNorm(6, num_groups=3, reduction_axes=(1, 3))(x, mask=mask)
    np.testing.assert_allclose(ours, ref, **TOL)


def test_local_response_norm_wrappers_match_the_functional_core_and_pytorchs_layout():
    x = jnp.asarray(np.random.default_rng(6).normal(size=(2, 3, 4, 6)), jnp.float32)  # NHWC
    ref = jnp.moveaxis(jaxnorm.local_response_norm(jnp.moveaxis(x, -1, 1), size=3, alpha=0.2, k=2.0), 1, -1)
    assert jl.LocalResponseNorm(3, alpha=0.2, k=2.0).init(jax.random.key(0), x) == {}
    np.testing.assert_allclose(jl.LocalResponseNorm(3, alpha=0.2, k=2.0).apply({}, x), ref, rtol=1e-6)
    np.testing.assert_allclose(jn.LocalResponseNorm(3, alpha=0.2, k=2.0)(x), ref, rtol=1e-6)
    # forward and reverse mode through it
    f = lambda x: jnp.sum(jaxnorm.local_response_norm(x, size=3, alpha=0.2, axis=-1) ** 2)
    t = jnp.ones_like(x)
    np.testing.assert_allclose(jax.jvp(f, (x,), (t,))[1], jnp.sum(jax.grad(f)(x) * t), rtol=1e-5)


@pytest.mark.parametrize("kwargs,match", [
    (dict(size=0), r"`size` \(channels in the window\) must be a positive int, got 0"),
    (dict(size=3, k=0.0), r"`k` must be a float > 0, got 0.0"),
    (dict(size=3, beta=-1.0), r"`beta` must be a float >= 0, got -1.0"),
    (dict(size=3, axis=4), r"`axis`=4 is out of range"),
])
def test_local_response_norm_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        jaxnorm.local_response_norm(jnp.ones((2, 3, 4)), **kwargs)


@pytest.mark.parametrize("call,exc,match", [
    (lambda x: jaxnorm.layer_norm({}, x, normalized_shape=8, reduction_axes=-1), ValueError,
     r"both `normalized_shape`=8 .*and `reduction_axes`=-1"),
    (lambda x: jaxnorm.rms_norm({}, x), TypeError, r"give `normalized_shape`.*or `reduction_axes`"),
    (lambda x: jaxnorm.layer_norm({}, x, normalized_shape=8, feature_axes=1), ValueError,
     r"`feature_axes`=1 goes with `reduction_axes`"),
    (lambda x: jaxnorm.layer_norm({}, x, reduction_axes=(1, 5)), ValueError, r"`reduction_axes`=5 is out of range"),
    (lambda x: jaxnorm.layer_norm(jaxnorm.layer_norm_init(8), x, reduction_axes=1), ValueError,
     r"`params\['(bias|scale)'\]` has shape \(8,\) but the input needs \(4,\)"),
    (lambda x: jaxnorm.group_norm({}, x, num_groups=4, group_size=2, axis=-1), ValueError,
     r"both `num_groups`=4 and `group_size`=2"),
    (lambda x: jaxnorm.group_norm({}, x, group_size=3, axis=-1), ValueError,
     r"`group_size`=3 must be a positive int that divides the number of channels 8; valid choices are \[1, 2, 4, 8\]"),
    (lambda x: jaxnorm.rms_norm({}, x, normalized_shape=8, mask=jnp.ones((2, 4, 8))), TypeError,
     r"`mask` must be a boolean array"),
    (lambda x: jaxnorm.instance_norm({}, {}, x, training=True, axis=-1, mask=jnp.ones((3, 8), bool)), ValueError,
     r"`mask` has shape \(3, 8\), which does not broadcast to x's shape \(2, 4, 8\): it lines up with x's trailing"),
])
def test_functional_keyword_errors(call, exc, match):
    with pytest.raises(exc, match=match):
        call(jnp.ones((2, 4, 8)))


@pytest.mark.parametrize("force", [True, False])
def test_variable_dtypes_follow_flax_for_param_dtype_and_force_float32_reductions(force):
    x = jnp.asarray(np.random.default_rng(8).normal(size=(4, 6)), jnp.bfloat16)
    kw = dict(param_dtype=jnp.bfloat16, force_float32_reductions=force)
    fv = nn.BatchNorm(momentum=0.9, use_running_average=False, **kw).init(jax.random.key(0), x)
    ov = jl.BatchNorm(flax_momentum=0.9, use_running_average=False, **kw).init(jax.random.key(0), x)
    assert jax.tree.map(lambda v: v.dtype, ov) == jax.tree.map(lambda v: v.dtype, fv)
    fy, fu = nn.BatchNorm(momentum=0.9, use_running_average=False, use_fast_variance=False, **kw).apply(
        fv, x, mutable=["batch_stats"])
    oy, ou = jl.BatchNorm(flax_momentum=0.9, use_running_average=False, **kw).apply(ov, x, mutable=["batch_stats"])
    assert jax.tree.map(lambda v: v.dtype, ou) == jax.tree.map(lambda v: v.dtype, fu)
    chex.assert_trees_all_close(*jax.tree.map(lambda v: v.astype(jnp.float32), (ou, fu)), rtol=2e-2, atol=2e-2)


FLAX_CLASSES = ["BatchNorm", "LayerNorm", "RMSNorm", "GroupNorm", "InstanceNorm", "SpectralNorm", "WeightNorm"]


def _positional_names(fn, skip=1):
    params = list(inspect.signature(fn).parameters.values())[skip:]
    return [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


@pytest.mark.parametrize("name", FLAX_CLASSES)
def test_constructors_and_calls_take_flaxs_positional_order(name):
    """Linen modules are dataclasses: their field order is the positional order. Ours starts with Flax's fields
    in Flax's order (jaxnorm's own keywords follow), and NNX's constructors and both calls take what Flax's take."""
    fields = lambda cls: [f.name for f in dataclasses.fields(cls) if f.init and f.name not in ("parent", "name")]
    theirs, ours = fields(getattr(nn, name)), fields(getattr(jl, name))
    assert ours[:len(theirs)] == theirs, (ours, theirs)
    for flax_cls, our_cls in ((getattr(nn, name), getattr(jl, name)), (getattr(nnx, name), getattr(jn, name))):
        theirs = _positional_names(flax_cls.__call__)  # ours may take more after them (InstanceNorm's training)
        assert _positional_names(our_cls.__call__)[:len(theirs)] == theirs
    assert _positional_names(jn.__dict__[name].__init__) == _positional_names(getattr(nnx, name).__init__)


def test_positional_arguments_mean_what_they_mean_in_flax():
    x = jnp.asarray(np.random.default_rng(9).normal(size=(4, 3, 6)) + 1, jnp.float32)
    v = jl.BatchNorm(use_running_average=False).init(jax.random.key(0), x)
    v = {**v, "batch_stats": {**v["batch_stats"], "mean": jnp.full(6, 5.0)}}
    np.testing.assert_allclose(jl.BatchNorm(True).apply(v, x), jl.BatchNorm(use_running_average=True).apply(v, x))
    assert not np.allclose(jl.BatchNorm(True).apply(v, x), jl.BatchNorm(False).apply(v, x, mutable=True)[0])
    no_affine = {"use_scale": False, "use_bias": False}
    np.testing.assert_allclose(jl.GroupNorm(2, **no_affine).apply({}, x),
                               jl.GroupNorm(num_groups=2, **no_affine).apply({}, x))
    np.testing.assert_allclose(jl.LayerNorm(0.5, **no_affine).apply({}, x),
                               jl.LayerNorm(epsilon=0.5, **no_affine).apply({}, x))
    mask = jnp.arange(6) < 4
    np.testing.assert_allclose(jn.RMSNorm(6)(x, mask), jn.RMSNorm(6)(x, mask=mask))
    np.testing.assert_allclose(jn.GroupNorm(6, 3)(x), jn.GroupNorm(6, num_groups=3)(x))
    np.testing.assert_allclose(jn.GroupNorm(6, None, 3)(x), jn.GroupNorm(6, group_size=3)(x))
    # Flax's third BatchNorm field is momentum, whose convention must be said
    with pytest.raises(TypeError, match=r"`momentum`=0.9 is ambiguous.*`flax_momentum`=0.9"):
        jl.BatchNorm(False, -1, 0.9).init(jax.random.key(0), x)
    with pytest.raises(TypeError, match=r"`momentum`=0.9 is ambiguous"):
        jn.BatchNorm(6, momentum=0.9)
    # LocalResponseNorm (no Flax class): PyTorch's order, size, alpha, beta, k
    np.testing.assert_allclose(jl.LocalResponseNorm(3, 0.2, 0.5, 2.0).apply({}, x),
                               jl.LocalResponseNorm(size=3, alpha=0.2, beta=0.5, k=2.0).apply({}, x))
    np.testing.assert_allclose(jn.LocalResponseNorm(3, 0.2, 0.5, 2.0)(x),
                               jl.LocalResponseNorm(size=3, alpha=0.2, beta=0.5, k=2.0).apply({}, x))
