"""One per-layer case: every implementation that applies, timed interleaved, with bandwidth and ratios."""

from __future__ import annotations

import statistics

from experiments.benchmark.cases import pass_bytes
from experiments.benchmark.implementations import IMPLEMENTATIONS, LAYERS, MODES, Implementation, Setting
from experiments.benchmark.timing import SETTLE_S, floor, interleaved_times, per_round


def error_text(error: Exception) -> str:
    return f"{type(error).__name__}: {error}"[:2000]


def _leave_out(row: dict, impl: str, error: Exception) -> None:
    """Record why ``impl`` is missing from ``row`` and say so."""
    row.setdefault("errors", {})[impl] = error_text(error)
    print(f"{row['case']}: {impl} failed, left out: {row['errors'][impl][:300]}", flush=True)


def run_case(name: str, layer: str, shape: tuple, dtype: str, options: dict, runs: int, setting: Setting,
             settle: float = SETTLE_S, target_ms: float = 0.0,
             implementations: list[Implementation] = IMPLEMENTATIONS) -> dict:
    """The row of ``benchmark.json`` for one case: median milliseconds per implementation and mode, the floor,
    GB/s by the pass model, the compiled forward+backward's bytes, and the ratios."""
    import jax

    fns: dict[tuple[str, str], tuple] = {("floor", ""): (floor(shape, dtype), jax.block_until_ready)}
    row: dict = {"case": name, "shape": list(shape), "dtype": dtype, "bytes": pass_bytes(shape, dtype)}
    for impl in implementations:
        if not impl.applies(LAYERS[layer], shape, setting):
            continue
        try:
            built = impl.build(impl.name, layer, shape, dtype, options)
            memory = built.memory() if built.memory else None
            for mode in MODES:  # compiled and run once here, so a failure is caught here
                built.sync(getattr(built, mode)())
        except Exception as error:  # an optional column that fails is reported, not fatal
            if impl.required:
                raise
            _leave_out(row, impl.name, error)
            continue
        fns.update({(impl.name, mode): (getattr(built, mode), built.sync) for mode in MODES})
        row[impl.name] = {} if memory is None else {"fwd_bwd_bytes": memory}
        if impl.name == "torch":
            import torch

            from experiments.benchmark.implementations import torch_device

            row["torch_device"], row["torch_threads"] = torch_device(), torch.get_num_threads()
    times = interleaved_times(fns, runs, settle, target_ms)
    for (impl_name, mode), ts in times.items():
        if impl_name == "floor":
            row["floor"] = statistics.median(ts)
        else:
            row[impl_name][mode] = statistics.median(ts)
    for impl in implementations:
        if impl.name in row:  # achieved bandwidth by the pass model, GB/s
            row[impl.name]["gbps"] = {mode: row["bytes"][mode] / row[impl.name][mode] / 1e6 for mode in row["bytes"]}
    row["ratios"] = ratios(row, times, implementations)
    return row


def ratios(row: dict, times: dict, implementations: list[Implementation] = IMPLEMENTATIONS) -> dict:
    """jaxnorm / best peer (the peer with the lowest median) and jaxnorm / floor, each the median over rounds of
    the ratio within a round; the kernels' columns against the best peer too; memory against Flax."""
    out = {}
    peers = [i.name for i in implementations if i.role == "peer" and i.name in row]
    kernels = [i.name for i in implementations if i.role == "kernel" and i.name in row]
    for mode in MODES:
        best = min(peers, key=lambda p: row[p][mode])
        out[f"{mode}/best_peer"] = per_round(times[("jaxnorm", mode)], times[(best, mode)])
        out[f"{mode}/floor"] = per_round(times[("jaxnorm", mode)], times[("floor", "")])
        for impl in kernels:
            out[f"{mode}/{impl}/best_peer"] = per_round(times[(impl, mode)], times[(best, mode)])
    out["fwd_bwd_bytes/flax"] = row["jaxnorm"]["fwd_bwd_bytes"] / max(row["flax"]["fwd_bwd_bytes"], 1)
    return out
