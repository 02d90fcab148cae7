"""jaxnorm vs real PyTorch: every committed fixture, outputs, running stats and gradients (torch not needed)."""

from __future__ import annotations

import collections
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import registry
from tests.tolerances import tol

FIXTURE_DIR = pathlib.Path(__file__).parent / "fixtures" / "torch"
FIXTURES = sorted(FIXTURE_DIR.glob("*.npz"))
# weight reparametrizations (spectral/weight norm) follow their own protocol: tests/test_weight_norms.py
REPARAMETRIZED = ("spectral_norm", "weight_norm")
LAYER_FIXTURES = [p for p in FIXTURES if not p.name.startswith(REPARAMETRIZED)]
# max |jaxnorm - torch| per (torch class, dtype), printed at the end of the run (see conftest.py)
MAX_ERRORS: dict[tuple[str, str], float] = collections.defaultdict(float)


def load(path: pathlib.Path) -> tuple[dict, dict[str, np.ndarray]]:
    with np.load(path, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    return json.loads(str(arrays.pop("config"))), arrays


def simulate(cfg: dict, a: dict[str, np.ndarray], channels_last: bool = False) -> dict[str, np.ndarray]:
    """Replay the fixture's protocol in jaxnorm, in one jitted program."""
    dtype = jnp.dtype(cfg["dtype"])
    built = registry.build(cfg["torch"], cfg["ctor"], dtype)
    params = dict(built.params)
    if "weight" in a:
        params["scale"] = jnp.asarray(a["weight"])
    if "bias" in a:
        params["bias"] = jnp.asarray(a["bias"])
    axis = -1 if channels_last else 1
    move = (lambda t: jnp.moveaxis(t, 1, -1)) if channels_last else (lambda t: t)
    unmove = (lambda t: jnp.moveaxis(t, -1, 1)) if channels_last else (lambda t: t)

    def apply(p, s, x, training):
        y, s = built.apply(p, s, move(x), training=training, axis=axis)
        return unmove(y), s

    @jax.jit
    def run(params, stats0, x, x_eval, dy):
        def step(stats, xs):
            y, stats = apply(params, stats, xs, True)
            return stats, (y, stats)

        stats, (ys, trajectory) = jax.lax.scan(step, stats0, x)
        res = {"y": ys, **trajectory}
        res["y_eval"], _ = apply(params, stats, x_eval, False)

        def loss(p, xin, s, training):
            return jnp.sum(apply(p, s, xin, training)[0] * dy)

        res["grad"] = jax.grad(loss, argnums=(0, 1))(params, x[0], stats0, True)
        res["grad_eval"] = jax.grad(loss, argnums=(0, 1))(params, x_eval, stats, False)
        return res

    return jax.tree.map(np.asarray, run(params, built.batch_stats, a["x"], a["x_eval"], a["dy"]))


def compare(cfg, name, got, want, family=None):
    t = tol(cfg["dtype"], family)
    err = float(np.max(np.abs(np.asarray(got, np.float64) - want))) if want.size else 0.0
    MAX_ERRORS[(cfg["torch"], cfg["dtype"], family or "value")] = max(
        MAX_ERRORS[(cfg["torch"], cfg["dtype"], family or "value")], err)
    np.testing.assert_allclose(got, want, **t, err_msg=f"{cfg['name']}: {name}")


def check(cfg, a, res):
    compare(cfg, "train outputs", res["y"], a["y"])
    compare(cfg, "eval output", res["y_eval"], a["y_eval"])
    if "running_mean" in a:
        compare(cfg, "running_mean", res["mean"], a["running_mean"])
        compare(cfg, "running_var", res["var"], a["running_var"])
        np.testing.assert_array_equal(res["count"], a["num_batches_tracked"], err_msg=cfg["name"])
    else:
        assert "mean" not in res, "jaxnorm tracked statistics that PyTorch does not"
    for suffix, key in (("", "grad"), ("_eval", "grad_eval")):
        dparams, dx = res[key]
        compare(cfg, "dx" + suffix, dx, a["dx" + suffix], "grad")
        for tname, jname in (("weight", "scale"), ("bias", "bias")):
            if f"d{tname}{suffix}" in a:
                compare(cfg, f"d{tname}{suffix}", dparams[jname], a[f"d{tname}{suffix}"], "grad")
            else:
                assert jname not in dparams


def test_fixture_inventory():
    """Every layer family, both dtypes, and well over 100 configurations are present."""
    assert len(FIXTURES) >= 200, f"expected the committed fixtures in {FIXTURE_DIR}"
    configs = [load(p)[0] for p in FIXTURES]
    families = {(c["torch"], c["dtype"]) for c in configs}
    for cls in ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d",
                "LayerNorm", "GroupNorm", "RMSNorm", "LocalResponseNorm", *REPARAMETRIZED]:
        assert (cls, "float32") in families and (cls, "float64") in families, cls
    assert {c["torch_version"].split("+")[0] for c in configs} == {"2.13.0"}


def _configuration(path: pathlib.Path) -> tuple[str, str]:
    """(torch class, options): a fixture's name without its input shape and dtype."""
    cls, _shape, options, _dtype = path.stem.split("__")
    return cls, options


def _size(path: pathlib.Path) -> int:
    return int(np.prod([int(d) for d in path.stem.split("__")[1].split("x")]))


# every float64 fixture (the math, at every shape); in float32, the largest input of each configuration: the float32
# program is the float64 one in another dtype, so the other float32 shapes check no path the float64 ones do not
FLOAT32_PER_CONFIGURATION = {
    max((p for p in LAYER_FIXTURES if p.stem.endswith("float32") and _configuration(p) == c), key=_size)
    for c in {_configuration(p) for p in LAYER_FIXTURES}}
PARITY_FIXTURES = [p for p in LAYER_FIXTURES if p.stem.endswith("float64") or p in FLOAT32_PER_CONFIGURATION]


@pytest.mark.parametrize("path", PARITY_FIXTURES, ids=lambda p: p.stem)
def test_matches_pytorch(path):
    cfg, a = load(path)
    check(cfg, a, simulate(cfg, a))


CHANNEL_FIXTURES = [p for p in LAYER_FIXTURES if p.name.startswith(("BatchNorm", "InstanceNorm", "GroupNorm", "Local"))
                    and "float64" in p.name and "__16x" in p.name]


@pytest.mark.parametrize("path", CHANNEL_FIXTURES, ids=lambda p: p.stem)
def test_matches_pytorch_channels_last(path):
    """The same fixtures with the channel moved last and ``axis=-1``."""
    cfg, a = load(path)
    check(cfg, a, simulate(cfg, a, channels_last=True))
