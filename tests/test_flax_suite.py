"""Flax's own normalization tests, run against jaxnorm (``tests/flax_suite.py``), fail only as
``tests/flax_differences.py`` says they do; and the guide shows that table."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxnorm import linen as jl
from tests import flax_differences, flax_suite

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def flax_tests() -> pathlib.Path:
    try:
        return flax_suite.flax_tests()
    except flax_suite.sdists.Unavailable as err:
        pytest.skip(f"Flax's tests are fetched from its sdist on PyPI, which is out of reach here: {err}")


@pytest.mark.slow
@pytest.mark.parametrize("swap", sorted(flax_suite.SUITES))
def test_flax_tests_fail_only_as_the_table_of_differences_says(swap, flax_tests, tmp_path):
    out = tmp_path / f"{swap}.json"
    done = subprocess.run([sys.executable, str(ROOT / "tests" / "flax_suite.py"), "--swap", swap, "--out", str(out),
                           "--flax-tests", str(flax_tests)], capture_output=True, text=True, timeout=900,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-3000:]
    outcomes = json.loads(out.read_text())
    assert sum(o["status"] == "passed" for o in outcomes) >= 40, done.stdout  # the suites ran
    assert not [o for o in outcomes if o["status"] == "skipped"], "Flax's tests skipped here"
    unexplained, used = [], set()
    for o in outcomes:
        if o["status"] == "passed":
            continue
        entry, why = flax_differences.explain(swap, o)
        if entry is None:
            unexplained.append(f"{o['class']}.{o['test']} {o['params'][:120]}: {o.get('error', '')[:300]}\n  {why}")
        else:
            used.add(entry)
    assert not unexplained, "failures that are not differences by design:\n" + "\n".join(unexplained)
    stale = [d for d in flax_differences.DIFFERENCES if d.swap == swap and d not in used]
    assert not stale, f"entries that explain no failure (delete them): {stale}"


def test_the_flax_guide_holds_the_table_of_differences():
    guide = (ROOT / "docs" / "guides" / "flax.md").read_text()
    fix = "paste the output of python -c 'from tests import flax_differences as d; print(d.markdown())'"
    assert flax_differences.markdown() in guide, fix


def _f64_error(y, ref):
    return float(np.abs(np.asarray(y, np.float64) - ref).max())


@pytest.mark.parametrize("case", ["instance_norm_1e4", "group_norm_fast_variance", "layer_norm_masked"])
def test_where_flax_rounds_differently_jaxnorm_is_closer_to_float64(case):
    """The inputs of the ``exact`` entries: jaxnorm's error against float64 is at most Flax's."""
    k1, k2 = jax.random.split(jax.random.key(0))
    if case == "instance_norm_1e4":  # linen_test's test_instance_norm(use_fast_variance=False)
        x, red, mask = jax.random.normal(k1, (2, 3, 4, 5), jnp.float32) + 1e4, (1, 2), None
        kw = dict(use_bias=False, use_scale=False, epsilon=1e-5)
        flax_mod, ours = nn.InstanceNorm(use_fast_variance=False, **kw), jl.InstanceNorm(**kw)
    elif case == "group_norm_fast_variance":  # normalization_test's groupnorm equivalence
        x, mask = jax.random.normal(jax.random.key(0), (10, 6), jnp.float32), None
        flax_mod, ours = nn.GroupNorm(num_groups=3, epsilon=1e-6), jl.GroupNorm(num_groups=3, epsilon=1e-6)
    else:
        x, red = jax.random.normal(jax.random.key(0), (10, 5), jnp.float32), (1,)
        mask = np.array([True, False, True, False, True])
        flax_mod, ours = nn.LayerNorm(epsilon=1e-6), jl.LayerNorm(epsilon=1e-6)
    variables = flax_mod.init(k2, x)
    call = {} if mask is None else {"mask": mask}
    yf, yo = flax_mod.apply(variables, x, **call), ours.apply(variables, x, **call)
    x64 = np.asarray(x, np.float64)
    eps = 1e-5 if case == "instance_norm_1e4" else 1e-6
    if case == "group_norm_fast_variance":
        g = x64.reshape(10, 3, 2)
        ref = ((g - g.mean(2, keepdims=True)) / np.sqrt(g.var(2, keepdims=True) + eps)).reshape(10, 6)
    else:
        m = np.broadcast_to(True if mask is None else mask, x.shape)
        n = m.sum(red, keepdims=True)
        mu = (x64 * m).sum(red, keepdims=True) / n
        ref = (x64 - mu) / np.sqrt((((x64 - mu) ** 2) * m).sum(red, keepdims=True) / n + eps)
    assert jnp.dtype(yo.dtype) == jnp.float32
    assert _f64_error(yo, ref) <= _f64_error(yf, ref), (_f64_error(yo, ref), _f64_error(yf, ref))
