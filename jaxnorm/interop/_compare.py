"""Where a port differs: PyTorch's per-module outputs, running statistics and gradients next to the JAX model's.

:func:`record_torch` runs the torch model with forward hooks on every module that holds parameters or buffers
and keeps what each one received and produced (eval and training mode), the running statistics after the
training-mode batch and, given a loss, every parameter's gradient: a :class:`Recording`, which saves to and loads
from an ``.npz`` file. :func:`compare_fixture` runs the JAX model on the same inputs and compares, module by
module, with no torch needed; :func:`compare` does both in one call. The JAX side sees each module's output
through an interceptor (linen), a temporary wrapper of the paired classes' ``__call__`` (NNX, on a merged copy)
or ``eqx.tree_at`` probes (Equinox); the model passed in is never changed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import json
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from jaxnorm import _tolerances
from jaxnorm.interop import _equinox, _linen, _nnx
from jaxnorm.interop import _pairing as pairing

MODES = ("eval", "train")
_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")
Layout = str | Callable[[np.ndarray], Any] | None


def _import_torch() -> Any:
    try:
        import torch
    except ImportError as error:
        raise ImportError(
            "jaxnorm.interop.compare and record_torch need PyTorch (pip install torch), which is never a runtime "
            "dependency of jaxnorm. To compare without torch, replay a fixture saved where torch is installed: "
            "compare(..., save='port.npz') there, compare_fixture('port.npz', jax_model, ...) here.") from error
    return torch


# ------------------------------------------------------------------------------------------- recording


@dataclasses.dataclass
class Call:
    """One call of a torch module: its positional tensor inputs and its (first) output, as NumPy arrays."""

    inputs: list[np.ndarray]
    output: np.ndarray


@dataclasses.dataclass
class ModeRecord:
    output: np.ndarray                    # the model's output
    calls: dict[str, list[Call]]          # torch module prefix -> its calls, in order
    order: list[str]                      # prefixes in the order of their first call


@dataclasses.dataclass
class Recording:
    """What PyTorch produced for one input: see :func:`record_torch`. ``save``/``load`` an ``.npz`` fixture."""

    inputs: list[np.ndarray]
    state_dict: dict[str, np.ndarray]             # the weights and buffers the model ran with
    modes: dict[str, ModeRecord]                  # "eval" and/or "train"
    train_state: dict[str, np.ndarray] | None     # the buffers after the training-mode batch
    grads: dict[str, np.ndarray] | None           # d loss / d parameter (training mode), by state_dict key

    def save(self, path: str) -> None:
        """Write an ``.npz`` file (NumPy arrays and one JSON index; no pickles) that :meth:`load` reads back."""
        arrays: dict[str, np.ndarray] = {}

        def ref(a: np.ndarray) -> str:
            key = f"a{len(arrays)}"
            arrays[key] = np.asarray(a)
            return key

        index = {
            "version": 1,
            "inputs": [ref(a) for a in self.inputs],
            "state_dict": {k: ref(v) for k, v in self.state_dict.items()},
            "modes": {mode: {"output": ref(m.output), "order": m.order,
                             "calls": {p: [{"inputs": [ref(a) for a in c.inputs], "output": ref(c.output)}
                                           for c in calls] for p, calls in m.calls.items()}}
                      for mode, m in self.modes.items()},
            "train_state": None if self.train_state is None else {k: ref(v) for k, v in self.train_state.items()},
            "grads": None if self.grads is None else {k: ref(v) for k, v in self.grads.items()},
        }
        np.savez_compressed(path, **{"index": np.asarray(json.dumps(index)), **arrays})  # type: ignore[arg-type]

    @classmethod
    def load(cls, path: str) -> Recording:
        with np.load(path, allow_pickle=False) as data:
            index = json.loads(str(data["index"]))
            if index.get("version") != 1:
                raise ValueError(f"Recording.load: {path!r} is not a jaxnorm comparison fixture (version 1).")
            get = lambda key: np.asarray(data[key])
            table = lambda refs: None if refs is None else {k: get(v) for k, v in refs.items()}
            modes = {mode: ModeRecord(get(m["output"]), {p: [Call([get(a) for a in c["inputs"]], get(c["output"]))
                                                              for c in calls] for p, calls in m["calls"].items()},
                                      list(m["order"]))
                     for mode, m in index["modes"].items()}
            return cls([get(a) for a in index["inputs"]], table(index["state_dict"]) or {}, modes,
                       table(index["train_state"]), table(index["grads"]))


def _as_tuple(inputs: Any) -> tuple:
    return tuple(inputs) if isinstance(inputs, list | tuple) else (inputs,)


def _first_tensor(value: Any) -> Any:
    while isinstance(value, list | tuple) and value:
        value = value[0]
    return value


def record_torch(torch_model: Any, inputs: Any, *, loss: Callable[[Any], Any] | None = None,
                 modes: Sequence[str] = MODES, rename: Mapping[str, Any] | None = None) -> Recording:
    """Run ``torch_model`` on ``inputs`` (an array or a tuple of them, NumPy or torch) and record, for every
    module that holds parameters or buffers: each call's positional tensor inputs and first output, in eval mode
    (under ``torch.no_grad``) and in training mode; the running statistics after the training-mode batch; and,
    with ``loss`` (a function of the model's output giving a scalar), every parameter's gradient in training mode.
    ``rename`` maps state_dict keys to the keys the port converts (``"block.gamma"`` -> ``"block.norm.weight"``);
    a key mapped to None is dropped, one mapped to a tuple of keys is split evenly along its first axis into them
    (a fused ``"qkv.weight"`` -> ``("q.weight", "k.weight", "v.weight")``). The model's weights, buffers, gradients
    and mode are left as they were.
    """
    torch = _import_torch()
    for mode in modes:
        if mode not in MODES:
            raise ValueError(f"record_torch: `modes` holds {mode!r}; the modes are {MODES}.")
    renamed = functools.partial(_renamed, rename=dict(rename or {}))
    as_numpy = lambda t: t.detach().cpu().numpy().copy()
    device = next((p.device for p in torch_model.parameters()), None)
    tensors = [torch.as_tensor(a, device=device) for a in _as_tuple(inputs)]
    before = {k: v.detach().clone() for k, v in torch_model.state_dict().items()}
    owners = set(pairing.torch_modules(before))
    modules = {name: m for name, m in torch_model.named_modules() if name in owners}
    was_training = torch_model.training
    recorded: dict[str, ModeRecord] = {}
    train_state = grads = None
    try:
        for mode in modes:
            calls: dict[str, list[Call]] = {}

            def hook(prefix: str, calls: dict[str, list[Call]] = calls) -> Callable:
                def record(module: Any, args: tuple, output: Any) -> None:
                    output = _first_tensor(output)
                    if isinstance(output, torch.Tensor):
                        ins = [as_numpy(a) for a in args if isinstance(a, torch.Tensor)]
                        calls.setdefault(prefix, []).append(Call(ins, as_numpy(output)))
                return record

            handles = [m.register_forward_hook(hook(name)) for name, m in modules.items()]
            try:
                torch_model.train(mode == "train")
                with torch.no_grad() if mode == "eval" or loss is None else contextlib.nullcontext():
                    out = _first_tensor(torch_model(*tensors))
                if mode == "train":
                    buffers = dict(torch_model.named_buffers())
                    train_state = renamed({k: as_numpy(v) for k, v in buffers.items()})
                    if loss is not None:
                        params = {k: p for k, p in torch_model.named_parameters() if p.requires_grad}
                        values = torch.autograd.grad(loss(out), list(params.values()), allow_unused=True)
                        grads = renamed({k: as_numpy(g) for k, g in zip(params, values, strict=True) if g is not None})
            finally:
                for handle in handles:
                    handle.remove()
            recorded[mode] = ModeRecord(as_numpy(out), calls, list(calls))
    finally:
        with torch.no_grad():
            torch_model.load_state_dict(before)
        torch_model.train(was_training)
    return Recording([as_numpy(t) for t in tensors], renamed({k: as_numpy(v) for k, v in before.items()}),
                     recorded, train_state, grads)


def _renamed(table: Mapping[str, Any], rename: Mapping[str, Any]) -> dict[str, Any]:
    """``table`` with its keys renamed, dropped (None) or split (a tuple of keys: even parts along axis 0)."""
    out: dict[str, Any] = {}
    for key, value in table.items():
        new = rename.get(key, key)
        if new is None:
            continue
        if isinstance(new, tuple | list):
            out.update(zip(new, np.split(np.asarray(value), len(new)), strict=True))
        else:
            out[new] = value
    return out


# ------------------------------------------------------------------------------------------- layouts


def _layout_fn(layout: Layout) -> Callable[[np.ndarray], Any]:
    if layout is None:
        return lambda a: a
    if layout == "channels_last":  # images and volumes: NC... -> N...C; tokens (N, L, D), (N, C) are left alone
        return lambda a: np.moveaxis(a, 1, -1) if np.ndim(a) >= 4 else a
    if callable(layout):
        return layout
    raise ValueError(f"compare: layout={layout!r}; pass None (the same layout as torch), 'channels_last' "
                     "(NCHW -> NHWC for every array of rank 4 or more) or a function of a NumPy array.")


def _by_prefix(table: Mapping[str, Any], prefix: str, default: Any) -> Any:
    """The value of the longest key of ``table`` that is ``prefix`` or one of its parent modules."""
    parents = [prefix[:i] for i in range(len(prefix), 0, -1) if i == len(prefix) or prefix[i] == "."]
    return next((table[p] for p in parents if p in table), default)


# ------------------------------------------------------------------------------------------- the report


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


def _phase(row: Row) -> str:
    return "grads" if row.quantity.startswith("grad") else "stats" if row.quantity in _BUFFERS else row.mode


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
            phase = _phase(row)
            where = position.get(row.module)
            # a module torch never called through its forward comes after every module that was
            rank = math.inf if where is None else -where if phase == "grads" else where
            return ({"eval": 0, "train": 0, "stats": 1, "grads": 2}[phase], rank, row.mode != "eval")
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
            for phase, _ in _COLUMNS:
                group = [r for r in rows if _phase(r) == phase and not r.skipped]
                if not group and any(_phase(r) == phase for r in rows):
                    cells.append("n/a (nested)")
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


def _row(module: str, path: str, mode: str, quantity: str, actual: Any, expected: np.ndarray,
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


# ------------------------------------------------------------------------------------------- the JAX side


_MISSING = object()


def _trace_level() -> Any:
    """Which JAX transformation is running (Flax NNX's own test for a Variable updated across one)."""
    from jax.extend.core import get_opaque_trace_state

    return get_opaque_trace_state(convention="nnx")


class _Probes:
    """The per-call hook every probed JAX module goes through: records its output and, in isolated mode, swaps
    its array arguments for the ones its torch twin received."""

    def __init__(self, paths: Sequence[str], isolated: Mapping[str, list[list[Any]]] | None,
                 nested: set[str]):
        self.records: dict[str, list[Any]] = {p: [] for p in paths}
        self.isolated = isolated
        self.nested = nested  # paths called inside a transformation of the model's own: not recorded
        self.level = _trace_level()

    def call(self, path: str, fn: Callable, args: tuple, kwargs: dict) -> Any:
        import jax.numpy as jnp

        if _trace_level() != self.level:  # e.g. an Equinox Linear under the model's own jax.vmap over positions:
            self.nested.add(path)  # its output exists only inside that vmap, so it cannot be compared
            return fn(*args, **kwargs)
        calls = self.records[path]
        if self.isolated is not None and path in self.isolated and len(calls) < len(self.isolated[path]):
            given, replaced = self.isolated[path][len(calls)], list(args)
            for i, value in enumerate(given[:len(args)]):
                if np.shape(value) != np.shape(args[i]):
                    raise ValueError(
                        f"compare(isolated=True): the torch twin of {path!r} received an input of shape "
                        f"{np.shape(value)} (after the layout) where the JAX module takes {np.shape(args[i])}; pass "
                        "layouts= for this module, or compare it chained.")
                replaced[i] = jnp.asarray(value, dtype=jnp.result_type(args[i]))
            args = tuple(replaced)
        out = fn(*args, **kwargs)
        calls.append(_first_tensor(out))
        return out


def _flag_kwargs(fn: Any, train: bool) -> dict[str, Any]:
    """``train=`` or ``use_running_average=`` where the call takes it (the usual Flax conventions)."""
    try:
        parameters = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # pragma: no cover - builtins
        return {}
    if "train" in parameters:
        return {"train": train}
    if "use_running_average" in parameters:
        return {"use_running_average": not train}
    return {}


class _Linen:
    def __init__(self, model: Any, variables: Any, eval_kwargs: Mapping | None, train_kwargs: Mapping | None):
        import jax

        if variables is None:
            raise TypeError("compare: a linen model needs its variables: compare(..., variables=variables).")
        self.model, self.variables = model, jax.tree.map(np.asarray, dict(variables))
        self.kwargs = {False: dict(eval_kwargs if eval_kwargs is not None else _flag_kwargs(model.__call__, False)),
                       True: dict(train_kwargs if train_kwargs is not None else _flag_kwargs(model.__call__, True))}

    def derive(self, state_dict, inputs, names, kinds):
        return _linen.derive_linen(state_dict, self.model, tuple(inputs), self.kwargs[False], names=names,
                                   kinds=kinds, lenient=True)

    def run(self, inputs, train, paths, isolated):
        import flax.linen as nn
        import jax

        nested: set[str] = set()

        def forward(variables, inputs, isolated):
            probes = _Probes(paths, isolated, nested)

            def intercept(next_fun, args, kwargs, context):
                path = "/".join(context.module.path)
                if context.method_name != "__call__" or path not in probes.records:
                    return next_fun(*args, **kwargs)
                return probes.call(path, next_fun, args, kwargs)

            with nn.intercept_methods(intercept):
                if train:
                    y, updates = self.model.apply(variables, *inputs, **self.kwargs[True], mutable=["batch_stats"])
                else:
                    y, updates = self.model.apply(variables, *inputs, **self.kwargs[False]), {}
            return y, probes.records, {**variables, **updates}

        y, records, after = jax.jit(forward)(self.variables, inputs, isolated)
        return y, records, after, nested

    def to_torch(self, after, names, kinds):
        return _linen.flax_to_torch(after, names, kinds=kinds)

    def grads(self, inputs, loss, names, kinds):
        import jax

        def objective(params):
            y, _ = self.model.apply({**self.variables, "params": params}, *inputs, **self.kwargs[True],
                                    mutable=["batch_stats"])
            return loss(_first_tensor(y))

        grads = jax.jit(jax.grad(objective))(self.variables["params"])
        with_grads = pairing.Names({p: n for p, n in names.items() if _has(grads, n)}, getattr(names, "kinds", {}))
        return _linen.flax_to_torch({"params": grads}, with_grads, kinds=kinds)


def _has(tree: Mapping, path: str) -> bool:
    from jaxnorm._tree import get_path

    return get_path(tree, path) is not None


@contextlib.contextmanager
def _wrapped_calls(classes: set[type], hook: Callable[[Any, Callable, tuple, dict], Any]):
    """Within the block, ``cls.__call__`` of each class goes through ``hook(self, original, args, kwargs)``."""
    saved = {cls: cls.__dict__.get("__call__", _MISSING) for cls in classes}
    for cls in classes:
        def wrapper(self, *args, __original=cls.__call__, **kwargs):
            return hook(self, __original, args, kwargs)
        cls.__call__ = wrapper  # type: ignore[method-assign, assignment]
    try:
        yield
    finally:
        for cls, original in saved.items():
            if original is _MISSING:
                del cls.__call__  # type: ignore[method-assign]
            else:
                cls.__call__ = original  # type: ignore[method-assign]


class _NNX:
    def __init__(self, model: Any):
        self.model = model

    def derive(self, state_dict, inputs, names, kinds):
        return _nnx.derive_nnx(state_dict, self.model, names=names, kinds=kinds, lenient=True)

    def _set_mode(self, module: Any, train: bool) -> None:
        module.train() if train else module.eval()

    def run(self, inputs, train, paths, isolated):
        import jax
        from flax import nnx

        graphdef, state = nnx.split(self.model)
        wanted, nested = set(paths), set()

        def forward(state, inputs, isolated):
            module = nnx.merge(graphdef, state)
            self._set_mode(module, train)
            objects = {_nnx.path_name(p): m for p, m in nnx.iter_modules(module) if _nnx.path_name(p) in wanted}
            targets = {id(m): path for path, m in objects.items()}
            probes, active = _Probes(paths, isolated, nested), set()

            def hook(obj, original, args, kwargs):
                if id(obj) not in targets or id(obj) in active:
                    return original(obj, *args, **kwargs)
                active.add(id(obj))
                try:
                    return probes.call(targets[id(obj)], lambda *a, **k: original(obj, *a, **k), args, kwargs)
                finally:
                    active.discard(id(obj))

            with _wrapped_calls({type(m) for m in objects.values()}, hook):
                y = module(*inputs)
            return y, probes.records, nnx.state(module, nnx.Any(nnx.Param, nnx.BatchStat))

        return (*jax.jit(forward)(state, inputs, isolated), nested)

    def to_torch(self, after, names, kinds):
        return _nnx.nnx_to_torch(self.model, names, kinds=kinds, state=after)

    def grads(self, inputs, loss, names, kinds):
        from flax import nnx

        module = nnx.clone(self.model)  # the copy's running statistics move; the model's do not
        self._set_mode(module, True)
        grads = nnx.jit(nnx.grad(lambda module: loss(_first_tensor(module(*inputs)))))(module)
        return _nnx.nnx_to_torch(self.model, names, kinds=kinds, state=grads)


class _Equinox:
    def __init__(self, model: Any, state: Any, axis_name: Any):
        self.model, self.state, self.axis_name = model, state, axis_name

    def derive(self, state_dict, inputs, names, kinds):
        return _equinox.derive_equinox(state_dict, self.model, self.state, names=names, kinds=kinds,
                                       lenient=True)

    def _call(self, model, inputs, state):
        out = model(*inputs, state) if state is not None else model(*inputs)
        return out if state is not None else (out, None)

    def run(self, inputs, train, paths, isolated):
        import equinox as eqx
        import jax

        model = eqx.nn.inference_mode(self.model, value=not train)
        _, _, steps = _equinox.equinox_modules(model, self.state)
        # deepest first: a module with bare parameters (probed) holds probed submodules
        probed = model
        for depth in sorted({len(steps[p]) for p in paths}, reverse=True):
            level = [p for p in paths if len(steps[p]) == depth]
            probed = eqx.tree_at(lambda m, level=level: [_equinox.resolve(m, steps[p]) for p in level], probed,
                                 [_Probe(_equinox.resolve(probed, steps[p]), p) for p in level])

        nested: set[str] = set()

        @eqx.filter_jit
        def forward(probed, state, inputs, isolated):
            def one(inputs, isolated):
                probes = _Probes(paths, isolated, nested)
                with _active(probes):
                    y, new = self._call(probed, inputs, state)
                return y, probes.records, new

            return jax.vmap(one, in_axes=(0, 0), out_axes=(0, 0, None), axis_name=self.axis_name)(inputs, isolated)

        y, records, new = forward(probed, self.state, inputs, isolated)
        return y, records, (model, new), nested

    def to_torch(self, after, names, kinds):
        model, state = after
        return _equinox.equinox_to_torch(model, state, names, kinds=kinds)

    def grads(self, inputs, loss, names, kinds):
        import equinox as eqx
        import jax

        model = eqx.nn.inference_mode(self.model, value=False)

        @eqx.filter_jit
        @eqx.filter_grad
        def objective(model, state, inputs):
            run = lambda inputs: self._call(model, inputs, state)
            y, _ = jax.vmap(run, out_axes=(0, None), axis_name=self.axis_name)(inputs)
            return loss(_first_tensor(y))

        return _equinox.equinox_to_torch(objective(model, self.state, inputs), None, names, kinds=kinds)


# the probes of the compare run in progress: a stack set only inside `_active`'s `with` block (as linen's
# nn.intercept_methods), so a probed Equinox model called outside it runs as the original
_ACTIVE: list[_Probes] = []


@contextlib.contextmanager
def _active(probes: _Probes):
    _ACTIVE.append(probes)
    try:
        yield
    finally:
        _ACTIVE.remove(probes)


@functools.cache
def _probe_class() -> type:
    import equinox as eqx

    class Probe(eqx.nn.StatefulLayer):
        """An Equinox module in a probed copy of the model: calls ``inner`` through the active probes."""

        inner: Any
        path: str = eqx.field(static=True)

        def is_stateful(self) -> bool:
            return isinstance(self.inner, eqx.nn.StatefulLayer) and self.inner.is_stateful()

        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            if not _ACTIVE:
                return self.inner(*args, **kwargs)
            return _ACTIVE[-1].call(self.path, self.inner, args, kwargs)

        def __getattr__(self, name: str) -> Any:  # the parent may read its child's fields
            if name.startswith("__") or name in ("inner", "path"):
                raise AttributeError(name)
            return getattr(self.inner, name)

    return Probe


def _Probe(inner: Any, path: str) -> Any:  # noqa: N802 - a class, made on first use (equinox is optional)
    return _probe_class()(inner, path)


# ------------------------------------------------------------------------------------------- compare


def _split_loss(loss: Any) -> tuple[Any, Any]:
    if loss is None:
        return None, None
    if isinstance(loss, tuple):
        if len(loss) != 2 or not all(callable(f) for f in loss):
            raise TypeError("compare: `loss` is one function of the output (used for both models) or a pair "
                            "(torch_loss, jax_loss).")
        return loss
    if not callable(loss):
        raise TypeError(f"compare: `loss` must be callable, got {type(loss).__name__}.")
    return loss, loss


def compare(torch_model: Any, jax_model: Any, inputs: Any, *, variables: Any = None, state: Any = None,
            names: Mapping[str, str] | None = None, kinds: Mapping[str, str] | None = None, layout: Layout = None,
            layouts: Mapping[str, Layout] | None = None, loss: Any = None, isolated: bool = False,
            modes: Sequence[str] = MODES, tolerance: Mapping[str, float] | None = None,
            tolerances: Mapping[str, Mapping[str, float]] | None = None, axis_name: Any = "batch",
            eval_kwargs: Mapping[str, Any] | None = None, train_kwargs: Mapping[str, Any] | None = None,
            rename: Mapping[str, Any] | None = None, save: str | None = None) -> Report:
    """Run a PyTorch model and its JAX port on the same input and report, module by module, how far apart they are.

    - ``jax_model``: a linen module (with ``variables=``), an NNX module, or an Equinox model (with its
      ``eqx.nn.State`` as ``state=``, called as ``model(*inputs, state) -> (y, state)``, or ``model(*inputs)``
      without state, under ``jax.vmap(..., axis_name=axis_name)`` over the batch).
    - ``inputs``: an array or a tuple of arrays in torch's layout; ``layout`` gives the JAX model its twin and maps
      every module's output the same way before comparing: None (the same layout), ``"channels_last"`` (NCHW ->
      NHWC, axis 1 to the end for every array of rank 4 or more: images and volumes; token arrays ``(N, L, D)``
      are left alone) or a function; ``layouts={prefix: ...}`` for modules whose arrays are laid out otherwise
      (e.g. ConvNeXt's LayerNorm after a permute: ``None``; a 1-D conv's ``(N, C, L)``: a function), a prefix
      covering its submodules too.
    - ``names``: torch prefix -> JAX path, as for the converters; derived by declaration order where left out.
    - Compared: every paired module's output (each call), in eval and in training mode (``modes``); the running
      statistics and ``num_batches_tracked`` after the training-mode batch; with ``loss`` (one function of the
      output for both models, or a pair ``(torch_loss, jax_loss)``), every parameter's gradient in training mode.
      Linen models get ``train=``/``use_running_average=`` where their call takes it (or ``eval_kwargs`` /
      ``train_kwargs``); NNX models ``.train()`` / ``.eval()`` on a copy; Equinox ``eqx.nn.inference_mode``.
    - ``isolated=True`` feeds each paired JAX module the exact inputs its torch twin received (recorded with
      forward hooks), so a fault shows at its own module even when errors pile up downstream. Gradients are always
      of the whole chained model.
    - Tolerances: ``|jax - torch| <= atol * max|torch| + rtol * |torch|`` per array, with the float32 "model" entry of
      jaxnorm's tolerance table (atol 3e-5, rtol 1e-5) for float32 arrays, or ``tolerance=dict(atol=, rtol=)``
      for all and ``tolerances={prefix: dict(...)}`` per module and its submodules; ``num_batches_tracked`` must be
      equal.
    - ``save="port.npz"`` also writes what PyTorch produced, for :func:`compare_fixture` to repeat the comparison
      without torch.

    Returns a :class:`Report`; ``report.assert_close()`` in a parity test. torch is imported here, not before.
    Neither model is changed. For an NNX model the paired classes' ``__call__`` is wrapped while compare runs, so
    do not call those classes from another thread meanwhile.
    """
    torch_loss, jax_loss = _split_loss(loss)
    recording = record_torch(torch_model, inputs, loss=torch_loss, modes=modes, rename=rename)
    if rename is None:  # the kinds a state_dict cannot tell (ConvTranspose, Embedding), from the torch model
        kinds = {**pairing.torch_kinds(torch_model), **(kinds or {})}
    if save is not None:
        recording.save(save)
    return compare_fixture(recording, jax_model, variables=variables, state=state, names=names, kinds=kinds,
                           layout=layout, layouts=layouts, loss=jax_loss, isolated=isolated, modes=modes,
                           tolerance=tolerance, tolerances=tolerances, axis_name=axis_name, eval_kwargs=eval_kwargs,
                           train_kwargs=train_kwargs)


def compare_fixture(fixture: str | Recording, jax_model: Any, *, variables: Any = None, state: Any = None,
                    names: Mapping[str, str] | None = None, kinds: Mapping[str, str] | None = None,
                    layout: Layout = None, layouts: Mapping[str, Layout] | None = None, loss: Any = None,
                    isolated: bool = False, modes: Sequence[str] | None = None,
                    tolerance: Mapping[str, float] | None = None,
                    tolerances: Mapping[str, Mapping[str, float]] | None = None, axis_name: Any = "batch",
                    eval_kwargs: Mapping[str, Any] | None = None,
                    train_kwargs: Mapping[str, Any] | None = None) -> Report:
    """:func:`compare` against a saved fixture (a path written by ``compare(..., save=path)`` or a
    :class:`Recording`), with no torch needed: the same arguments, ``loss`` being the JAX loss, and ``modes``
    defaulting to the modes the fixture holds."""
    import jax.numpy as jnp

    from jaxnorm.interop import framework

    recording = fixture if isinstance(fixture, Recording) else Recording.load(fixture)
    modes = list(recording.modes) if modes is None else list(modes)
    for mode in modes:
        if mode not in recording.modes:
            raise ValueError(f"compare: mode {mode!r} is not in the fixture, which holds {list(recording.modes)}.")
    if loss is not None and not callable(loss):
        raise TypeError(f"compare_fixture: `loss` must be a function of the JAX model's output, got {loss!r}.")
    kind = framework(jax_model)
    side: Any = (_Linen(jax_model, variables, eval_kwargs, train_kwargs) if kind == "linen" else
                 _NNX(jax_model) if kind == "nnx" else _Equinox(jax_model, state, axis_name))
    default = _layout_fn(layout)
    per_module = {prefix: _layout_fn(value) for prefix, value in (layouts or {}).items()}
    layout_of = lambda prefix: _by_prefix(per_module, prefix, default)
    jax_inputs = tuple(jnp.asarray(default(a)) for a in recording.inputs)
    names = side.derive(recording.state_dict, jax_inputs, names, kinds)
    kinds = dict(kinds or {})
    paths = list(dict.fromkeys(names.values()))
    tol_of = lambda prefix: _by_prefix(tolerances or {}, prefix, tolerance)
    rows: list[Row] = []
    order: list[str] = []
    for mode in modes:
        record = recording.modes[mode]
        order += [p for p in record.order if p not in order]
        isolated_inputs = None
        if isolated:
            isolated_inputs = {names[p]: [[layout_of(p)(a) for a in call.inputs] for call in calls]
                               for p, calls in record.calls.items() if p in names}
        y, outputs, after, nested = side.run(jax_inputs, mode == "train", paths, isolated_inputs)
        for prefix in record.order:
            if prefix not in names:
                continue
            path, calls, got = names[prefix], record.calls[prefix], outputs[names[prefix]]
            if path in nested:
                rows.append(Row(prefix, path, mode, "output", float("nan"), float("nan"), 0.0, 0.0, ok=True,
                                note="not compared: the JAX module runs inside a transformation of the model's own "
                                     "(e.g. a jax.vmap over positions), outside which its output does not exist",
                                skipped=True))
                continue
            for i, call in enumerate(calls):
                quantity = "output" if i == 0 else f"output (call {i + 1})"
                note = "" if i < len(got) else f"called {len(calls)} times by torch, {len(got)} by the JAX model"
                rows.append(_row(prefix, path, mode, quantity, got[i] if i < len(got) else None,
                                 np.asarray(layout_of(prefix)(call.output)), tol_of(prefix), note))
            if len(got) > len(calls):
                rows.append(_row(prefix, path, mode, f"output (call {len(calls) + 1})", None, np.zeros(()),
                                 tol_of(prefix), f"called {len(got)} times by the JAX model, {len(calls)} by torch"))
        rows.append(_row("(output)", "(output)", mode, "output", _first_tensor(y),
                         np.asarray(default(record.output)), tolerance))
        if mode == "train" and recording.train_state is not None:
            converted = side.to_torch(after, names, kinds)
            for key, expected in recording.train_state.items():
                prefix, _, leaf = key.rpartition(".")
                if prefix not in names or leaf not in _BUFFERS:
                    continue
                note = "" if key in converted else (
                    "the JAX module keeps no count (a BatchNorm with flax_momentum, or flax's own)"
                    if leaf == "num_batches_tracked" else "the JAX module keeps no running statistics")
                rows.append(_row(prefix, names[prefix], mode, leaf, converted.get(key), np.asarray(expected),
                                 tol_of(prefix), note))
    if recording.grads is not None and loss is not None and "train" in modes:
        # a gradient's scale is its module's largest gradient: a conv bias before a norm layer has a gradient that
        # is zero in exact arithmetic, and both frameworks' rounding noise, which only the weight's scale measures
        converted = side.grads(jax_inputs, loss, names, kinds)
        module_scale: dict[str, float] = {}
        for key, expected in recording.grads.items():
            prefix = key.rpartition(".")[0]
            module_scale[prefix] = max(module_scale.get(prefix, 0.0), float(np.max(np.abs(expected), initial=0.0)))
        for key, expected in recording.grads.items():
            prefix, _, leaf = key.rpartition(".")
            if prefix in names:
                rows.append(_row(prefix, names[prefix], "train", f"grad {leaf}", converted.get(key),
                                 np.asarray(expected), tol_of(prefix), scale=module_scale[prefix]))
    return Report(rows, order, {"linen": "Flax", "nnx": "NNX", "equinox": "Equinox"}[kind], isolated, dict(names))

