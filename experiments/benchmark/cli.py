"""``python -m experiments benchmark``: the command line (see the package's docstring)."""

from __future__ import annotations

import argparse
import json
import os
import pathlib

from experiments.benchmark.cases import CASES, LARGE_CASES, quick_cases
from experiments.benchmark.implementations import Setting, torch_device
from experiments.benchmark.model import run_model
from experiments.benchmark.report import format_bandwidth, format_model_table, format_tables
from experiments.benchmark.runner import error_text, run_case
from experiments.benchmark.timing import SETTLE_S, copy_bandwidth


def main(argv: list[str] | None = None) -> int:
    import experiments.benchmark

    parser = argparse.ArgumentParser(prog="python -m experiments benchmark", description=experiments.benchmark.__doc__,
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
        cases, runs, settle = quick_cases(), 3, 0.0
    else:
        every = {**CASES, **LARGE_CASES}
        wanted = [c.strip() for c in args.cases.split(",") if c.strip()]
        unknown = [c for c in wanted if c not in every]
        if unknown:
            parser.error(f"unknown case(s) {unknown}; choose from {list(every)}")
        default = every if accelerator else CASES
        cases = {k: v for k, v in every.items() if k in wanted} if wanted else default
        # settle: the idle gap is for PyTorch's CPU threads (see timing.interleaved_times), not needed off the CPU
        runs, settle = max(args.runs, 15), (0.0 if accelerator else SETTLE_S)
    # the Pallas row kernels: measured on NVIDIA GPUs; interpreted in the smoke test, to keep its wiring tested
    setting = Setting(with_torch=with_torch, pallas=backend == "gpu" or args.quick)
    target_ms = 2.0 if accelerator else 0.0  # accelerators: queue several calls per timed sample
    copy_bytes = 4 << 20 if args.quick else (1 << 30 if accelerator else 64 << 20)
    copy = copy_bandwidth(copy_bytes, runs, with_torch, target_ms)
    print(f"copy bandwidth: {copy['best']:.1f} GB/s", flush=True)
    device = jax.devices()[0]
    meta = {"jax": jax.__version__, "backend": backend, "device_kind": device.device_kind,
            "devices": str(jax.devices()), "cpu_count": os.cpu_count(), "runs": runs, "settle_s": settle,
            "target_ms": target_ms, "copy_bandwidth_gbps": copy,
            "torch": __import__("torch").__version__ if with_torch else None,
            "torch_device": torch_device() if with_torch else None}
    args.out.mkdir(parents=True, exist_ok=True)
    rows, failed = [], {}
    for name, (layer, shape, dtype, extra) in cases.items():
        try:
            row = run_case(name, layer, shape, dtype, extra, runs, setting, settle, target_ms)
        except Exception as error:  # one failing case must not lose the others' results
            failed[name] = error_text(error)
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
