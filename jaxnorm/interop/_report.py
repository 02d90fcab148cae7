"""The report of :func:`jaxnorm.interop.compare`: one :class:`Row` per compared array, a :class:`Report` that ranks
the failures in the order the computation produced them and prints a table, one line per module."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from jaxnorm import _tolerances

BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


@dataclasses.dataclass(frozen=True)
class Row:
    """One compared array. ``max_rel`` is ``max_abs`` over the largest absolute value of PyTorch's array; ``ok``
    means every element is within ``atol * max|torch| + rtol * |torch|`` (exactly equal for
    ``num_batches_tracked``; a gradient's scale is its module's largest gradient)."""

    module: str       # the torch module's prefix; "(output)" for the model's output
    path: str         # the JAX module's path
    mode: str         # "eval" or "train"
    quantity: str     # "output", "output (call 2)", "running_mean", "running_var", "num_batches_tracked",
    max_abs: float    # "grad weight", "grad bias"
    max_rel: float
    atol: float
    rtol: float
    ok: bool
    note: str = ""
    skipped: bool = False  # not compared (``note`` says why)


def phase(row: Row) -> str:
    return "grads" if row.quantity.startswith("grad") else "stats" if row.quantity in BUFFERS else row.mode


_COLUMNS = (("eval", "eval output"), ("train", "train output"), ("stats", "running stats"), ("grads", "gradients"))


@dataclasses.dataclass
class Report:
    """Module by module, how far the JAX model is from PyTorch. ``rows`` are the numbers (one :class:`Row` per
    compared array); ``print(report)`` shows them as a table, one line per module; :meth:`assert_close` raises
    naming the first module beyond tolerance."""

    rows: list[Row]
    order: list[str]          # torch modules in the order they ran
    framework: str
    isolated: bool
    names: dict[str, str]

    @property
    def ok(self) -> bool:
        return all(row.ok for row in self.rows)

    @property
    def failures(self) -> list[Row]:
        """The rows beyond tolerance, in the order the computation produced them: module outputs in forward
        order (eval and training mode side by side), then running statistics in forward order, then gradients in
        backward order, so the first is where a port starts to differ."""
        position = {m: i for i, m in enumerate([*self.order, "(output)"])}

        def key(row: Row) -> tuple:
            kind = phase(row)
            where = position.get(row.module)
            # a module torch never called through its forward comes after every module that was
            rank = math.inf if where is None else -where if kind == "grads" else where
            return ({"eval": 0, "train": 0, "stats": 1, "grads": 2}[kind], rank, row.mode != "eval")
        return sorted((row for row in self.rows if not row.ok), key=key)

    @property
    def first(self) -> Row | None:
        """The first row beyond tolerance (see :attr:`failures`), or None."""
        failures = self.failures
        return failures[0] if failures else None

    def records(self) -> list[dict[str, Any]]:
        """The rows as plain dicts (e.g. for ``pandas.DataFrame(report.records())`` or JSON)."""
        return [dataclasses.asdict(row) for row in self.rows]

    def table(self) -> str:
        first = self.first
        by_module: dict[str, list[Row]] = {}
        for row in self.rows:
            by_module.setdefault(row.module, []).append(row)
        modules = [m for m in [*self.order, "(output)"] if m in by_module]
        modules += [m for m in by_module if m not in modules]
        header = ["torch module", f"{self.framework} module", *(title for _, title in _COLUMNS), ""]
        lines = []
        for module in modules:
            rows = by_module[module]
            cells = [module, rows[0].path]
            for column, _ in _COLUMNS:
                group = [r for r in rows if phase(r) == column and not r.skipped]
                if not group and any(phase(r) == column for r in rows):
                    cells.append("n/a (never called)" if "never called" in rows[0].note else "n/a (nested)")
                    continue
                if not group:
                    cells.append("-")
                    continue
                worst_abs, worst_rel = max(r.max_abs for r in group), max(r.max_rel for r in group)
                cells.append(f"{worst_abs:.1e} / {worst_rel:.1e}" + ("" if all(r.ok for r in group) else " !"))
            bad = [r for r in rows if not r.ok]
            cells.append("<- first" if first is not None and first.module == module else "" if not bad else "beyond")
            lines.append(cells)
        widths = [max(len(str(line[i])) for line in [header, *lines]) for i in range(len(header))]
        fmt = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()
        tol = next((r for r in self.rows if not r.skipped and r.quantity != "num_batches_tracked"), None)
        mode = "isolated" if self.isolated else "chained"
        out = [f"{self.framework} port vs PyTorch, {mode} (cells: max abs / max rel error; ! = beyond tolerance)",
               "tolerance per array: |jax - torch| <= atol * max|torch| + rtol * |torch|"
               + (f", atol={tol.atol:g}, rtol={tol.rtol:g}" if tol else ""),
               fmt(header), fmt(["-" * w for w in widths]), *map(fmt, lines)]
        if first is None:
            out.append(f"all {len(self.rows)} compared arrays within tolerance")
        else:
            out.append(f"first beyond tolerance: {first.module!r} ({self.framework} {first.path!r}), "
                       f"{first.mode} {first.quantity}: max abs {first.max_abs:.3g}, max rel {first.max_rel:.3g}"
                       + (f"; {first.note}" if first.note else ""))
        return "\n".join(out)

    def __str__(self) -> str:
        return self.table()

    def assert_close(self) -> None:
        """Raise ``AssertionError`` (with the table) unless every compared array is within tolerance."""
        first = self.first
        if first is not None:
            raise AssertionError(f"the port differs from PyTorch from module {first.module!r} on "
                                 f"({len(self.failures)} arrays beyond tolerance):\n{self.table()}")


def _tolerance(expected: np.ndarray, tolerance: Mapping[str, float] | None) -> dict[str, float]:
    if tolerance is not None:
        return {"atol": float(tolerance["atol"]), "rtol": float(tolerance["rtol"])}
    dtype = np.dtype(expected.dtype).name if np.issubdtype(expected.dtype, np.floating) else "float32"
    if dtype == "float32":
        return dict(_tolerances.tol("float32", "model"))
    return dict(_tolerances.DEFAULT.get(dtype, _tolerances.DEFAULT["float32"]))


def make_row(module: str, path: str, mode: str, quantity: str, actual: Any, expected: np.ndarray,
         tolerance: Mapping[str, float] | None, note: str = "", scale: float | None = None) -> Row:
    tol = _tolerance(expected, tolerance)
    if actual is None:
        return Row(module, path, mode, quantity, float("inf"), float("inf"), tol["atol"], tol["rtol"], ok=False,
                   note=note)
    actual = np.asarray(actual)
    if actual.shape != expected.shape:
        return Row(module, path, mode, quantity, float("inf"), float("inf"), tol["atol"], tol["rtol"], ok=False,
                   note=f"shape {actual.shape} (JAX) vs {expected.shape} (torch, after the layout); pass "
                        f"layouts={{{module!r}: ...}} if this module's arrays are laid out otherwise")
    a, b = actual.astype(np.float64), expected.astype(np.float64)
    if np.iscomplexobj(actual) or np.iscomplexobj(expected):
        a, b = actual.astype(np.complex128), expected.astype(np.complex128)
    error = np.abs(a - b)
    if scale is None:
        scale = float(np.max(np.abs(b))) if b.size else 0.0
    max_abs = float(np.max(error)) if error.size else 0.0
    if quantity == "num_batches_tracked":
        return Row(module, path, mode, quantity, max_abs, max_abs / max(scale, 1.0), 0.0, 0.0,
                   ok=bool(np.array_equal(a, b)), note=note)
    ok = bool(np.all(error <= tol["atol"] * scale + tol["rtol"] * np.abs(b)))
    return Row(module, path, mode, quantity, max_abs, max_abs / scale if scale else max_abs, tol["atol"], tol["rtol"],
               ok=ok, note=note)
