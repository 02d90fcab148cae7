"""Spectral and weight normalization: the SVD and norm formulas, PyTorch's parametrizations (fixtures), and
Flax's own SpectralNorm / WeightNorm wrappers (linen and NNX)."""

from __future__ import annotations

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
from tests.test_pytorch_fixtures import FIXTURE_DIR, load

SPECTRAL = sorted(FIXTURE_DIR.glob("spectral_norm__*.npz"))
WEIGHT = sorted(FIXTURE_DIR.glob("weight_norm__*.npz"))


def _tol(dtype):
    return dict(rtol=1e-12, atol=1e-12) if dtype == "float64" else dict(rtol=2e-5, atol=2e-5)


def _torch_layer(module, x, w, b):
    """torch.nn.Linear / Conv2d (stride 1, no padding) with weight w and bias b."""
    if module == "Linear":
        return x @ w.T + b[None]
    y = jax.lax.conv_general_dilated(x, w, (1, 1), "VALID", dimension_numbers=("NCHW", "OIHW", "NCHW"))
    return y + b.reshape(1, -1, 1, 1)


def test_sigma_converges_to_the_largest_singular_value():
    w = jnp.asarray(np.random.default_rng(0).normal(size=(4, 3, 6)))
    top = np.linalg.svd(np.asarray(w).reshape(-1, 6), compute_uv=False)[0]
    w_bar, u, sigma = jaxnorm.spectral_norm(w, jnp.ones((6,)), n_steps=200)
    np.testing.assert_allclose(sigma, top, rtol=1e-10)
    np.testing.assert_allclose(np.linalg.svd(np.asarray(w_bar).reshape(-1, 6), compute_uv=False)[0], 1.0, rtol=1e-10)
    # a PyTorch-layout weight (out first): the same matrix's transpose, the same sigma
    _, _, sigma_t = jaxnorm.spectral_norm(jnp.moveaxis(w, -1, 0), jnp.ones((6,)), n_steps=200, axis=0)
    np.testing.assert_allclose(sigma_t, top, rtol=1e-10)


def test_spectral_norm_products_are_float32_on_every_backend():
    """Every product of the power iteration and of sigma asks for full float32 precision, so an NVIDIA GPU (TF32 by
    default) or a TPU (bfloat16 passes) gives the CPU's sigma; checked in the CUDA lowering, also under a lower
    global default."""
    w, u = jnp.ones((5, 4), jnp.float32), jnp.ones((4,), jnp.float32)
    f = lambda w, u: jaxnorm.spectral_norm(w, u, n_steps=2, torch_order=True)
    with jax.default_matmul_precision("tensorfloat32"):
        text = jax.jit(f).trace(w, u).lower(lowering_platforms=("cuda",)).as_text()
    dots = [line for line in text.splitlines() if "dot_general" in line]
    assert len(dots) == 7, dots  # 2 steps x 2 products, torch_order's last v, and sigma's two
    assert all("precision = [HIGHEST, HIGHEST]" in line for line in dots), dots


def test_weight_norm_is_the_normalized_direction_times_scale():
    v = jnp.asarray(np.random.default_rng(1).normal(size=(3, 2, 5)))
    g = jnp.asarray(np.random.default_rng(2).normal(size=(5,)))
    ref = np.asarray(v) / np.linalg.norm(np.asarray(v).reshape(-1, 5), axis=0) * np.asarray(g)
    np.testing.assert_allclose(jaxnorm.weight_norm(v, g, eps=1e-300), ref, rtol=1e-12)
    np.testing.assert_allclose(jaxnorm.weight_norm(v, None, feature_axes=None, eps=1e-300),
                               np.asarray(v) / np.linalg.norm(np.asarray(v)), rtol=1e-12)
    # eps inside the root, as Flax's WeightNorm: v * rsqrt(sum(v**2) + eps), here of the order of sum(v**2)
    vd = np.asarray(v)
    want = vd / np.sqrt((vd.reshape(-1, 5) ** 2).sum(0) + 0.5) * np.asarray(g)
    np.testing.assert_allclose(jaxnorm.weight_norm(v, g, eps=0.5), want, rtol=1e-12)


