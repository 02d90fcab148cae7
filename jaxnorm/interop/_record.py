"""Recording PyTorch for :func:`jaxnorm.interop.compare`: each module's inputs and output (eval and training mode),
the running statistics after the training-mode batch and every parameter's gradient, as a :class:`Recording`
that saves to and loads from an ``.npz`` fixture."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from jaxnorm.interop import _pairing as pairing

MODES = ("eval", "train")


def import_torch() -> Any:
    try:
        import torch
    except ImportError as error:
        raise ImportError(
            "jaxnorm.interop.compare and record_torch need PyTorch (pip install torch), which is never a runtime "
            "dependency of jaxnorm. To compare without torch, replay a fixture saved where torch is installed: "
            "compare(..., save='port.npz') there, compare_fixture('port.npz', jax_model, ...) here.") from error
    return torch


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


def as_tuple(inputs: Any) -> tuple:
    return tuple(inputs) if isinstance(inputs, list | tuple) else (inputs,)


def first_tensor(value: Any) -> Any:
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
    torch = import_torch()
    for mode in modes:
        if mode not in MODES:
            raise ValueError(f"record_torch: `modes` holds {mode!r}; the modes are {MODES}.")
    rename_keys = functools.partial(renamed, rename=dict(rename or {}))
    as_numpy = lambda t: t.detach().cpu().numpy().copy()
    device = next((p.device for p in torch_model.parameters()), None)
    tensors = [torch.as_tensor(a, device=device) for a in as_tuple(inputs)]
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
                    output = first_tensor(output)
                    if isinstance(output, torch.Tensor):
                        ins = [as_numpy(a) for a in args if isinstance(a, torch.Tensor)]
                        calls.setdefault(prefix, []).append(Call(ins, as_numpy(output)))
                return record

            handles = [m.register_forward_hook(hook(name)) for name, m in modules.items()]
            try:
                torch_model.train(mode == "train")
                with torch.no_grad() if mode == "eval" or loss is None else contextlib.nullcontext():
                    out = first_tensor(torch_model(*tensors))
                if mode == "train":
                    buffers = dict(torch_model.named_buffers())
                    train_state = rename_keys({k: as_numpy(v) for k, v in buffers.items()})
                    if loss is not None:
                        params = {k: p for k, p in torch_model.named_parameters() if p.requires_grad}
                        values = torch.autograd.grad(loss(out), list(params.values()), allow_unused=True)
                        grads = rename_keys({k: as_numpy(g) for k, g in zip(params, values, strict=True)
                                             if g is not None})
            finally:
                for handle in handles:
                    handle.remove()
            recorded[mode] = ModeRecord(as_numpy(out), calls, list(calls))
    finally:
        with torch.no_grad():
            torch_model.load_state_dict(before)
        torch_model.train(was_training)
    return Recording([as_numpy(t) for t in tensors], rename_keys({k: as_numpy(v) for k, v in before.items()}),
                     recorded, train_state, grads)


def renamed(table: Mapping[str, Any], rename: Mapping[str, Any]) -> dict[str, Any]:
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
