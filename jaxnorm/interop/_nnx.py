"""PyTorch ``state_dict`` <-> Flax NNX modules, through NNX's own state API (``nnx.state``,
``nnx.replace_by_pure_dict``, ``nnx.update``): conv and linear kernels, jaxnorm.nnx norm layers with their running
statistics and ``count``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from jaxnorm.interop import _leaves as layouts
from jaxnorm.interop import _pairing as pairing
from jaxnorm.interop._probes import Probes, wrapped_calls
from jaxnorm.interop._record import first_tensor


def _child(parent: Any, key: Any) -> Any:
    attributes = vars(parent) if hasattr(parent, "__dict__") else {}
    return attributes[str(key)] if str(key) in attributes else parent[key]


def _declaration_key(model: Any, path: tuple) -> tuple[int, ...]:
    """Where ``path`` sits in declaration order: each step's position among its parent's attributes in assignment
    order (``nnx.state`` sorts them by name), or its index in a list."""
    key, node = [], model
    for step in path:
        attributes = [a for a in (vars(node) if hasattr(node, "__dict__") else {}) if not a.startswith("_")]
        key.append(attributes.index(str(step)) if str(step) in attributes else int(step) if isinstance(step, int)
                   else 0)
        node = _child(node, step)
    return tuple(key)


def path_name(path: tuple) -> str:
    """An NNX module path as the converters name it: its steps joined by "/"."""
    return "/".join(str(step) for step in path)


def state_leaves(model: Any, state: Any = None) -> dict[tuple, dict[str, Any]]:
    """{module path (tuple): {name: array}} for every module that owns variables, in declaration order.
    ``state`` (an ``nnx.State`` of the model, e.g. its gradients) replaces the model's own values."""
    from flax import nnx

    state = nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat)) if state is None else state
    attention = {tuple(p) for p, m in nnx.iter_modules(model) if isinstance(m, nnx.MultiHeadAttention)}
    modules: dict[tuple, dict[str, Any]] = {}
    for path, variable in nnx.to_flat_state(state):
        value = variable.get_value() if hasattr(variable, "get_value") else variable
        owner, name = tuple(path[:-1]), str(path[-1])
        if owner[:-1] in attention:  # an attention's query/key/value/out: one module, as torch's
            owner, name = owner[:-1], f"{owner[-1]}/{name}"
        modules.setdefault(owner, {})[name] = value
    return {p: modules[p] for p in sorted(modules, key=lambda p: _declaration_key(model, p))}


def nnx_modules(model: Any) -> tuple[dict[str, dict[str, tuple[int, ...]]], dict[str, tuple]]:
    """({path: {name: shape}}, {path: path tuple}) in declaration order."""
    leaves = state_leaves(model)
    return ({path_name(p): {k: tuple(np.shape(v)) for k, v in vs.items()} for p, vs in leaves.items()},
            {path_name(p): p for p in leaves})


def module_kinds(model: Any, modules: Mapping[str, Mapping[str, tuple[int, ...]]]) -> dict[str, str]:
    """{path: kind} of the modules: a ConvTranspose or an Embed from its type, the rest from its variables."""
    from flax import nnx

    objects = {path_name(p): m for p, m in nnx.iter_modules(model)}

    def kind(path: str) -> str:
        module = objects.get(path)
        if isinstance(module, nnx.ConvTranspose):
            return pairing.FLAX_TRANSPOSED if module.transpose_kernel else "conv_transpose"
        if isinstance(module, nnx.Embed):
            return "embedding"
        if isinstance(module, nnx.MultiHeadAttention):
            return pairing.attention_kind(modules[path])
        return pairing.flax_variables_kind(modules[path])

    return {p: kind(p) for p in modules}


def _pair(state_dict: Mapping[str, Any], model: Any, modules: Mapping[str, Mapping[str, tuple[int, ...]]],
          names: Mapping[str, str] | None, kinds: Mapping[str, str] | None, lenient: bool) -> pairing.Names:
    return pairing.pair(pairing.torch_modules(state_dict), modules, module_kinds(model, modules),
                        fixed=dict(names or {}), kinds=pairing.given_kinds(names, kinds), style="flax",
                        framework="NNX", who="derive_names", lenient=lenient)


def derive_nnx(state_dict: Mapping[str, Any], model: Any, *, names: Mapping[str, str] | None,
               kinds: Mapping[str, str] | None, lenient: bool = False) -> pairing.Names:
    return _pair(state_dict, model, nnx_modules(model)[0], names, kinds, lenient)


