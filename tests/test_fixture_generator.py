"""The committed fixtures are exactly what the generator makes with torch 2.13.0 (skipped without torch)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.torch

from tests.fixtures import generate  # noqa: E402
from tests.test_pytorch_fixtures import FIXTURES, load  # noqa: E402


@pytest.mark.skipif(torch.__version__.split("+")[0] != generate.TORCH_VERSION, reason="fixtures need torch 2.13.0")
def test_committed_fixtures_match_a_fresh_generation(tmp_path):
    fresh = {p.name: p for p in generate.write_all(tmp_path)}
    assert sorted(fresh) == sorted(p.name for p in FIXTURES), "fixture set differs from the generator's configs"
    for path in FIXTURES:
        cfg_old, old = load(path)
        cfg_new, new = load(fresh[path.name])
        cfg_old.pop("torch_version"), cfg_new.pop("torch_version")
        assert cfg_old == cfg_new, path.name
        assert sorted(old) == sorted(new), path.name
        for key in ("x", "x_eval", "dy", "weight", "bias"):  # inputs: bit for bit
            if key in old:
                np.testing.assert_array_equal(old[key], new[key], err_msg=f"{path.name}: {key}")
        for key in old:  # torch's outputs: to the last bits (thread scheduling may reorder sums)
            np.testing.assert_allclose(old[key], new[key], rtol=1e-12 if "64" in path.name else 1e-6,
                                       atol=1e-12 if "64" in path.name else 1e-6, err_msg=f"{path.name}: {key}")
