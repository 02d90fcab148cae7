"""The timing harness: interleaved medians, the XLA floor and the copy bandwidth."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

SETTLE_S = 0.03  # idle time between implementations (see interleaved_times)


def interleaved_times(fns: dict[object, tuple[Callable[[], object], Callable[[object], object]]], runs: int,
                      settle: float = SETTLE_S, target_ms: float = 0.0) -> dict[object, list[float]]:
    """Milliseconds of ``runs`` timed calls of each ``(fn, sync)``, after two warm-up calls (compile).

    The calls are interleaved round-robin (one call of every function per round), so a slow phase of a shared
    machine hits every implementation alike instead of whichever happened to be running then. Within a round each
    implementation gets ``settle`` seconds idle, one untimed call, then its timed call: PyTorch's OpenMP workers
    spin for ~10 ms after a call returns, and on a 2-core machine that made the next JAX calls 2-5x slower
    (measured: the floor went from 4.0 to 9-20 ms right after a torch call, 4.1-4.5 ms after a 10-50 ms gap),
    while a torch call right after an idle gap pays for waking its sleeping workers (a 64x10 batch norm: 0.16 ms
    back to back, 0.74 ms after 30 ms idle). The untimed call wakes each framework's threads, as in a training
    loop, and the gap keeps one framework's spinning threads off the next one's cores.

    ``target_ms > 0`` (accelerators, where one call can take tens of microseconds, close to the cost of a launch
    and a synchronization): each timed sample is ``reps`` calls queued back to back and one synchronization,
    divided by ``reps``, with ``reps`` chosen per function so a sample lasts about ``target_ms``.
    """
    reps = {}
    for key, (fn, sync) in fns.items():
        sync(fn())
        start = time.perf_counter()
        sync(fn())
        once = (time.perf_counter() - start) * 1e3
        reps[key] = 1 if target_ms <= 0 else int(min(1000, max(1, round(target_ms / max(once, 1e-3)))))
    times: dict[object, list[float]] = {k: [] for k in fns}
    for _ in range(runs):
        for key, (fn, sync) in fns.items():
            if settle:
                time.sleep(settle)
            sync(fn())
            start = time.perf_counter()
            out = None
            for _ in range(reps[key]):
                out = fn()
            sync(out)
            times[key].append((time.perf_counter() - start) * 1e3 / reps[key])
    return times


def per_round(a: list[float], b: list[float]) -> float:
    """The median over rounds of the ratio within each round: a round times every implementation back to back, so
    its ratio cancels the slow phases of a shared machine that shift all of a round's timings together."""
    return statistics.median(x / y for x, y in zip(a, b, strict=True))


def floor(shape, dtype) -> Callable[[], object]:
    """One jitted ``x * a + b`` over a tensor of the case's shape: the least a normalization's forward can cost."""
    import jax
    import jax.numpy as jnp

    x = jax.random.normal(jax.random.key(0), shape, jnp.float32).astype(dtype)
    f = jax.jit(lambda x, a, b: x * a + b)
    a, b = jnp.asarray(1.5, dtype), jnp.asarray(0.5, dtype)
    return lambda: f(x, a, b)


def copy_bandwidth(nbytes: int, runs: int, with_torch: bool, target_ms: float = 0.0) -> dict:
    """The device's measured copy bandwidth, GB/s (read + write of ``nbytes``): one jitted ``x * a + b`` in JAX
    and ``y.copy_(x)`` in PyTorch on its device, interleaved; ``best`` is the faster, the 100% of the tables."""
    import jax
    import jax.numpy as jnp

    from experiments.benchmark.implementations import torch_device, torch_sync

    n = nbytes // 4
    x = jnp.ones((n,), jnp.float32)
    f = jax.jit(lambda x, a, b: x * a + b)
    a, b = jnp.asarray(1.5, jnp.float32), jnp.asarray(0.5, jnp.float32)
    fns: dict[object, tuple] = {"jax": (lambda: f(x, a, b), jax.block_until_ready)}
    if with_torch:
        import torch

        device = torch_device()
        tx = torch.ones(n, device=device)
        ty = torch.empty_like(tx)
        fns["torch"] = (lambda: ty.copy_(tx), torch_sync(device))
    times = interleaved_times(fns, runs, 0.0, target_ms)
    out = {key: 2 * 4 * n / statistics.median(ts) / 1e6 for key, ts in times.items()}
    out["best"] = max(out.values())
    out["bytes"] = 4 * n
    return out
