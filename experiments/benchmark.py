"""benchmark: jaxnorm vs flax.linen vs PyTorch, forward (train, eval) and forward+backward, on JAX's backend.

Command: ``python -m experiments benchmark [--runs 15] [--cases BN2d-a,LN] [--quick] [--out results]``
         On a GPU (JAX's default backend not the CPU) it also runs the large bfloat16 cases (``LARGE_CASES``),
         PyTorch on CUDA (eager, cuDNN where PyTorch uses it), jaxnorm with its Pallas row kernels for
         LayerNorm/RMSNorm (NVIDIA GPUs), and times each sample as several calls queued back to back (about 2 ms)
         and one synchronization. Every run reports achieved GB/s by the pass model (forward: read x, write y;
         forward+backward: read x, write y, read x and dy, write dx) as a percentage of the device's copy
         bandwidth, measured in the same run (the faster of a jitted ``x * a + b`` and torch's ``copy_``).
         ``python -m experiments benchmark --model resnet18 [--runs 15] [--quick]``: whole-model training steps
         per second (ResNet-18, 64x64 images, batch 32, SGD with momentum) with jaxnorm's BatchNorm vs
         ``flax.linen.BatchNorm`` in the same Flax model vs torchvision's resnet18 in PyTorch, plus eval; all three
         start from the same (ported) weights. Writes ``benchmark_model.json``.
Runtime: a few minutes on a 2-core CPU (``--quick``: tiny shapes, seconds; the test suite's smoke run).
For each case, in one process and on the same data: median milliseconds of >= ``--runs`` timed calls after a
warm-up, interleaved round-robin across implementations, each after a short idle gap and an untimed call
(``block_until_ready``; torch with all threads and ``torch.no_grad`` for the forward passes; the forward+backward
returns y, the statistics' update, dparams and dx, with the output's cotangent a runtime argument, as in
training), for jaxnorm
channels-last, jaxnorm NCHW, flax.linen (channels-last) and torch (NCHW) if installed; the XLA floor (one jitted
``x * a + b`` over the same tensor); and the compiled forward+backward programs' memory (temp + output bytes from
``memory_analysis()``) for jaxnorm and Flax. Ratios are medians of per-round ratios. Writes ``benchmark.json``
and prints the tables.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import pathlib
import statistics
import time
from collections.abc import Callable

# name: (layer, shape in NCHW / (N, C) / (N, D), dtype, extra)
CASES = {
    "BN2d 32x64x56x56": ("bn", (32, 64, 56, 56), "float32", {}),
    "BN2d 128x256x14x14": ("bn", (128, 256, 14, 14), "float32", {}),
    "BN1d 4096x1024": ("bn", (4096, 1024), "float32", {}),
    "BN1d 64x10": ("bn", (64, 10), "float32", {}),
    "LN 4096x768": ("ln", (4096, 768), "float32", {}),
    "GN(32) 16x256x32x32": ("gn", (16, 256, 32, 32), "float32", {"groups": 32}),
    "IN 16x64x64x64": ("in", (16, 64, 64, 64), "float32", {}),
    "RMSNorm 4096x768": ("rms", (4096, 768), "float32", {}),
    "BN2d bf16 32x64x56x56": ("bn", (32, 64, 56, 56), "bfloat16", {}),
}
# realistic accelerator shapes (bf16), run by default where JAX's backend is not the CPU (select them on the CPU
# with --cases): transformer rows, a ResNet stem's BatchNorm (NHWC) and a diffusion UNet's GroupNorm
LARGE_CASES = {
    "LN bf16 16384x4096": ("ln", (16384, 4096), "bfloat16", {}),
    "LN bf16 4096x8192": ("ln", (4096, 8192), "bfloat16", {}),
    "RMSNorm bf16 16384x4096": ("rms", (16384, 4096), "bfloat16", {}),
    "RMSNorm bf16 4096x8192": ("rms", (4096, 8192), "bfloat16", {}),
    "BN2d bf16 256x64x56x56": ("bn", (256, 64, 56, 56), "bfloat16", {}),
    "GN(32) bf16 32x512x64x64": ("gn", (32, 512, 64, 64), "bfloat16", {"groups": 32}),
}
QUICK_SHAPES = {"bn": [(4, 3, 5, 5), (8, 6)], "ln": [(8, 6)], "gn": [(2, 8, 3, 3)], "in": [(2, 3, 4, 4)],
                "rms": [(8, 6)]}


SETTLE_S = 0.03  # idle time between implementations (see _interleaved_times)


def _interleaved_times(fns: dict[str, tuple[Callable[[], object], Callable[[object], object]]], runs: int,
                       settle: float = SETTLE_S, target_ms: float = 0.0) -> dict[str, list[float]]:
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
    times: dict[str, list[float]] = {k: [] for k in fns}
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


def _jax_fns(layer: str, shape, dtype, extra, impl: str):
    """(fwd_train, fwd_eval, fwd_bwd, args) for impl in {'jaxnorm', 'jaxnorm_nchw', 'jaxnorm_pallas',
    'pallas_vjp', 'flax'}.

    ``jaxnorm_pallas``: channels-last jaxnorm traced with ``jaxnorm.kernels`` enabled (the Pallas row kernel on
    NVIDIA GPUs; in Pallas' interpreter elsewhere, for the smoke test only); its backward is XLA's, as in the
    library. ``pallas_vjp`` (LayerNorm/RMSNorm over 2-D rows only): both kernels behind a ``jax.custom_vjp``, a
    prototype the library does not use (a custom_vjp loses forward mode), timed so that a GPU run shows what the
    backward kernel would gain: its forward equals ``jaxnorm_pallas``'s, its forward+backward is the number to
    compare. Flax computes in the input's dtype (``dtype=``), so every implementation reads and writes the same
    bytes (by default Flax would write float32 for a bfloat16 input, its float32 parameters promoting the output).
    """
    import contextlib

    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from jaxnorm import kernels
    from jaxnorm import linen as jl

    nchw = impl == "jaxnorm_nchw"
    channel_axis = 1 if nchw else -1
    xshape = shape if (nchw or len(shape) == 2 or layer in ("ln", "rms")) else (shape[0], *shape[2:], shape[1])
    key = jax.random.key(0)
    x = jax.random.normal(key, xshape, jnp.float32).astype(dtype) * 2 + 1
    g = jax.random.normal(jax.random.key(1), xshape, jnp.float32).astype(dtype)
    flax = impl == "flax"
    fx = {"dtype": jnp.dtype(dtype)}
    if layer == "bn":
        module = nn.BatchNorm(axis=channel_axis, momentum=0.9, **fx) if flax else jl.BatchNorm(axis=channel_axis)
    elif layer == "in":
        module = nn.InstanceNorm(use_scale=False, use_bias=False, feature_axes=channel_axis, **fx) if flax else \
            jl.InstanceNorm(axis=channel_axis)
    elif layer == "gn":
        module = nn.GroupNorm(num_groups=extra["groups"], reduction_axes=None, **fx) if flax else \
            jl.GroupNorm(num_groups=extra["groups"], axis=channel_axis)
        if flax and nchw:
            raise ValueError("flax GroupNorm is channels-last only")
    elif layer == "ln":
        module = nn.LayerNorm(epsilon=1e-5, **fx) if flax else jl.LayerNorm()
    else:
        module = nn.RMSNorm(epsilon=1e-6, **fx) if flax else jl.RMSNorm(epsilon=1e-6)
    stateful = layer == "bn"
    kw_train = {"use_running_average": False} if stateful else {}
    kw_eval = {"use_running_average": True} if stateful else {}
    if layer == "in" and not flax:
        kw_train = kw_eval = {}
    variables = module.init(key, x, **kw_eval)
    mut = {"mutable": ["batch_stats"]} if stateful else {}

    fwd_train = jax.jit(lambda v, x: module.apply(v, x, **kw_train, **mut))
    fwd_eval = jax.jit(lambda v, x: module.apply(v, x, **kw_eval))

    interpret = jax.default_backend() != "gpu"
    if impl == "pallas_vjp":
        rows = _kernel_pair(layer == "ln", module.epsilon, interpret)

        def forward(params, x):  # the kernels' own backward replaces autodiff of the layer
            return rows(params, x), None
    else:
        def forward(params, x):
            out = module.apply({**variables, "params": params}, x, **kw_train, **mut)
            return (out[0], out[1]) if stateful else (out, None)

    @jax.jit
    def fwd_bwd(params, x, g):
        # a training step's share: y (which the next layer reads) and the batch statistics' update, then dparams
        # and dx for the output's cotangent g. g is an argument, as in training: were it a constant closed over by
        # the jitted function, XLA would fold work that depends on dy alone (sum(dy) for dbias) into the compiled
        # program and leave it out of the timing
        y, vjp, updates = jax.vjp(forward, params, x, has_aux=True)
        return y, updates, vjp(g)

    params = variables.get("params", {})
    if impl in ("jaxnorm_pallas", "pallas_vjp"):
        context = lambda: kernels.pallas(interpret=interpret)  # read when each function is traced (first call)
    else:
        context = contextlib.nullcontext

    def call(f, *args):
        with context():
            return f(*args)

    return (lambda: call(fwd_train, variables, x)), (lambda: call(fwd_eval, variables, x)), \
        (lambda: call(fwd_bwd, params, x, g)), (fwd_bwd, params, x, g, context)


def _kernel_pair(centre: bool, eps: float, interpret: bool):
    """``f(params, x)``: LayerNorm (``centre``) or RMSNorm of 2-D rows by ``row_norm_forward``, differentiated by
    ``row_norm_backward`` through a ``jax.custom_vjp`` (reverse mode only)."""
    import jax

    from jaxnorm import kernels

    def forward(params, x):
        return kernels.row_norm_forward(x, params["scale"], params.get("bias"), eps, centre=centre,
                                        interpret=interpret)

    @jax.custom_vjp
    def rows(params, x):
        return forward(params, x)[0]

    def rows_fwd(params, x):
        y, mean, var = forward(params, x)
        return y, (params, x, mean, jax.lax.rsqrt(var + eps))

    def rows_bwd(residuals, dy):
        params, x, mean, rstd = residuals
        dx, dscale, dbias = kernels.row_norm_backward(x, dy, mean, rstd, params["scale"], centre=centre,
                                                      interpret=interpret)
        grads = {"scale": dscale.astype(params["scale"].dtype)}
        if "bias" in params:
            grads["bias"] = dbias.astype(params["bias"].dtype)
        return grads, dx

    rows.defvjp(rows_fwd, rows_bwd)
    return rows


def _floor(shape, dtype):
    import jax
    import jax.numpy as jnp

    x = jax.random.normal(jax.random.key(0), shape, jnp.float32).astype(dtype)
    f = jax.jit(lambda x, a, b: x * a + b)
    a, b = jnp.asarray(1.5, dtype), jnp.asarray(0.5, dtype)
    return lambda: f(x, a, b)


def _torch_device() -> str:
    """PyTorch's device for the benchmark: CUDA where JAX runs on a GPU and torch sees one, else the CPU."""
    import jax
    import torch

    return "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"


def _torch_sync(device: str) -> Callable[[object], object]:
    import torch

    if device == "cpu":
        return lambda out: out

    def sync(out):
        torch.cuda.synchronize()
        return out

    return sync


def _torch_fns(layer, shape, dtype, extra, device="cpu"):
    import torch

    tdtype = getattr(torch, dtype)
    x = (torch.randn(shape) * 2 + 1).to(device=device, dtype=tdtype)
    g = torch.randn(shape).to(device=device, dtype=tdtype)
    c = shape[1] if layer != "ln" and layer != "rms" else shape[-1]
    module = {"bn": lambda: (torch.nn.BatchNorm2d if len(shape) == 4 else torch.nn.BatchNorm1d)(c),
              "in": lambda: torch.nn.InstanceNorm2d(c), "gn": lambda: torch.nn.GroupNorm(extra["groups"], c),
              "ln": lambda: torch.nn.LayerNorm(c), "rms": lambda: torch.nn.RMSNorm(c, eps=1e-6)}[layer]()
    module = module.to(device=device, dtype=tdtype)

    def fwd(train):
        module.train(train)
        with torch.no_grad():
            return module(x)

    def fwd_bwd():
        module.train(True)
        xr = x.detach().requires_grad_(True)
        module.zero_grad(set_to_none=True)
        module(xr).backward(g)
        return xr.grad

    return (lambda: fwd(True)), (lambda: fwd(False)), fwd_bwd


def _memory(fwd_bwd, params, x, g, context) -> int:
    with context():
        stats = fwd_bwd.lower(params, x, g).compile().memory_analysis()
    return int(stats.temp_size_in_bytes + stats.output_size_in_bytes) if stats is not None else -1


def pass_bytes(shape, dtype) -> dict[str, int]:
    """Bytes each timed function must move at least, by the pass model: a forward reads x and writes y; a
    forward+backward also reads x and dy and writes dx (5 tensors). Parameters and statistics are negligible."""
    import jax.numpy as jnp
    import numpy as np

    nbytes = int(np.prod(shape)) * jnp.dtype(dtype).itemsize
    return {"fwd_train": 2 * nbytes, "fwd_eval": 2 * nbytes, "fwd_bwd": 5 * nbytes}


def _error_text(error: Exception) -> str:
    return f"{type(error).__name__}: {error}"[:2000]


def _leave_out(row: dict, impl: str, error: Exception) -> None:
    """Record why ``impl`` is missing from ``row`` and say so."""
    row.setdefault("errors", {})[impl] = _error_text(error)
    print(f"{row['case']}: {impl} failed, left out: {row['errors'][impl][:300]}", flush=True)


def run_case(name, layer, shape, dtype, extra, runs, with_torch, settle=SETTLE_S, pallas=False, target_ms=0.0):
    import jax

    sync = lambda out: jax.block_until_ready(out)
    fns = {("floor", ""): (_floor(shape, dtype), sync)}
    row = {"case": name, "shape": list(shape), "dtype": dtype, "bytes": pass_bytes(shape, dtype)}
    for impl in ("jaxnorm", "jaxnorm_nchw", "jaxnorm_pallas", "pallas_vjp", "flax"):
        if impl == "jaxnorm_nchw" and (len(shape) == 2 or layer in ("ln", "rms")):
            continue  # no channel axis to move
        if impl in ("jaxnorm_pallas", "pallas_vjp") and not (pallas and layer in ("ln", "rms") and len(shape) == 2):
            continue  # the kernels are for the row-wise layers
        try:
            ft, fe, fb, fb_args = _jax_fns(layer, shape, dtype, extra, impl)
            memory = _memory(*fb_args)
            _ = [sync(f()) for f in (ft, fe, fb)]  # compiled and run once here, so a failure is caught here
        except Exception as error:  # an optional column that fails is reported, not fatal
            if impl in ("jaxnorm", "flax"):
                raise
            _leave_out(row, impl, error)
            continue
        fns.update({(impl, "fwd_train"): (ft, sync), (impl, "fwd_eval"): (fe, sync), (impl, "fwd_bwd"): (fb, sync)})
        row[impl] = {"fwd_bwd_bytes": memory}
    if with_torch:
        import torch

        device = _torch_device()
        ft, fe, fb = _torch_fns(layer, shape, dtype, extra, device)
        tsync = _torch_sync(device)
        try:
            _ = [tsync(f()) for f in (ft, fe, fb)]
        except Exception as error:  # e.g. a dtype PyTorch lacks a kernel for on this device
            _leave_out(row, "torch", error)
        else:
            fns.update({("torch", "fwd_train"): (ft, tsync), ("torch", "fwd_eval"): (fe, tsync),
                        ("torch", "fwd_bwd"): (fb, tsync)})
            row["torch"] = {}
            row["torch_device"] = device
            row["torch_threads"] = torch.get_num_threads()
    times = _interleaved_times(fns, runs, settle, target_ms)
    for (impl, mode), ts in times.items():
        if impl == "floor":
            row["floor"] = statistics.median(ts)
        else:
            row[impl][mode] = statistics.median(ts)
    for impl in ("jaxnorm", "jaxnorm_nchw", "jaxnorm_pallas", "pallas_vjp", "flax", "torch"):
        if impl in row:  # achieved bandwidth by the pass model, GB/s
            row[impl]["gbps"] = {mode: row["bytes"][mode] / row[impl][mode] / 1e6 for mode in row["bytes"]}
    row["ratios"] = ratios(row, times)
    return row


def copy_bandwidth(nbytes: int, runs: int, with_torch: bool, target_ms: float = 0.0) -> dict:
    """The device's measured copy bandwidth, GB/s (read + write of ``nbytes``): one jitted ``x * a + b`` in JAX
    and ``y.copy_(x)`` in PyTorch on its device, interleaved; ``best`` is the faster, the 100% of the tables."""
    import jax
    import jax.numpy as jnp

    n = nbytes // 4
    x = jnp.ones((n,), jnp.float32)
    f = jax.jit(lambda x, a, b: x * a + b)
    a, b = jnp.asarray(1.5, jnp.float32), jnp.asarray(0.5, jnp.float32)
    fns = {"jax": (lambda: f(x, a, b), jax.block_until_ready)}
    if with_torch:
        import torch

        device = _torch_device()
        tx = torch.ones(n, device=device)
        ty = torch.empty_like(tx)
        fns["torch"] = (lambda: ty.copy_(tx), _torch_sync(device))
    times = _interleaved_times(fns, runs, 0.0, target_ms)
    out = {key: 2 * 4 * n / statistics.median(ts) / 1e6 for key, ts in times.items()}
    out["best"] = max(out.values())
    out["bytes"] = 4 * n
    return out


def ratios(row, times) -> dict:
    """jaxnorm / best peer and jaxnorm / floor as the median over rounds of the ratio within each round.

    A round times every implementation back to back, so its ratio cancels the slow phases of a shared machine
    that shift all of a round's timings together (the medians of the table move by up to 2x between runs here;
    these ratios much less). The best peer is the one with the lowest median time.
    """
    out = {}
    per_round = lambda a, b: statistics.median(x / y for x, y in zip(a, b, strict=True))
    for mode in ("fwd_train", "fwd_eval", "fwd_bwd"):
        best = min((p for p in ("flax", "torch") if p in row), key=lambda p: row[p][mode])
        out[f"{mode}/best_peer"] = per_round(times[("jaxnorm", mode)], times[(best, mode)])
        out[f"{mode}/floor"] = per_round(times[("jaxnorm", mode)], times[("floor", "")])
        for impl in ("jaxnorm_pallas", "pallas_vjp"):
            if impl in row:
                out[f"{mode}/{impl}/best_peer"] = per_round(times[(impl, mode)], times[(best, mode)])
    out["fwd_bwd_bytes/flax"] = row["jaxnorm"]["fwd_bwd_bytes"] / max(row["flax"]["fwd_bwd_bytes"], 1)
    return out


def format_bandwidth(rows, copy: dict) -> str:
    """Achieved GB/s by the pass model (forward 2 tensors, forward+backward 5) and % of the copy bandwidth."""
    present = lambda names: [i for i in names if any(i in r for r in rows)]
    fwd = present(("jaxnorm", "jaxnorm_pallas", "flax", "torch"))
    fb = present(("jaxnorm", "jaxnorm_pallas", "pallas_vjp", "flax", "torch"))  # pallas_vjp's fwd = Pallas fwd
    names = {"jaxnorm": "jaxnorm", "jaxnorm_pallas": "jaxnorm Pallas", "pallas_vjp": "both kernels (vjp)",
             "flax": "flax", "torch": "torch"}
    lines = [f"GB/s by the pass model (% of the measured copy bandwidth, {copy['best']:.0f} GB/s):", "",
             "| case | MB | " + " | ".join(f"{names[i]} fwd" for i in fwd) + " | "
             + " | ".join(f"{names[i]} f+b" for i in fb) + " |", "|---|---|" + "---|" * (len(fwd) + len(fb))]
    cell = lambda r, i, mode: (f"{r[i]['gbps'][mode]:.0f} ({100 * r[i]['gbps'][mode] / copy['best']:.0f}%)"
                               if i in r else "-")
    for r in rows:
        mb = r["bytes"]["fwd_train"] / 2 / 1e6
        lines.append(f"| {r['case']} | {mb:.1f} | " + " | ".join(cell(r, i, "fwd_train") for i in fwd) + " | "
                     + " | ".join(cell(r, i, "fwd_bwd") for i in fb) + " |")
    return "\n".join(lines)


def _ms(value: float) -> str:
    return f"{value:.2f}" if value >= 0.1 else f"{value:.3f}"  # accelerator cases take tens of microseconds


def format_tables(rows) -> str:
    head = ("| case | floor | jaxnorm fwd | NCHW fwd | flax fwd | torch fwd | jaxnorm eval | flax eval | torch eval "
            "| jaxnorm f+b | flax f+b | torch f+b |")
    lines = ["Milliseconds (median):", "", head, "|" + "---|" * 12]
    get = lambda r, impl, mode: _ms(r[impl][mode]) if impl in r else "-"
    for r in rows:
        cells = [get(r, impl, mode) for mode, impls in (("fwd_train", ("jaxnorm", "jaxnorm_nchw", "flax", "torch")),
                                                          ("fwd_eval", ("jaxnorm", "flax", "torch")),
                                                          ("fwd_bwd", ("jaxnorm", "flax", "torch"))) for impl in impls]
        lines.append(f"| {r['case']} | {_ms(r['floor'])} | " + " | ".join(cells) + " |")
    lines += ["", "Ratios (jaxnorm / best peer, jaxnorm / floor; memory: jaxnorm / flax, forward+backward):", "",
              "| case | train fwd / peer | f+b / peer | eval / floor | train fwd / floor | f+b memory / flax |",
              "|---|---|---|---|---|---|"]
    for r in rows:
        q = r["ratios"]
        lines.append(f"| {r['case']} | {q['fwd_train/best_peer']:.2f} | {q['fwd_bwd/best_peer']:.2f} | "
                     f"{q['fwd_eval/floor']:.2f} | {q['fwd_train/floor']:.2f} | {q['fwd_bwd_bytes/flax']:.2f} |")
    return "\n".join(lines)


def _model_fns(norm, torch_model, image, batch, quick):
    """(train_step, eval_step, sync) for the Flax ResNet with ``norm``, starting from ``torch_model``'s weights."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from experiments import models
    from jaxnorm import interop

    stages = (1, 1, 1, 1) if quick else (2, 2, 2, 2)
    model = models.ResNet(stage_sizes=stages, num_classes=10, norm=norm)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(batch, image, image, 3)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 10, batch), jnp.int32)
    state_dict = torch_model.state_dict()
    if norm is models.flax_batch_norm:  # flax's BatchNorm keeps no count
        state_dict = {k: v for k, v in state_dict.items() if not k.endswith("num_batches_tracked")}
    names = interop.derive_names(state_dict, model, x[:1])
    variables = jax.tree.map(jnp.asarray, interop.torch_to_flax(state_dict, names))
    tx = optax.sgd(0.01, momentum=0.9)

    @functools.partial(jax.jit, donate_argnums=0)
    def train_step(state, x, y):
        params, batch_stats, opt_state = state

        def loss(params):
            logits, updates = model.apply({"params": params, "batch_stats": batch_stats}, x, train=True,
                                          mutable=["batch_stats"])
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), updates["batch_stats"]

        grads, batch_stats = jax.grad(loss, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), batch_stats, opt_state

    evaluate = jax.jit(lambda v, x: model.apply(v, x, train=False))
    holder = {"state": (variables["params"], variables["batch_stats"], tx.init(variables["params"]))}

    def train():
        holder["state"] = train_step(holder["state"], x, y)
        return holder["state"]

    def eval_():
        params, batch_stats, _ = holder["state"]
        return evaluate({"params": params, "batch_stats": batch_stats}, x)

    return train, eval_


def _torch_model_fns(torch_model, image, batch):
    import numpy as np
    import torch

    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.normal(size=(batch, 3, image, image)).astype(np.float32))
    y = torch.from_numpy(rng.integers(0, 10, batch))
    opt = torch.optim.SGD(torch_model.parameters(), lr=0.01, momentum=0.9)

    def train():
        torch_model.train()
        loss = torch.nn.functional.cross_entropy(torch_model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def eval_():
        torch_model.eval()
        with torch.no_grad():
            return torch_model(x)

    return train, eval_


def run_model(model_name: str, runs: int, with_torch: bool, quick: bool, settle: float = SETTLE_S) -> dict:
    """Training steps and eval calls per second of a whole model, jaxnorm vs Flax vs PyTorch, interleaved."""
    import jax
    import torch

    from experiments import models

    if model_name != "resnet18":
        raise ValueError(f"unknown --model {model_name!r}; choose resnet18")
    image, batch = (32, 4) if quick else (64, 32)
    torchvision = models.torchvision_models()
    torch.manual_seed(0)
    torch_model = (torchvision.ResNet(torchvision.resnet.BasicBlock, [1, 1, 1, 1], num_classes=10) if quick
                   else torchvision.resnet18(num_classes=10))
    sync = lambda out: jax.block_until_ready(out)
    fns = {}
    for impl, norm in (("jaxnorm", models.jaxnorm_batch_norm), ("flax", models.flax_batch_norm)):
        train, eval_ = _model_fns(norm, torch_model, image, batch, quick)
        fns[(impl, "train")], fns[(impl, "eval")] = (train, sync), (eval_, sync)
    if with_torch:
        train, eval_ = _torch_model_fns(torch_model, image, batch)
        fns[("torch", "train")], fns[("torch", "eval")] = (train, lambda out: out), (eval_, lambda out: out)
    times = _interleaved_times(fns, runs, settle)
    per_round = lambda a, b: statistics.median(x / y for x, y in zip(a, b, strict=True))
    row = {"model": model_name + (" (quick: 1 block per stage)" if quick else ""), "image": image, "batch": batch,
           "runs": runs}
    for (impl, mode), ts in times.items():
        row.setdefault(impl, {})[f"{mode}_ms"] = statistics.median(ts)
        row[impl][f"{mode}_per_s"] = 1e3 / statistics.median(ts)
    for mode in ("train", "eval"):
        for peer in ("flax", "torch"):
            if (peer, mode) in times:  # time ratio: < 1 means jaxnorm is faster
                row[f"{mode}_time/{peer}"] = per_round(times[("jaxnorm", mode)], times[(peer, mode)])
    return row


def format_model_table(row) -> str:
    peers = [p for p in ("jaxnorm", "flax", "torch") if p in row]
    lines = [f"{row['model']}, {row['image']}x{row['image']} images, batch {row['batch']} (median of {row['runs']}):",
             "", "| | " + " | ".join(peers) + " | jaxnorm / flax time | jaxnorm / torch time |",
             "|---|" + "---|" * (len(peers) + 2)]
    for mode, what in (("train", "training steps/s"), ("eval", "eval batches/s")):
        cells = [f"{row[p][f'{mode}_per_s']:.2f}" for p in peers]
        ratios = [f"{row[key]:.2f}" if (key := f"{mode}_time/{peer}") in row else "-" for peer in ("flax", "torch")]
        lines.append(f"| {what} | " + " | ".join(cells + ratios) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments benchmark", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--cases", default="", help="comma-separated case names (default: all)")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, 3 runs: a smoke test")
    parser.add_argument("--no-torch", action="store_true", help="skip PyTorch even if installed")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("results"))
    parser.add_argument("--model", choices=("resnet18",), default=None,
                        help="benchmark a whole model's training step instead of single layers (needs torch and "
                             "torchvision)")
    args = parser.parse_args(argv)
    try:
        import torch

        torch.set_num_threads(os.cpu_count() or 1)
        have_torch = True
    except ImportError:
        have_torch = False
    with_torch = have_torch and not args.no_torch
    if args.model:
        if not have_torch:
            parser.error("--model needs torch (pip install torch==2.13.0) and torchvision "
                         "(pip install torchvision==0.28.0 --no-deps): the model is ported from torchvision")
        runs = 3 if args.quick else max(args.runs, 15)
        row = run_model(args.model, runs, with_torch, args.quick, 0.0 if args.quick else SETTLE_S)
        import jax

        row["meta"] = {"jax": jax.__version__, "devices": str(jax.devices()), "cpu_count": os.cpu_count(),
                       "torch": torch.__version__, "torch_threads": torch.get_num_threads()}
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "benchmark_model.json").write_text(json.dumps(row, indent=2))
        print(format_model_table(row))
        return 0
    import jax

    backend = jax.default_backend()
    accelerator = backend != "cpu"
    if args.quick:
        cases = {f"{layer} {'x'.join(map(str, s))}": (layer, s, "float32", {"groups": 2} if layer == "gn" else {})
                 for layer, shapes in QUICK_SHAPES.items() for s in shapes}
        runs, settle = 3, 0.0
    else:
        every = {**CASES, **LARGE_CASES}
        wanted = [c.strip() for c in args.cases.split(",") if c.strip()]
        unknown = [c for c in wanted if c not in every]
        if unknown:
            parser.error(f"unknown case(s) {unknown}; choose from {list(every)}")
        default = every if accelerator else CASES
        cases = {k: v for k, v in every.items() if k in wanted} if wanted else default
        # settle: the idle gap is for PyTorch's CPU threads (see _interleaved_times), not needed off the CPU
        runs, settle = max(args.runs, 15), (0.0 if accelerator else SETTLE_S)
    # the Pallas row kernels: measured on NVIDIA GPUs; interpreted in the smoke test, to keep its wiring tested
    pallas = backend == "gpu" or args.quick
    target_ms = 2.0 if accelerator else 0.0  # accelerators: queue several calls per timed sample
    copy_bytes = 4 << 20 if args.quick else (1 << 30 if accelerator else 64 << 20)
    copy = copy_bandwidth(copy_bytes, runs, with_torch, target_ms)
    print(f"copy bandwidth: {copy['best']:.1f} GB/s", flush=True)
    device = jax.devices()[0]
    meta = {"jax": jax.__version__, "backend": backend, "device_kind": device.device_kind,
            "devices": str(jax.devices()), "cpu_count": os.cpu_count(), "runs": runs, "settle_s": settle,
            "target_ms": target_ms, "copy_bandwidth_gbps": copy,
            "torch": __import__("torch").__version__ if with_torch else None,
            "torch_device": _torch_device() if with_torch else None}
    args.out.mkdir(parents=True, exist_ok=True)
    rows, failed = [], {}
    for name, (layer, shape, dtype, extra) in cases.items():
        try:
            row = run_case(name, layer, shape, dtype, extra, runs, with_torch, settle, pallas, target_ms)
        except Exception as error:  # one failing case must not lose the others' results
            failed[name] = _error_text(error)
            print(f"{name}: FAILED: {failed[name][:500]}", flush=True)
        else:
            rows.append(row)
            print(f"{name}: jaxnorm train fwd {row['jaxnorm']['fwd_train']:.3f} ms, floor {row['floor']:.3f} ms",
                  flush=True)
        # written after every case, so a run stopped by a time limit keeps what it measured
        (args.out / "benchmark.json").write_text(json.dumps({"meta": meta, "rows": rows, "failed": failed},
                                                            indent=2))
    print(format_tables(rows))
    print()
    print(format_bandwidth(rows, copy))
    return 1 if failed else 0