@pytest.mark.parametrize("path", SPECTRAL, ids=lambda p: p.stem)
def test_spectral_norm_matches_pytorch(path):
    cfg, a = load(path)
    module, steps = cfg["options"]["module"], cfg["options"]["n_power_iterations"]
    w, b = jnp.asarray(a["weight"]), jnp.asarray(a["bias"])

    def forward(w, u, x):
        w_bar, u, sigma = jaxnorm.spectral_norm(w, u, n_steps=steps, axis=0, torch_order=True)  # out first
        return _torch_layer(module, x, w_bar, b), u

    u = jnp.asarray(a["u0"])
    forward = jax.jit(forward)
    for step in range(3):
        y, u = forward(w, u, jnp.asarray(a["x"][step]))
        np.testing.assert_allclose(y, a["y"][step], **_tol(cfg["dtype"]), err_msg=f"y step {step}")
        np.testing.assert_allclose(u, a["u"][step], **_tol(cfg["dtype"]), err_msg=f"u step {step}")
    dy = jnp.asarray(a["dy"])
    dw, dx = jax.jit(jax.grad(lambda w, x: jnp.sum(forward(w, jnp.asarray(a["u0"]), x)[0] * dy), (0, 1)))(
        w, jnp.asarray(a["x"][0]))
    np.testing.assert_allclose(dw, a["dweight"], **_tol(cfg["dtype"]))
    np.testing.assert_allclose(dx, a["dx"], **_tol(cfg["dtype"]))


@pytest.mark.parametrize("path", WEIGHT, ids=lambda p: p.stem)
def test_weight_norm_matches_pytorch(path):
    cfg, a = load(path)
    module, dim = cfg["options"]["module"], cfg["options"]["dim"]
    b = jnp.asarray(a["bias"])
    eps = 1e-300 if cfg["dtype"] == "float64" else 1e-30  # PyTorch divides by the exact norm

    def forward(v, g, x):
        w = jaxnorm.weight_norm(v, g.reshape(-1) if dim == 0 else g.reshape(()), feature_axes=dim, eps=eps)
        return _torch_layer(module, x, w, b)

    v, g = jnp.asarray(a["weight"]), jnp.asarray(a["g"])
    forward = jax.jit(forward)
    for step in range(3):
        np.testing.assert_allclose(forward(v, g, jnp.asarray(a["x"][step])), a["y"][step], **_tol(cfg["dtype"]))
    dy = jnp.asarray(a["dy"])
    dv, dg, dx = jax.jit(jax.grad(lambda v, g, x: jnp.sum(forward(v, g, x) * dy), (0, 1, 2)))(
        v, g, jnp.asarray(a["x"][0]))
    np.testing.assert_allclose(dv, a["dweight"], **_tol(cfg["dtype"]))
    np.testing.assert_allclose(dg, a["dg"], **_tol(cfg["dtype"]))
    np.testing.assert_allclose(dx, a["dx"], **_tol(cfg["dtype"]))


def test_linen_spectral_norm_on_a_dense_layer_matches_pytorch():
    """A PyTorch Linear + spectral_norm ported to jaxnorm.linen.SpectralNorm(nn.Dense): kernel = weight.T,
    u = u0[None]; three training calls update u as PyTorch's do."""
    cfg, a = load(FIXTURE_DIR / "spectral_norm__6x5__module=Linear-n_power_iterations=3__float64.npz")
    model = jl.SpectralNorm(nn.Dense(4, param_dtype=jnp.float64), n_steps=3, torch_order=True)
    x = jnp.asarray(a["x"])
    v = model.init(jax.random.key(0), x[0], update_stats=True)
    assert jax.tree.map(jnp.shape, v["batch_stats"]) == {"layer_instance/kernel/u": (1, 4),
                                                         "layer_instance/kernel/sigma": ()}
    v = {"params": {"layer_instance": {"kernel": jnp.asarray(a["weight"].T), "bias": jnp.asarray(a["bias"])}},
         "batch_stats": {"layer_instance/kernel/u": jnp.asarray(a["u0"][None]),
                         "layer_instance/kernel/sigma": jnp.ones(())}}
    for step in range(3):
        y, upd = model.apply(v, x[step], update_stats=True, mutable=["batch_stats"])
        v = {**v, **upd}
        np.testing.assert_allclose(y, a["y"][step], rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(v["batch_stats"]["layer_instance/kernel/u"][0], a["u"][step], rtol=1e-12, atol=1e-12)


class _Net(nn.Module):
    wrap: type
    kw: dict

    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Dense(5)(x)
        x = self.wrap(nn.Dense(4), **self.kw)(x, update_stats=train)
        return self.wrap(nn.Conv(3, (2,)), **self.kw)(x[..., None, :].repeat(3, -2), update_stats=train)


class _WNet(nn.Module):
    wrap: type
    kw: dict

    @nn.compact
    def __call__(self, x):
        x = self.wrap(nn.Dense(4), **self.kw)(x)
        return self.wrap(nn.Conv(3, (2,)), **self.kw)(x[..., None, :].repeat(3, -2))


@pytest.mark.parametrize("kw", [{}, {"n_steps": 3}, {"n_steps": 0}, {"epsilon": 1e-6, "dtype": jnp.float32}])
def test_linen_spectral_norm_matches_flax(kw):
    x = jnp.asarray(np.random.default_rng(3).normal(size=(4, 3)), jnp.float32)
    flax_net, ours = _Net(nn.SpectralNorm, kw), _Net(jl.SpectralNorm, kw)
    v = flax_net.init(jax.random.key(1), x, True)
    assert jax.tree.map(jnp.shape, ours.init(jax.random.key(1), x, True)) == jax.tree.map(jnp.shape, v)
    ov = v
    flax_apply, our_apply = (jax.jit(lambda v, x, train, net=net: net.apply(v, x, train, mutable=["batch_stats"]),
                                     static_argnums=2) for net in (flax_net, ours))
    for train in (True, True, False):
        fy, fu = flax_apply(v, x, train)
        oy, ou = our_apply(ov, x, train)
        v, ov = {**v, **fu}, {**ov, **ou}
        np.testing.assert_allclose(oy, fy, rtol=1e-5, atol=1e-6)
        chex.assert_trees_all_close(ov, v, rtol=1e-5, atol=1e-6)
    gf, go = (jax.jit(jax.grad(lambda p, net=net: jnp.sum(net.apply({**v, "params": p}, x, False) ** 2)))(v["params"])
              for net in (flax_net, ours))
    chex.assert_trees_all_close(go, gf, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kw", [{}, {"feature_axes": None}, {"variable_filter": {"kernel", "bias"}},
                                {"use_scale": False}, {"feature_axes": (-2, -1)}])
