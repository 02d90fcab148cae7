"""Per-platform code paths and the opt-in Pallas kernels, checked without a GPU.

- The XLA:CPU scheduling helpers (optimization barriers, the row threshold, the checked one pass with its
  ``lax.cond``) are CPU-only: a program lowered for CUDA or TPU holds none of them, and the plain statistics it
  uses instead are exact far from zero.
- The Pallas kernels run in Pallas' interpreter against float64 formulas and the XLA path, alone and wired into
  ``layer_norm``/``rms_norm`` under every transformation; both kernels lower for CUDA (Triton) from this CPU.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxnorm
from jaxnorm import _platform, _xla_cpu, kernels
from tests.tolerances import tol

ROW_SHAPES = [(37, 100), (130, 64), (5, 768), (1, 3)]  # rows not a multiple of the block, columns not powers of 2


def _reference(x, scale, bias, eps, centre):
    xd = np.asarray(x, np.float64)
    mean = xd.mean(1, keepdims=True) if centre else 0.0
    var = ((xd - mean) ** 2).mean(1, keepdims=True)
    y = (xd - mean) / np.sqrt(var + eps) * np.asarray(scale, np.float64)
    return y + (np.asarray(bias, np.float64) if bias is not None else 0.0), np.squeeze(mean + 0 * var, 1), var[:, 0]


@pytest.mark.parametrize("centre", [True, False], ids=["layer", "rms"])
@pytest.mark.parametrize("shape", ROW_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_forward_kernel_matches_float64(shape, centre, dtype):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=shape) * 3 + 5, dtype)
    scale = jnp.asarray(rng.normal(size=shape[1]), dtype)
    bias = jnp.asarray(rng.normal(size=shape[1]), dtype) if centre else None
    y, mean, var = kernels.row_norm_forward(x, scale, bias, 1e-5, centre=centre, interpret=True)
    ref_y, ref_mean, ref_var = _reference(x, scale, bias, 1e-5, centre)
    chex.assert_type(y, x.dtype)
    chex.assert_type([mean, var], jnp.float32)
    np.testing.assert_allclose(np.asarray(y, np.float64), ref_y, **tol(dtype))
    np.testing.assert_allclose(mean, ref_mean, **tol("float32"))
    np.testing.assert_allclose(var, ref_var, **tol("float32"))


# 1 or 2 programs for 2 or 3 tiles: programs walk tiles, the last ones partly or wholly past the end
BACKWARD_CASES = [(shape, kernels.MAX_PROGRAMS) for shape in ROW_SHAPES] + [((37, 100), 1), ((130, 64), 2)]


@pytest.mark.parametrize("centre", [True, False], ids=["layer", "rms"])
@pytest.mark.parametrize(("shape", "programs"), BACKWARD_CASES, ids=lambda v: str(v))
def test_backward_kernel_matches_the_xla_backward(shape, centre, programs):
    """dx, dscale and dbias in one pass (per-program partials summed after) against autodiff of the XLA layer;
    with 1 or 2 programs a program walks several tiles, the last ones partly or wholly past the end."""
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=shape) * 2 + 1, jnp.float32)
    scale, bias = (jnp.asarray(rng.normal(size=shape[1]), jnp.float32) for _ in range(2))
    dy = jnp.asarray(rng.normal(size=shape), jnp.float32)
    layer = jaxnorm.layer_norm if centre else jaxnorm.rms_norm

    @jax.jit
    def both(x, dy, scale, bias):  # the kernels' backward, and autodiff of the XLA layer, in one program
        _, mean, var = kernels.row_norm_forward(x, scale, bias, 1e-5, centre=centre, interpret=True)
        kernel = kernels.row_norm_backward(x, dy, mean, jax.lax.rsqrt(var + 1e-5), scale, centre=centre,
                                           interpret=True, max_programs=programs)
        _, vjp = jax.vjp(lambda p, x: layer(p, x, normalized_shape=shape[1], eps=1e-5), {"scale": scale,
                                                                                           "bias": bias}, x)
        return kernel, vjp(dy)

    (dx, dscale, dbias), (ref_params, ref_dx) = both(x, dy, scale, bias)
    for got, want in ((dx, ref_dx), (dscale, ref_params["scale"]), (dbias, ref_params["bias"])):
        np.testing.assert_allclose(got, want, **tol("float32", "grad"))


LAYERS = {
    "layer_norm": lambda p, x: jaxnorm.layer_norm(p, x, normalized_shape=x.shape[-2:]),
    "layer_norm, scale only": lambda p, x: jaxnorm.layer_norm({"scale": p["scale"]}, x, normalized_shape=x.shape[-2:]),
    "rms_norm": lambda p, x: jaxnorm.rms_norm({"scale": p["scale"]}, x, normalized_shape=x.shape[-2:]),
    "rms_norm, no params": lambda p, x: jaxnorm.rms_norm({}, x, normalized_shape=x.shape[-2:], eps=1e-6),
}


def _transforms(f, p, x):
    """``f`` under each transformation, in one program (the kernel setting is read when it is traced)."""
    loss = lambda p, x: jnp.sum(jnp.sin(f(p, x)))
    return jax.jit(lambda p, x: {
        "values": f(p, x),
        "grad": jax.grad(loss, argnums=(0, 1))(p, x),
        "jvp": jax.jvp(lambda x: f(p, x), (x,), (jnp.cos(x),))[1],
        "vmap": jax.vmap(lambda x: f(p, x))(x),
        "hessian": jax.hessian(lambda x: loss(p, x))(x[0, :1]),
    })(p, x)


@pytest.mark.parametrize("name", list(LAYERS))
def test_layers_with_the_kernel_match_the_xla_path_under_every_transform(name):
    """Interpret mode puts the kernel in the program on CPU: same results as XLA, every transformation."""
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=(3, 5, 2, 12)) * 2 + 1, jnp.float32)
    p = {k: jnp.asarray(rng.normal(size=(2, 12)), jnp.float32) for k in ("scale", "bias")}
    f = LAYERS[name]
    want = _transforms(lambda p, x: f(p, x), p, x)
    with kernels.pallas(interpret=True):
        assert "pallas_call" in str(jax.make_jaxpr(lambda p, x: f(p, x))(p, x))
        got = _transforms(lambda p, x: f(p, x), p, x)
    assert "pallas_call" not in str(jax.make_jaxpr(lambda p, x: f(p, x))(p, x)), "the setting leaked"
    for key in want:
        for a, b in zip(jax.tree.leaves(got[key]), jax.tree.leaves(want[key]), strict=True):
            np.testing.assert_allclose(a, b, err_msg=key, **tol("float32", "grad"))


def test_kernel_applies_to_trailing_rows_only():
    """Batch, instance and group norm (and layer norm over non-trailing axes) never take the row kernel."""
    x = jnp.ones((4, 6, 8), jnp.float32)
    with kernels.pallas(interpret=True):
        stats = jaxnorm.batch_norm_init(8, affine=False)[1]
        for f in (lambda x: jaxnorm.batch_norm({}, stats, x, training=True, axis=-1),
                  lambda x: jaxnorm.group_norm({}, x, num_groups=2, axis=-1),
                  lambda x: jaxnorm.layer_norm({}, x, reduction_axes=(0, 1), feature_axes=(2,)),
                  lambda x: jaxnorm.layer_norm({}, x.astype(jnp.float64), normalized_shape=8)):  # no float64 kernel
            assert "pallas_call" not in str(jax.make_jaxpr(f)(x))
        assert "pallas_call" in str(jax.make_jaxpr(lambda x: jaxnorm.layer_norm({}, x, normalized_shape=8))(x))


def _lowered(f, *args, platform):
    return jax.jit(f).trace(*args).lower(lowering_platforms=(platform,)).as_text()


def test_gpu_mode_uses_the_kernel_on_cuda_only():
    """Enabled (not interpreted): lowered for CUDA the forward is a Triton kernel; for CPU it is the XLA program."""
    x, p = jnp.ones((64, 96), jnp.bfloat16), jaxnorm.layer_norm_init(96, dtype=jnp.bfloat16)
    f = lambda p, x: jaxnorm.layer_norm(p, x, normalized_shape=96)
    with kernels.pallas():
        cuda, cpu = _lowered(f, p, x, platform="cuda"), _lowered(f, p, x, platform="cpu")
        y = jax.jit(f)(p, x)  # runs here, on CPU: the XLA branch
    assert "triton" in cuda and "jaxnorm_layer_norm_fwd" in cuda
    assert "triton" not in cpu and "jaxnorm_layer_norm_fwd" not in cpu
    np.testing.assert_array_equal(y, jax.jit(f)(p, x))


def test_backward_kernel_lowers_for_cuda():
    x = jnp.ones((4096, 768), jnp.bfloat16)
    stats, scale = jnp.ones(4096), jnp.ones(768, jnp.bfloat16)
    text = _lowered(lambda x, dy, m, r, s: kernels.row_norm_backward(x, dy, m, r, s), x, x, stats, stats, scale,
                    platform="cuda")
    assert "triton" in text and "jaxnorm_layer_norm_bwd" in text


def test_enable_pallas_checks_its_arguments_and_restores():
    with pytest.raises(TypeError, match=r"enable_pallas: `enabled` and `interpret` must be bools, got 'yes'"):
        kernels.enable_pallas("yes")
    assert not kernels.pallas_enabled()
    with kernels.pallas():
        assert kernels.pallas_enabled()
        with kernels.pallas(False):
            assert not kernels.pallas_enabled()
        assert kernels.pallas_enabled()
    assert not kernels.pallas_enabled()


# ------------------------------------------------------------------------------------------- per-platform paths


def test_barriers_are_cpu_only():
    x = jnp.ones((8, 4))
    f = lambda x: jnp.sum(_xla_cpu.cpu_barrier((x, x))[0] * 2)
    assert "optimization_barrier" in _lowered(f, x, platform="cpu")
    for platform in ("cuda", "tpu"):
        assert "optimization_barrier" not in _lowered(f, x, platform=platform)


@pytest.mark.parametrize("layer", ["batch_norm", "layer_norm", "group_norm", "bf16 batch_norm"])
def test_layers_lower_for_gpu_and_tpu_without_cpu_devices(layer):
    """The forward of every fused layer, lowered for CUDA/TPU: no barrier and no data-dependent branch (the only
    ``case`` ops left are the platform switches, whose index is a constant); lowered for CPU: both present."""
    dtype = jnp.bfloat16 if layer.startswith("bf16") else jnp.float32
    x = jnp.ones((4, 6, 6, 8), dtype)
    f = {"batch_norm": lambda x: jaxnorm.batch_norm(*jaxnorm.batch_norm_init(8), x, training=True, axis=-1)[0],
         "bf16 batch_norm": lambda x: jaxnorm.batch_norm(*jaxnorm.batch_norm_init(8), x, training=True, axis=-1)[0],
         "layer_norm": lambda x: jaxnorm.layer_norm({}, x, normalized_shape=8),
         "group_norm": lambda x: jaxnorm.group_norm({}, x, num_groups=2, axis=-1)}[layer]
    cpu = _lowered(f, x, platform="cpu")
    assert "optimization_barrier" in cpu
    for platform in ("cuda", "tpu"):
        text = _lowered(f, x, platform=platform)
        assert "optimization_barrier" not in text, platform
        assert "stablehlo.compare" not in text, f"{platform}: a data-dependent predicate was lowered"


@pytest.mark.parametrize("case", ["batch NHWC", "batch NCHW", "group", "rows"])
def test_plain_statistics_are_exact_far_from_zero_and_branch_free(case):
    """The statistics every non-CPU platform gets: the two-pass formula, exact at offsets of 1e4 std in float32
    (where E[x^2] - E[x]^2 loses every digit), with no cond in the program."""
    shape, axes, groups = {"batch NHWC": ((64, 4, 4, 3), (0, 1, 2), None),
                           "batch NCHW": ((64, 3, 4, 4), (0, 2, 3), None),
                           "group": ((8, 4, 4, 6), (1, 2), (3, 2)),
                           "rows": ((16, 48), (1,), None)}[case]
    rng = np.random.default_rng(3)
    xd = rng.normal(size=shape) + 1e4
    x = jnp.asarray(xd, jnp.float32)
    plain = lambda x: _platform.moment_strategies(x, axes, groups)["default"](x)
    assert "stablehlo.compare" not in _lowered(plain, x, platform="cuda")
    mean, m2 = plain(x)
    xq = np.asarray(x, np.float64)
    if groups is None:
        ref_mean, ref_m2 = xq.mean(axes, keepdims=True), ((xq - xq.mean(axes, keepdims=True)) ** 2).sum(
            axes, keepdims=True)
    else:
        view = xq.reshape(*shape[:-1], groups[1], shape[-1] // groups[1])
        red = (*axes, view.ndim - 1)
        gm = view.mean(red, keepdims=True)
        ref_mean = np.broadcast_to(gm, view.shape).reshape(shape).mean(axes, keepdims=True)
        ref_m2 = np.repeat(((view - gm) ** 2).sum(red, keepdims=True)[..., 0], shape[-1] // groups[1], -1)
    np.testing.assert_allclose(mean, ref_mean, rtol=1e-6)
    np.testing.assert_allclose(m2, ref_m2, rtol=2e-3)


@pytest.mark.parametrize("centre", [True, False], ids=["layer", "rms"])
def test_experimental_kernel_pair_gives_the_xla_layers_gradients(centre):
    """``row_norm_vjp`` (both kernels behind a custom_vjp, reverse mode only): values and gradients of the XLA
    layer, over several tiles of rows."""
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.normal(size=(70, 24)) + 2, jnp.float32)
    params = {"scale": jnp.asarray(rng.normal(size=24), jnp.float32)}
    if centre:
        params["bias"] = jnp.asarray(rng.normal(size=24), jnp.float32)
    layer = jaxnorm.layer_norm if centre else jaxnorm.rms_norm
    loss = lambda f: lambda p, x: jnp.sum(jnp.sin(f(p, x)))
    pair = kernels.row_norm_vjp(centre, 1e-5, interpret=True)
    xla = lambda p, x: layer(p, x, normalized_shape=24, eps=1e-5)
    got, want = (jax.jit(jax.value_and_grad(loss(f), (0, 1)))(params, x) for f in (pair, xla))
    chex.assert_trees_all_close(got, want, **tol("float32", "grad"))
