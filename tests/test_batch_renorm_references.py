"""jaxnorm's BatchRenorm against the three implementations people use today, step by step across the warm-up.

- **sbx-rl** (``sbx/common/jax_layers.py``, flax.linen, the one RL projects copy): Flax's momentum and biased
  variance, a hard switch at ``steps >= warmup_steps``; against ``jaxnorm.linen.BatchRenorm(flax_momentum=...,
  warmup_steps=W, relax_steps=0)``.
- **sb3-contrib** (``sb3_contrib/common/torch_layers.py``, PyTorch): PyTorch's momentum, the unbiased variance for
  normalization too, a switch at ``steps > warmup_steps``; against ``jaxnorm.nnx.BatchRenorm(torch_momentum=...,
  warmup_steps=W + 1, relax_steps=0, batch_var_unbiased=True)``.
- **Keras 3** (``BatchNormalization(renorm=True)`` on its JAX backend): no warm-up, the paper's formula, and
  running averages of the standard deviation; against ``jaxnorm.equinox.BatchRenorm(warmup_steps=0,
  relax_steps=0)``.

The two RL layers are loaded from their packages' source distributions (``tests/sdists.py``: the packages pull in
dependencies the layers do not need); each reference is skipped with the reason when it cannot be had. What holds:

- during the warm-up, the output, the running mean and variance are plain batch norm's, to float32 rounding;
- after it, sbx-rl and sb3-contrib write the correction as a modified mean and variance, so eps enters the
  normalization as ``sqrt(var_B + r^2 eps)`` instead of the paper's ``sqrt(var_B + eps)``:
  ``|y_ref - y| <= |scale| * eps / (2 var_B) * (r |r^2 - 1| |x_hat| + r^2 |d|)``, checked element by element
  (``bound``), the running statistics still identical;
- Keras, given jaxnorm's state each step (``var = renorm_stddev^2 - eps``), gives the same output to float32
  rounding; its update averages ``sigma_B = sqrt(var_B + eps)`` (the paper's) where jaxnorm, as batch norm,
  averages the variance: jaxnorm's new variance exceeds Keras's ``stddev^2 - eps`` by exactly
  ``m (1 - m) (sigma - sigma_B)^2`` (Jensen's gap, ``m`` the decay), checked to rounding;
- eval calls agree to float32 rounding.

The measured maxima and the bounds are in docs/guides/variants.md.
"""

from __future__ import annotations

import importlib.util
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxnorm import linen as jl
from tests import sdists
from tests.tolerances import tol

SBX = ("sbx-rl", "0.28.0", "sbx/common/jax_layers.py")
SB3 = ("sb3-contrib", "2.9.2", "sb3_contrib/common/torch_layers.py")
C, N, STEPS, WARMUP, EPS = 4, 32, 8, 3, 1e-3
R_MAX, D_MAX = 1.5, 0.5  # tight bounds, so the correction is clipped in some channels and steps
F32 = tol("float32")
MEASURED: dict[str, float] = {}  # the largest |y_ref - y| after the warm-up, and the bound there, per reference


