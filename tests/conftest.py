"""Strict JAX for every test: float64 available, rank promotion raises, 8 simulated CPU devices."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("MPLBACKEND", "Agg")

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_rank_promotion", "raise")

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
