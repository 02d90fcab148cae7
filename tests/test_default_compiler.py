"""The suite compiles for speed (``FAST_COMPILE`` in conftest.py); users compile with XLA's defaults. This runs a
representative selection again, in a subprocess with XLA's default flags, so a difference between the two
configurations cannot hide: the compiled memory checks (where the fusion decisions matter most), the transform
matrix and the low-precision derivatives on the layers with the closed-form derivative rule, and one PyTorch
fixture per layer family in float32."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

from tests import registry, test_pytorch_fixtures, test_transforms

ROOT = pathlib.Path(__file__).resolve().parents[1]
# the closed-form derivative rule's paths: reduction over the batch (instance norm and the channels-last twin take
# the same one on other axes), the row path (layer norm), no mean (RMS norm), per-group statistics (group norm)
RULE_MODES = ["batch_norm/train/2d", "layer_norm", "rms_norm", "group_norm/channels_last"]


def _selection() -> list[str]:
    assert set(RULE_MODES) <= {m.name for m in registry.CORE_MODES}
    ids = ["tests/test_transforms.py::test_reverse_mode_saves_only_x_and_per_group_statistics",
           "tests/test_transforms.py::test_compiled_forward_backward_has_no_full_size_temporary"]
    ids += [f"tests/test_transforms.py::test_every_transformation_matches_the_textbook_formula_float64[{m}]"
            for m in RULE_MODES]
    ids += [f"tests/test_low_precision.py::test_first_order_transformations_in_low_precision[{m}-bfloat16]"
            for m in RULE_MODES]
    families: dict[str, str] = {}
    for path in sorted(test_pytorch_fixtures.FLOAT32_PER_CONFIGURATION):
        families.setdefault(path.stem.split("__")[0], path.stem)
    ids += [f"tests/test_pytorch_fixtures.py::test_matches_pytorch[{stem}]" for stem in families.values()]
    return ids


@pytest.mark.slow
def test_xla_default_flags_give_the_same_results():
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if f.startswith("--xla_force_host_platform")]
    env = {**os.environ, "JAXNORM_TEST_XLA": "default", "XLA_FLAGS": " ".join(flags)}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "0", *_selection()]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    tail = (done.stdout + done.stderr)[-4000:]
    assert done.returncode == 0, tail
    memory_checks = 2 * 2 * len(test_transforms.MEMORY_CASES)  # two tests, two dtypes, every case
    expected = len(_selection()) - 2 + memory_checks
    assert tail.strip().splitlines()[-1].startswith(f"{expected} passed"), tail
