"""Strict JAX for every test: float64 available, rank promotion raises, 8 simulated CPU devices.

The suite's time is compiling (thousands of small programs, ~30 ms each with XLA's defaults), so the session
compiles for speed, not for fast programs:

- XLA:CPU's classic fusion emitters at backend optimization level 0 (``FAST_COMPILE``): about 3x faster compiles,
  and for these small programs no slower to run; the same HLO passes (fusion, memory planning) run, so the
  programs compute the same values to rounding, and the tolerances are unchanged. ``JAXNORM_TEST_XLA=default``
  runs the suite with XLA's default flags (the library as users compile it; ``.ci/run`` does this for the slow
  tier);
- a persistent compilation cache (``.jax_cache`` at the repository root, or ``$JAXNORM_JAX_CACHE``): a second
  run, and every mutation of ``tests/mutate.py``, compiles only what changed.
"""

import os
import pathlib

FAST_COMPILE = ("--xla_cpu_use_fusion_emitters=false", "--xla_backend_optimization_level=0")
_flags = os.environ.get("XLA_FLAGS", "").split()
if not any(f.startswith("--xla_force_host_platform_device_count") for f in _flags):
    _flags.append("--xla_force_host_platform_device_count=8")
if os.environ.get("JAXNORM_TEST_XLA", "fast") != "default":
    _flags += [f for f in FAST_COMPILE if f.split("=")[0] not in {g.split("=")[0] for g in _flags}]
os.environ["XLA_FLAGS"] = " ".join(_flags)
os.environ.setdefault("MPLBACKEND", "Agg")

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_compilation_cache_dir",
                  os.environ.get("JAXNORM_JAX_CACHE", str(pathlib.Path(__file__).resolve().parents[1] / ".jax_cache")))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)

try:  # hypothesis profiles: fast by default, HYPOTHESIS_PROFILE=thorough for the long run
    from hypothesis import HealthCheck, settings

    settings.register_profile("default", max_examples=25, deadline=None,
                              suppress_health_check=[HealthCheck.too_slow])
    settings.register_profile("thorough", max_examples=100, deadline=None,
                              suppress_health_check=[HealthCheck.too_slow])
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))
except ImportError:  # pragma: no cover
    pass


def pytest_terminal_summary(terminalreporter):
    """Print the largest error against PyTorch seen per layer, dtype and quantity (values vs gradients)."""
    from tests.test_pytorch_fixtures import MAX_ERRORS

    if not MAX_ERRORS:
        return
    terminalreporter.write_sep("-", "max |jaxnorm - PyTorch| over the fixtures")
    for (cls, dtype, what), err in sorted(MAX_ERRORS.items()):
        terminalreporter.write_line(f"{cls:16s} {dtype:8s} {what:6s} {err:.3e}")
