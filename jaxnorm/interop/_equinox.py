"""PyTorch ``state_dict`` <-> Equinox models: ``eqx.nn.Linear``, ``eqx.nn.Conv*``, ``eqx.nn.ConvTranspose*`` and
``eqx.nn.Embedding`` weights (torch's layouts; a ConvTranspose's as Equinox keeps it, ``(out, in, *k)`` flipped),
the weights of jaxnorm.equinox norm layers (and of equinox's LayerNorm, GroupNorm and RMSNorm), and the running
statistics the jaxnorm.equinox layers keep in an ``eqx.nn.State``. Updated with ``eqx.tree_at`` and
``eqx.nn.State.set``."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

from jaxnorm.interop import _leaves as layouts
from jaxnorm.interop import _pairing as pairing
from jaxnorm.interop._probes import Probes, active, probe
from jaxnorm.interop._record import first_tensor

Step = tuple[str, Any]  # ("attr", field name) or ("item", index or key)


def _kind(module: Any) -> str | None:
    import equinox as eqx

    import jaxnorm.equinox as jeqx

    if isinstance(module, eqx.nn.Linear):
        return "linear"
    if isinstance(module, eqx.nn.ConvTranspose):
        return "conv_transpose"
    if isinstance(module, eqx.nn.Conv):
        return "conv"
    if isinstance(module, eqx.nn.Embedding):
        return "embedding"
    if isinstance(module, eqx.nn.MultiheadAttention):
        return "attention"
    norms = tuple(getattr(jeqx, n) for n in jeqx.__all__) + (eqx.nn.LayerNorm, eqx.nn.GroupNorm, eqx.nn.RMSNorm)
    return "norm" if isinstance(module, norms) else None


def _bare_arrays(module: Any) -> dict[str, Any]:
    """The floating-point arrays an Equinox module holds in its own fields (not in submodules)."""
    import jax.numpy as jnp

    values: dict[str, Any] = {f.name: getattr(module, f.name, None) for f in dataclasses.fields(module)}
    return {k: v for k, v in values.items() if hasattr(v, "dtype") and jnp.issubdtype(v.dtype, jnp.inexact)}


def walk(node: Any, steps: tuple[Step, ...] = ()) -> list[tuple[tuple[Step, ...], Any, str]]:
    """(steps, module, kind) for every convertible module, in declaration order (field order, then list order)."""
    import equinox as eqx

    found = []
    if isinstance(node, eqx.Module):
        kind = _kind(node)
        if kind is not None:
            return [(steps, node, kind)]
        if _bare_arrays(node):  # its own parameters (a class token), before its submodules', as torch lists them
            found.append((steps, node, "params"))
        for field in dataclasses.fields(node):
            found += walk(getattr(node, field.name, None), (*steps, ("attr", field.name)))
    elif isinstance(node, list | tuple):
        for i, item in enumerate(node):
            found += walk(item, (*steps, ("item", i)))
    elif isinstance(node, dict):
        for key, item in node.items():
            found += walk(item, (*steps, ("item", key)))
    return found


def path_of(steps: tuple[Step, ...]) -> str:
    return "/".join(str(key) for _, key in steps)


def _leaf(module: Any, name: str) -> Any:
    """``module``'s array ``name``; ``"query_proj/weight"`` is a submodule's."""
    for part in name.split("/"):
        module = getattr(module, part)
    return module


def resolve(node: Any, steps: tuple[Step, ...]) -> Any:
    for how, key in steps:
        node = getattr(node, key) if how == "attr" else node[key]
    return node


def module_leaves(module: Any, state: Any, kind: str | None = None) -> dict[str, Any]:
    """{name: array} of one convertible module: its weight and bias, and its running statistics in ``state``
    (``kind="params"``: its bare arrays)."""
    import equinox as eqx

    if kind == "params":
        return _bare_arrays(module)
    if isinstance(module, eqx.nn.MultiheadAttention):  # its four projections, as one module (torch's)
        return {f"{p}/{k}": getattr(getattr(module, p), k) for p in layouts.PROJECTIONS["equinox"]
                for k in ("weight", "bias") if getattr(getattr(module, p), k, None) is not None}
    leaves = {k: getattr(module, k) for k in ("weight", "bias") if getattr(module, k, None) is not None}
    index = getattr(module, "state_index", None)
    if index is not None:  # without a state, the initial values the index keeps (if it still does)
        stats = state.get(index) if state is not None else getattr(index, "init", None)
        if isinstance(stats, Mapping):
            leaves.update({k: v for k, v in stats.items() if k in layouts.STATS})
    return leaves


def equinox_modules(model: Any, state: Any) -> tuple[dict[str, dict[str, tuple[int, ...]]], dict[str, str],
                                                     dict[str, tuple[Step, ...]]]:
    shapes, kinds, steps = {}, {}, {}
    for where, module, kind in walk(model):
        path = path_of(where)
        shapes[path] = {k: tuple(np.shape(v)) for k, v in module_leaves(module, state, kind).items()}
        kinds[path], steps[path] = kind, where
    return shapes, kinds, steps


def _pair(state_dict: Mapping[str, Any], model: Any, state: Any, names: Mapping[str, str] | None,
          kinds: Mapping[str, str] | None, lenient: bool) -> tuple[pairing.Names, dict[str, tuple[Step, ...]]]:
    """(names, {path: steps}): the pairing, and where each paired module sits in the model."""
    if state is None and any(not isinstance(getattr(getattr(m, "state_index", None), "init", {}), Mapping)
                             for _, m, _ in walk(model)):
        raise TypeError("derive_names: this Equinox model keeps running statistics in an eqx.nn.State; pass it "
                        "after the model: derive_names(state_dict, model, state).")
    shapes, jax_kinds, steps = equinox_modules(model, state)
    return pairing.pair(pairing.torch_modules(state_dict), shapes, jax_kinds, fixed=dict(names or {}),
                        kinds=pairing.given_kinds(names, kinds), style="equinox", framework="Equinox",
                        who="derive_names", lenient=lenient), steps


def derive_equinox(state_dict: Mapping[str, Any], model: Any, state: Any, *, names: Mapping[str, str] | None,
                   kinds: Mapping[str, str] | None, lenient: bool = False) -> pairing.Names:
    return _pair(state_dict, model, state, names, kinds, lenient)[0]


def torch_to_equinox(state_dict: Mapping[str, Any], model: Any, state: Any = None,
                     names: Mapping[str, str] | None = None, *, kinds: Mapping[str, str] | None = None
                     ) -> tuple[Any, Any]:
    """Load a PyTorch ``state_dict`` into an Equinox model and its ``eqx.nn.State``; returns ``(model, state)``.

    Weights keep torch's layout (Equinox's convs and linears are ``(out, in, *k)`` and ``(out, in)``); a conv bias
    becomes ``(out, 1, ..., 1)``; running statistics go into ``state`` (``None`` for a model without any).
    ``names`` maps torch module prefixes to Equinox module paths (``"layers/0"``, ``"block/norm"``); the modules it
    leaves out are paired by declaration order (field order, then list order), each pair checked in kind and
    shapes. Values are cast to the model's dtypes. The model and state passed in are left as they were.
    """
    import equinox as eqx
    import jax
    import jax.numpy as jnp

    names, steps = _pair(state_dict, model, state, names, kinds, lenient=False)
    wheres, values = [], []
    state = None if state is None else jax.tree.map(lambda a: a, state)  # a copy: State.set uses up its input
    for prefix, leaves in pairing.group(state_dict, names, "torch_to_equinox").items():
        kind = names.kinds[prefix]
        pairing.check_leaves(prefix, kind, leaves, "torch_to_equinox")
        module = resolve(model, steps[names[prefix]])
        old = module_leaves(module, state, kind)
        converted = layouts.module_to_jax(kind, leaves, "equinox")
        new = {k: jnp.asarray(v, dtype=old[k].dtype) for k, v in converted.items()}
        for name, value in new.items():
            if name not in old or np.shape(old[name]) != value.shape:
                raise ValueError(f"torch_to_equinox: {prefix} -> {names[prefix]}/{name}: the state_dict gives shape "
                                 f"{value.shape}, the model holds {np.shape(old[name]) if name in old else 'nothing'}.")
        for name in new:
            if name not in layouts.STATS:
                wheres.append((steps[names[prefix]], name))
                values.append(new[name])
        stats = {k: v for k, v in new.items() if k in layouts.STATS}
        if stats:
            state = state.set(module.state_index, {**state.get(module.state_index), **stats})
    model = eqx.tree_at(lambda m: [_leaf(resolve(m, where), name) for where, name in wheres], model, values)
    return model, state


def equinox_to_torch(model: Any, state: Any, names: Mapping[str, str], *,
                     kinds: Mapping[str, str] | None = None) -> dict[str, np.ndarray]:
    """The inverse of :func:`torch_to_equinox`: a ``state_dict`` of NumPy arrays for the modules ``names`` maps.
    ``model`` may be a gradient pytree of the model (``eqx.filter_grad``'s result) with ``state=None``."""
    _, jax_kinds, steps = equinox_modules(model, state)
    out: dict[str, np.ndarray] = {}
    for prefix, path in names.items():
        if path not in steps:
            raise KeyError(f"equinox_to_torch: no convertible module at Equinox path {path!r} (torch module "
                           f"{prefix!r}).")
        leaves = module_leaves(resolve(model, steps[path]), state, jax_kinds[path])
        if state is None:
            leaves = {k: v for k, v in leaves.items() if k not in layouts.STATS}
        given = pairing.given_kinds(names, kinds)
        kind = pairing.resolve_kind(given.get(prefix, jax_kinds[path]), jax_kinds[path], prefix in given)
        for leaf, value in layouts.module_to_torch(kind, leaves, "equinox").items():
            out[f"{prefix}.{leaf}" if prefix else leaf] = value
    return out


# ------------------------------------------------------------------------------------------- compare's runner


class EquinoxRunner:
    def __init__(self, model: Any, state: Any, axis_name: Any):
        self.model, self.state, self.axis_name = model, state, axis_name

    def derive(self, state_dict, inputs, names, kinds):
        return derive_equinox(state_dict, self.model, self.state, names=names, kinds=kinds,
                                       lenient=True)

    def _call(self, model, inputs, state):
        out = model(*inputs, state) if state is not None else model(*inputs)
        return out if state is not None else (out, None)

    def run(self, inputs, train, paths, isolated):
        import equinox as eqx
        import jax

        model = eqx.nn.inference_mode(self.model, value=not train)
        _, _, steps = equinox_modules(model, self.state)
        # deepest first: a module with bare parameters (probed) holds probed submodules
        probed = model
        for depth in sorted({len(steps[p]) for p in paths}, reverse=True):
            level = [p for p in paths if len(steps[p]) == depth]
            probed = eqx.tree_at(lambda m, level=level: [resolve(m, steps[p]) for p in level], probed,
                                 [probe(resolve(probed, steps[p]), p) for p in level])

        nested: set[str] = set()

        @eqx.filter_jit
        def forward(probed, state, inputs, isolated):
            def one(inputs, isolated):
                probes = Probes(paths, isolated, nested)
                with active(probes):
                    y, new = self._call(probed, inputs, state)
                return y, probes.records, new

            return jax.vmap(one, in_axes=(0, 0), out_axes=(0, 0, None), axis_name=self.axis_name)(inputs, isolated)

        y, records, new = forward(probed, self.state, inputs, isolated)
        return y, records, (model, new), nested

    def to_torch(self, after, names, kinds):
        model, state = after
        return equinox_to_torch(model, state, names, kinds=kinds)

    def grads(self, inputs, loss, names, kinds):
        import equinox as eqx
        import jax

        model = eqx.nn.inference_mode(self.model, value=False)

        @eqx.filter_jit
        @eqx.filter_grad
        def objective(model, state, inputs):
            run = lambda inputs: self._call(model, inputs, state)
            y, _ = jax.vmap(run, out_axes=(0, None), axis_name=self.axis_name)(inputs)
            return loss(first_tensor(y))

        return equinox_to_torch(objective(model, self.state, inputs), None, names, kinds=kinds)