def torch_to_nnx(state_dict: Mapping[str, Any], model: Any, names: Mapping[str, str] | None = None, *,
                 kinds: Mapping[str, str] | None = None) -> Any:
    """Load a PyTorch ``state_dict`` into an NNX model (in place, as ``nnx.update`` does) and return the model.

    ``names`` maps torch module prefixes to NNX module paths (``"layers/0/conv1"``); the modules it leaves out are
    paired by declaration order (:func:`derive_names`), each pair checked in kind and shapes. Every value is
    checked against the model's own shape and cast to its dtype (``num_batches_tracked`` -> the int32 ``count``).
    """
    from flax import nnx

    modules, tuples = nnx_modules(model)
    names = _pair(state_dict, model, modules, names, kinds, lenient=False)
    state = nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat))
    pure = nnx.to_pure_dict(state)
    for prefix, leaves in pairing.group(state_dict, names, "torch_to_nnx").items():
        kind = names.kinds[prefix]
        pairing.check_leaves(prefix, kind, leaves, "torch_to_nnx")
        node = pure
        for step in tuples[names[prefix]]:
            node = node[step]
        for name, value in layouts.module_to_jax(kind, leaves, "flax").items():
            *inner, leaf = name.split("/")  # an attention's query/kernel: its submodule's variable
            target = node
            for step in inner:
                target = target[step]
            target[leaf] = _cast(value, target.get(leaf), f"{prefix} -> {names[prefix]}/{name}", "torch_to_nnx")
    nnx.replace_by_pure_dict(state, pure)
    nnx.update(model, state)
    return model


def _cast(value: np.ndarray, old: Any, path: str, who: str) -> Any:
    import jax.numpy as jnp

    if old is None:
        raise KeyError(f"{who}: {path}: the model has no such variable.")
    if tuple(np.shape(old)) != value.shape:
        raise ValueError(f"{who}: {path}: the state_dict gives shape {value.shape}, the model holds "
                         f"{tuple(np.shape(old))}.")
    return jnp.asarray(value, dtype=old.dtype)


def nnx_to_torch(model: Any, names: Mapping[str, str], *, kinds: Mapping[str, str] | None = None,
                 state: Any = None) -> dict[str, np.ndarray]:
    """The inverse of :func:`torch_to_nnx`: the model's parameters and running statistics as a ``state_dict`` of
    NumPy arrays, for the modules ``names`` maps. ``state`` (an ``nnx.State`` of the model's parameters, e.g. the
    gradients ``nnx.grad`` returns) is converted in place of the model's own values."""
    leaves = {path_name(p): v for p, v in state_leaves(model, state).items()}
    shapes = {p: {k: tuple(np.shape(v)) for k, v in vs.items()} for p, vs in leaves.items()}
    jax_kinds, given = module_kinds(model, shapes), pairing.given_kinds(names, kinds)
    out: dict[str, np.ndarray] = {}
    for prefix, path in names.items():
        if path not in leaves:
            if state is not None:
                continue  # e.g. a gradient state: a module without parameters has none
            raise KeyError(f"nnx_to_torch: no convertible variables at NNX path {path!r} (torch module {prefix!r}).")
        kind = pairing.resolve_kind(given.get(prefix, jax_kinds[path]), jax_kinds[path], prefix in given)
        for leaf, value in layouts.module_to_torch(kind, leaves[path], "flax").items():
            out[f"{prefix}.{leaf}" if prefix else leaf] = value
    return out


# ------------------------------------------------------------------------------------------- compare's runner


class NNXRunner:
    def __init__(self, model: Any):
        self.model = model

    def derive(self, state_dict, inputs, names, kinds):
        return derive_nnx(state_dict, self.model, names=names, kinds=kinds, lenient=True)

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
            objects = {path_name(p): m for p, m in nnx.iter_modules(module) if path_name(p) in wanted}
            targets = {id(m): path for path, m in objects.items()}
            probes, active = Probes(paths, isolated, nested), set()

            def hook(obj, original, args, kwargs):
                if id(obj) not in targets or id(obj) in active:
                    return original(obj, *args, **kwargs)
                active.add(id(obj))
                try:
                    return probes.call(targets[id(obj)], lambda *a, **k: original(obj, *a, **k), args, kwargs)
                finally:
                    active.discard(id(obj))

            with wrapped_calls({type(m) for m in objects.values()}, hook):
                y = module(*inputs)
            return y, probes.records, nnx.state(module, nnx.Any(nnx.Param, nnx.BatchStat))

        return (*jax.jit(forward)(state, inputs, isolated), nested)

    def to_torch(self, after, names, kinds):
        return nnx_to_torch(self.model, names, kinds=kinds, state=after)

    def grads(self, inputs, loss, names, kinds):
        from flax import nnx

        module = nnx.clone(self.model)  # the copy's running statistics move; the model's do not
        self._set_mode(module, True)
        grads = nnx.jit(nnx.grad(lambda module: loss(first_tensor(module(*inputs)))))(module)
        return nnx_to_torch(self.model, names, kinds=kinds, state=grads)
