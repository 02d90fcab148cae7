"""The printed tables: milliseconds, ratios, GB/s (columns from the implementations table), the whole model."""

from __future__ import annotations

from experiments.benchmark.implementations import IMPLEMENTATIONS, MODES, Implementation

LABELS = {"fwd_train": "fwd", "fwd_eval": "eval", "fwd_bwd": "f+b"}


def _ms(value: float) -> str:
    return f"{value:.2f}" if value >= 0.1 else f"{value:.3f}"  # accelerator cases take tens of microseconds


def format_tables(rows: list[dict], implementations: list[Implementation] = IMPLEMENTATIONS) -> str:
    """Milliseconds per implementation and mode (the columns each implementation lists in ``ms``), then ratios."""
    columns = [(impl, mode) for mode in MODES for impl in implementations if mode in impl.ms]
    head = "| case | floor | " + " | ".join(f"{impl.title} {LABELS[mode]}" for impl, mode in columns) + " |"
    lines = ["Milliseconds (median):", "", head, "|" + "---|" * (len(columns) + 2)]
    for r in rows:
        cells = [_ms(r[impl.name][mode]) if impl.name in r else "-" for impl, mode in columns]
        lines.append(f"| {r['case']} | {_ms(r['floor'])} | " + " | ".join(cells) + " |")
    lines += ["", "Ratios (jaxnorm / best peer, jaxnorm / floor; memory: jaxnorm / flax, forward+backward):", "",
              "| case | train fwd / peer | f+b / peer | eval / floor | train fwd / floor | f+b memory / flax |",
              "|---|---|---|---|---|---|"]
    for r in rows:
        q = r["ratios"]
        lines.append(f"| {r['case']} | {q['fwd_train/best_peer']:.2f} | {q['fwd_bwd/best_peer']:.2f} | "
                     f"{q['fwd_eval/floor']:.2f} | {q['fwd_train/floor']:.2f} | {q['fwd_bwd_bytes/flax']:.2f} |")
    return "\n".join(lines)


def format_bandwidth(rows: list[dict], copy: dict, implementations: list[Implementation] = IMPLEMENTATIONS) -> str:
    """Achieved GB/s by the pass model (forward 2 tensors, forward+backward 5) and % of the copy bandwidth, for
    the implementations present in some row (the columns each lists in ``gbps``)."""
    columns = [(impl, mode) for mode in ("fwd_train", "fwd_bwd") for impl in implementations
               if mode in impl.gbps and any(impl.name in r for r in rows)]
    lines = [f"GB/s by the pass model (% of the measured copy bandwidth, {copy['best']:.0f} GB/s):", "",
             "| case | MB | " + " | ".join(f"{impl.title} {LABELS[mode]}" for impl, mode in columns) + " |",
             "|---|---|" + "---|" * len(columns)]

    def cell(r, impl, mode):
        if impl.name not in r:
            return "-"
        gbps = r[impl.name]["gbps"][mode]
        return f"{gbps:.0f} ({100 * gbps / copy['best']:.0f}%)"

    for r in rows:
        mb = r["bytes"]["fwd_train"] / 2 / 1e6
        lines.append(f"| {r['case']} | {mb:.1f} | " + " | ".join(cell(r, i, m) for i, m in columns) + " |")
    return "\n".join(lines)


def format_model_table(row: dict) -> str:
    peers = [p for p in ("jaxnorm", "flax", "torch") if p in row]
    lines = [f"{row['model']}, {row['image']}x{row['image']} images, batch {row['batch']} (median of {row['runs']}):",
             "", "| | " + " | ".join(peers) + " | jaxnorm / flax time | jaxnorm / torch time |",
             "|---|" + "---|" * (len(peers) + 2)]
    for mode, what in (("train", "training steps/s"), ("eval", "eval batches/s")):
        cells = [f"{row[p][f'{mode}_per_s']:.2f}" for p in peers]
        ratios = [f"{row[key]:.2f}" if (key := f"{mode}_time/{peer}") in row else "-" for peer in ("flax", "torch")]
        lines.append(f"| {what} | " + " | ".join(cells + ratios) + " |")
    return "\n".join(lines)