def test_linen_weight_norm_matches_flax(kw):
    x = jnp.asarray(np.random.default_rng(4).normal(size=(4, 3)), jnp.float32)
    flax_net, ours = _WNet(nn.WeightNorm, kw), _WNet(jl.WeightNorm, kw)
    v = flax_net.init(jax.random.key(1), x)
    assert jax.tree.map(jnp.shape, ours.init(jax.random.key(1), x)) == jax.tree.map(jnp.shape, v)
    v = {"params": jax.tree.map(lambda p: p + 0.5, v["params"])}
    np.testing.assert_allclose(jax.jit(ours.apply)(v, x), jax.jit(flax_net.apply)(v, x), rtol=1e-5, atol=1e-6)
    gf, go = (jax.jit(jax.grad(lambda p, net=net: jnp.sum(net.apply({"params": p}, x) ** 2)))(v["params"])
              for net in (flax_net, ours))
    chex.assert_trees_all_close(go, gf, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["SpectralNorm", "WeightNorm"])
def test_nnx_wrappers_match_flax_nnx_and_keep_the_layers_weights(kind):
    x = jnp.asarray(np.random.default_rng(5).normal(size=(4, 3)), jnp.float32)
    kw = {"n_steps": 2} if kind == "SpectralNorm" else {}
    flax_mod = getattr(nnx, kind)(nnx.Linear(3, 5, rngs=nnx.Rngs(0)), rngs=nnx.Rngs(1), **kw)
    ours = getattr(jn, kind)(nnx.Linear(3, 5, rngs=nnx.Rngs(0)), rngs=nnx.Rngs(1), **kw)
    shapes = lambda m: jax.tree.map(jnp.shape, nnx.to_pure_dict(nnx.state(m)))
    assert shapes(ours) == shapes(flax_mod)
    kernel = ours.layer_instance.kernel[...]
    np.testing.assert_allclose(ours(x), flax_mod(x), rtol=1e-5, atol=1e-6)
    if kind == "SpectralNorm":
        np.testing.assert_allclose(ours.batch_stats[("kernel", "u")][...], flax_mod.batch_stats[("kernel", "u")][...],
                                   rtol=1e-5, atol=1e-6)
    # ours leaves the trainable weight as it was (Flax NNX overwrites it with the normalized one)
    np.testing.assert_array_equal(ours.layer_instance.kernel[...], kernel)
    grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(ours)
    assert np.all(np.isfinite(grads.layer_instance.kernel[...])) and np.any(grads.layer_instance.kernel[...] != 0)
    ours.eval()
    if kind == "SpectralNorm":
        u = ours.batch_stats[("kernel", "u")][...]
        ours(x)
        np.testing.assert_array_equal(ours.batch_stats[("kernel", "u")][...], u)  # eval: u stays


def test_spectral_norm_errors():
    with pytest.raises(ValueError, match=r"`u` must have shape \(4,\)"):
        jaxnorm.spectral_norm(jnp.ones((3, 4)), jnp.ones((3,)))
    with pytest.raises(ValueError, match=r"`n_steps` must be an int >= 0, got -1"):
        jaxnorm.spectral_norm(jnp.ones((3, 4)), jnp.ones((4,)), n_steps=-1)
    with pytest.raises(ValueError, match=r"`scale` must have shape \(4,\)"):
        jaxnorm.weight_norm(jnp.ones((3, 4)), jnp.ones((3,)))
    with pytest.raises(ValueError, match="error_on_non_matrix is True"):
        jl.SpectralNorm(nn.Conv(3, (2,)), error_on_non_matrix=True).init(
            jax.random.key(0), jnp.ones((2, 4, 3)), update_stats=True)