def _load(package: str, version: str, path: str):
    try:
        folder = sdists.fetch(package, version, [path])
    except sdists.Unavailable as err:
        pytest.skip(f"{package}'s layer file could not be fetched: {err}")
    spec = importlib.util.spec_from_file_location(f"reference_{package.replace('-', '_')}", folder / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _batches(seed: int = 0) -> np.ndarray:
    """STEPS batches whose scale and offset drift per step and channel, so r and d move and get clipped."""
    rng = np.random.default_rng(seed)
    scale = rng.uniform(0.3, 3.0, (STEPS, 1, C))
    offset = rng.normal(0, 1.5, (STEPS, 1, C))
    return (rng.normal(size=(STEPS, N, C)) * scale + offset).astype(np.float32)


def _affine(seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.uniform(0.5, 1.5, C).astype(np.float32), rng.normal(0, 0.5, C).astype(np.float32)


def bound(x, mean_run, var_run, scale, *, unbiased: bool) -> np.ndarray:
    """The float64 bound on ``|y_ref - y|`` for one batch (see the module docstring), from the running statistics
    before the step."""
    x = np.asarray(x, np.float64)
    mu, v = x.mean(0), x.var(0, ddof=1 if unbiased else 0)
    sigma = np.sqrt(np.asarray(var_run, np.float64) + EPS)
    r = np.clip(np.sqrt(v + EPS) / sigma, 1 / R_MAX, R_MAX)
    d = np.clip((mu - np.asarray(mean_run, np.float64)) / sigma, -D_MAX, D_MAX)
    x_hat = (x - mu) / np.sqrt(v + EPS)
    return np.abs(scale) * EPS / (2 * v) * (r * np.abs(r**2 - 1) * np.abs(x_hat) + r**2 * np.abs(d))


def _check_step(name, step, y, y_ref, x, before, scale, *, unbiased):
    if step < WARMUP:  # plain batch norm
        np.testing.assert_allclose(y, y_ref, **F32, err_msg=f"{name} step {step} (warm-up)")
        return
    b = bound(x, before["mean"], before["var"], scale, unbiased=unbiased)
    diff = np.abs(np.asarray(y, np.float64) - np.asarray(y_ref, np.float64))
    assert np.all(diff <= b + F32["atol"] + F32["rtol"] * np.abs(y_ref)), (name, step, float(diff.max()))
    MEASURED[f"{name} max |diff|"] = max(MEASURED.get(f"{name} max |diff|", 0.0), float(diff.max()))
    MEASURED[f"{name} max bound"] = max(MEASURED.get(f"{name} max bound", 0.0), float(b.max()))


def test_sbx_rl_linen_batch_renorm():
    reference = _load(*SBX).BatchRenorm(momentum=0.99, epsilon=EPS, warmup_steps=WARMUP)
    ours = jl.BatchRenorm(flax_momentum=0.99, epsilon=EPS, warmup_steps=WARMUP,
                          relax_steps=0, r_max=R_MAX, d_max=D_MAX)
    xs = _batches()
    scale, bias = _affine()
    params = {"scale": jnp.asarray(scale), "bias": jnp.asarray(bias)}
    ref_stats = reference.init(jax.random.key(0), xs[0], False)["batch_stats"]
    ref_stats = {**ref_stats, "r_max": R_MAX, "d_max": D_MAX}  # sbx keeps its bounds in batch_stats
    stats = ours.init(jax.random.key(0), xs[0], False)["batch_stats"]
    ref_apply = jax.jit(lambda s, x: reference.apply({"params": params, "batch_stats": s}, x, False,
                                                     mutable=["batch_stats"]))
    our_apply = jax.jit(lambda s, x: ours.apply({"params": params, "batch_stats": s}, x, False,
                                                mutable=["batch_stats"]))
    for step, x in enumerate(xs):
        y_ref, ref_new = ref_apply(ref_stats, x)
        y, new = our_apply(stats, x)
        _check_step("sbx-rl", step, y, y_ref, x, stats, scale, unbiased=False)
        ref_stats, stats = ref_new["batch_stats"], new["batch_stats"]
        for k in ("mean", "var"):  # the same running update: Flax's momentum, the biased variance
            np.testing.assert_allclose(stats[k], ref_stats[k], **F32, err_msg=f"sbx-rl step {step}: {k}")
        assert int(stats["count"]) == int(ref_stats["steps"]) == step + 1
    y_eval_ref = reference.apply({"params": params, "batch_stats": ref_stats}, xs[0], use_running_average=True)
    y_eval = ours.apply({"params": params, "batch_stats": stats}, xs[0], use_running_average=True)
    np.testing.assert_allclose(y_eval, y_eval_ref, **F32)


def test_sb3_contrib_torch_batch_renorm():
    torch = pytest.importorskip("torch")
    from jaxnorm import nnx as jn

    reference = _load(*SB3).BatchRenorm1d(C, eps=EPS, momentum=0.01, warmup_steps=WARMUP - 1)
    reference.rmax, reference.dmax = R_MAX, D_MAX
    # sb3-contrib switches at steps > warmup_steps: its warmup_steps=k is jaxnorm's k + 1
    ours = jn.BatchRenorm(C, torch_momentum=0.01, epsilon=EPS, warmup_steps=WARMUP, relax_steps=0, r_max=R_MAX,
                          d_max=D_MAX, batch_var_unbiased=True)
    scale, bias = _affine()
    with torch.no_grad():
        reference.scale.copy_(torch.as_tensor(scale)), reference.bias.copy_(torch.as_tensor(bias))
    ours.scale.set_value(jnp.asarray(scale)), ours.bias.set_value(jnp.asarray(bias))
    for step, x in enumerate(_batches()):
        before = {"mean": np.asarray(ours.mean[...]), "var": np.asarray(ours.var[...])}
        y_ref = reference.train()(torch.as_tensor(x)).detach().numpy()
        y = ours(jnp.asarray(x), use_running_average=False)
        _check_step("sb3-contrib", step, y, y_ref, x, before, scale, unbiased=True)
        # the same running update: PyTorch's momentum, the unbiased variance
        np.testing.assert_allclose(ours.mean[...], reference.ra_mean.numpy(), **F32)
        np.testing.assert_allclose(ours.var[...], reference.ra_var.numpy(), **F32)
        assert int(ours.count[...]) == int(reference.steps) == step + 1
    x = _batches(seed=2)[0]
    np.testing.assert_allclose(ours(jnp.asarray(x), use_running_average=True),
                               reference.eval()(torch.as_tensor(x)).detach().numpy(), **F32)


def _keras():
    if os.environ.setdefault("KERAS_BACKEND", "jax") != "jax":
        pytest.skip(f"Keras is set to the {os.environ['KERAS_BACKEND']} backend (KERAS_BACKEND); this compares on JAX")
    keras = pytest.importorskip("keras", reason="Keras 3 is the third reference: pip install keras")
    if keras.backend.backend() != "jax":
        pytest.skip(f"Keras was imported with the {keras.backend.backend()} backend; this compares on JAX")
    return keras


def test_keras_3_batch_normalization_with_renorm():
    keras = _keras()
    eqx = pytest.importorskip("equinox", reason="jaxnorm.equinox needs the optional extra")
    from jaxnorm import equinox as je

    m = 0.9  # Keras's decay, for both its renorm and its inference statistics
    reference = keras.layers.BatchNormalization(momentum=m, epsilon=EPS, renorm=True, renorm_momentum=m,
                                                renorm_clipping={"rmax": R_MAX, "rmin": 1 / R_MAX, "dmax": D_MAX})
    reference.build((N, C))
    scale, bias = _affine()
    reference.gamma.assign(scale), reference.beta.assign(bias)
    ours, state = eqx.nn.make_with_state(je.BatchRenorm)(C, "batch", eps=EPS, flax_momentum=m, warmup_steps=0,
                                                          relax_steps=0, r_max=R_MAX, d_max=D_MAX, dtype=jnp.float32)
    ours = eqx.tree_at(lambda b: (b.weight, b.bias), ours, (jnp.asarray(scale), jnp.asarray(bias)))
    call = jax.jit(jax.vmap(ours, axis_name="batch", in_axes=(0, None), out_axes=(0, None)))
    for step, x in enumerate(_batches()):
        # jaxnorm's running state is Keras's, seen as a variance: var = stddev^2 - eps
        mean, stddev = np.asarray(reference.renorm_mean.value), np.asarray(reference.renorm_stddev.value)
        np.testing.assert_array_equal(mean, np.asarray(reference.moving_mean.value))  # one decay: one mean
        stats = {"mean": jnp.asarray(mean), "var": jnp.asarray(stddev**2 - EPS), "count": jnp.asarray(step, jnp.int32)}
        state = state.set(ours.state_index, stats)
        y, state = call(jnp.asarray(x), state)
        y_ref = np.asarray(reference(x, training=True))
        np.testing.assert_allclose(y, y_ref, **F32, err_msg=f"Keras step {step}")
        # the update: Keras averages sigma_B, jaxnorm the variance; the gap is Jensen's, m (1 - m) (sigma - sigma_B)^2
        new = state.get(ours.state_index)
        sigma_b = np.sqrt(np.asarray(x, np.float64).var(0) + EPS)
        gap = m * (1 - m) * (np.asarray(stddev, np.float64) - sigma_b) ** 2
        np.testing.assert_allclose(new["mean"], np.asarray(reference.renorm_mean.value), **F32)
        np.testing.assert_allclose(np.asarray(new["var"], np.float64) - gap,
                                   np.asarray(reference.renorm_stddev.value, np.float64) ** 2 - EPS, rtol=1e-5,
                                   atol=1e-5, err_msg=f"Keras step {step}: the variance gap")
        MEASURED["Keras max variance gap"] = max(MEASURED.get("Keras max variance gap", 0.0), float(gap.max()))
    x = _batches(seed=2)[0]
    state = state.set(ours.state_index, {"mean": jnp.asarray(reference.moving_mean.value),
                                         "var": jnp.asarray(reference.moving_variance.value),
                                         "count": jnp.asarray(STEPS, jnp.int32)})
    y_eval, _ = jax.vmap(eqx.nn.inference_mode(ours), axis_name="batch", in_axes=(0, None),
                         out_axes=(0, None))(jnp.asarray(x), state)
    np.testing.assert_allclose(y_eval, np.asarray(reference(x, training=False)), **F32)


def test_the_bound_is_tight_enough_to_matter():
    """The bound is not vacuous: on these batches it is below 5% of the output's spread, and it would not hold for a
    wrong correction (the difference between renorm and plain batch norm exceeds it)."""
    xs, (scale, _) = _batches(), _affine()
    stats = {"mean": np.zeros(C), "var": np.ones(C)}
    b = bound(xs[WARMUP], stats["mean"], stats["var"], scale, unbiased=False)
    assert b.max() < 0.05 * scale.min()
    x = np.asarray(xs[WARMUP], np.float64)
    mu, v = x.mean(0), x.var(0)
    sigma = np.sqrt(stats["var"] + EPS)
    r = np.clip(np.sqrt(v + EPS) / sigma, 1 / R_MAX, R_MAX)
    d = np.clip((mu - stats["mean"]) / sigma, -D_MAX, D_MAX)
    x_hat = (x - mu) / np.sqrt(v + EPS)
    renorm_minus_bn = np.abs(scale * (x_hat * (r - 1) + d))
    assert renorm_minus_bn.max() > 10 * b.max()
    chex.assert_shape(b, (N, C))
