"""The suite without the optional extras: with torch and equinox unimportable every test module still collects,
and the tests that need them skip with a message that names the extra (run in a subprocess)."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
HIDE = "import sys; sys.modules['torch'] = None; sys.modules['equinox'] = None; import pytest; "


def _pytest(*args: str) -> subprocess.CompletedProcess:
    code = HIDE + f"sys.exit(pytest.main({list(args)!r}))"
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_suite_collects_and_skips_cleanly_without_torch_and_equinox():
    collected = _pytest("--collect-only", "-q", "-p", "no:cacheprovider", "tests")
    assert collected.returncode == 0, collected.stdout[-3000:] + collected.stderr[-3000:]
    summary = collected.stdout.strip().splitlines()[-1]
    assert "error" not in summary.lower() and int(summary.split()[0]) > 500, collected.stdout[-2000:]
    ran = _pytest("-q", "-rs", "-p", "no:cacheprovider", "tests/test_equinox.py", "tests/test_fixture_generator.py")
    assert ran.returncode in (0, pytest.ExitCode.NO_TESTS_COLLECTED), ran.stdout[-3000:]  # module-level skips
    assert "jaxnorm.equinox needs the optional extra: pip install 'jaxnorm[equinox]'" in ran.stdout
    assert "passed" not in ran.stdout.splitlines()[-1] and "skipped" in ran.stdout.splitlines()[-1]
