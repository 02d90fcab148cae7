"""PyTorch ``state_dict`` <-> Flax linen variables (``{"params": ..., "batch_stats": ...}``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from jaxnorm._tree import get_path, set_path
from jaxnorm.interop import _leaves as layouts
from jaxnorm.interop import _pairing as pairing
from jaxnorm.interop._probes import Probes, flag_kwargs, has_path
from jaxnorm.interop._record import first_tensor


def torch_to_flax(state_dict: Mapping[str, Any], names: Mapping[str, str], *,
                  kinds: Mapping[str, str] | None = None) -> dict[str, dict]:
    """Convert a PyTorch ``state_dict`` into Flax ``{"params": ..., "batch_stats": ...}`` (NumPy leaves).

    ``names`` maps each torch module prefix to the Flax module path ("/"-separated); :func:`derive_names` derives
    it, with the kind of each module (a ConvTranspose, an Embedding), which a state_dict's shapes cannot tell from
    a Conv or a Linear. ``kinds={"prefix": kind}`` names a module's kind by hand: ``"norm"`` for a LayerNorm or
    RMSNorm over 2+ trailing dims (whose 2-D weight looks like a Linear's), ``"conv_transpose"`` (into Flax's
    default ``ConvTranspose``) or ``"conv_transpose:transpose_kernel"`` (into ``ConvTranspose(transpose_kernel=
    True)``), ``"embedding"``.
    """
    kinds = pairing.given_kinds(names, kinds)
    out: dict[str, dict] = {"params": {}, "batch_stats": {}}
    for prefix, leaves in pairing.group(state_dict, names, "torch_to_flax").items():
        kind = pairing.torch_kind(prefix, {k: v.shape for k, v in leaves.items()}, kinds)
        pairing.check_leaves(prefix, kind, leaves, "torch_to_flax")
        for name, value in layouts.module_to_jax(kind, leaves, "flax").items():
            collection = "batch_stats" if name in layouts.STATS else "params"
            set_path(out[collection], f"{names[prefix]}/{name}" if names[prefix] else name, value)
    return {k: v for k, v in out.items() if v}


def flax_to_torch(variables: Mapping[str, Any], names: Mapping[str, str], *,
                  kinds: Mapping[str, str] | None = None) -> dict[str, np.ndarray]:
    """The inverse of :func:`torch_to_flax`: Flax variables -> a ``state_dict`` of NumPy arrays.

    ``names`` and ``kinds`` as there (a ConvTranspose's kernel looks like a Conv's: give the names derive_names
    returned, or ``kinds``). Load the result into a torch model with
    ``model.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()})``.
    """
    kinds = pairing.given_kinds(names, kinds)
    params, stats = variables.get("params", {}), variables.get("batch_stats", {})
    out: dict[str, np.ndarray] = {}
    for prefix, path in names.items():
        own = {**_at(params, path), **_at(stats, path)}
        if not own:
            raise KeyError(f"flax_to_torch: no variables at Flax path {path!r} (torch module {prefix!r}).")
        direct = {k: v for k, v in own.items() if "/" not in k}  # not its submodules'
        shapes = {k: np.shape(v) for k, v in own.items()}
        kind = kinds.get(prefix) or (pairing.attention_kind(shapes) if not direct and "query/kernel" in own
                                     else pairing.flax_variables_kind({k: shapes[k] for k in direct}))
        # a module's own variables; an attention's are its projections' (query/kernel, ...)
        leaves = {k: v for k, v in own.items() if "/" in k} if kind.startswith("attention") else direct
        for leaf, value in layouts.module_to_torch(kind, leaves, "flax").items():
            out[f"{prefix}.{leaf}" if prefix else leaf] = value
    return out


def _at(collection: Mapping[str, Any], path: str) -> dict[str, Any]:
    """The variables of the module at ``path``: its own, and its submodules' as ``"child/name"``."""
    node = collection if not path else get_path(collection, path)
    return pairing.flatten(node) if isinstance(node, Mapping) else {}


def flax_modules(model: Any, args: tuple, kwargs: dict) -> tuple[dict[str, dict[str, tuple[int, ...]]],
                                                                  dict[str, str]]:
    """``({module path: {variable: shape}}, {module path: kind})`` for every Flax module that owns convertible
    variables, in declaration order.

    Declaration order is the order of ``setup`` assignments, or of creation in a ``@compact`` method, at every
    level: after tracing ``model.init``, the bound root's children are walked depth first (every ``setup`` has run
    by then). A module found only by its call (none should be) comes after them, in the order of first calls.
    """
    import flax.linen as nn
    import jax

    called: dict[str, None] = {}
    roots: list[Any] = []

    def record(next_fun, call_args, call_kwargs, context):
        called.setdefault("/".join(context.module.path), None)
        if not context.module.path and not roots:
            roots.append(context.module)
        return next_fun(*call_args, **call_kwargs)

    kwargs = dict(kwargs)
    rngs = kwargs.pop("rngs", jax.random.key(0))  # e.g. rngs={"params": key, "dropout": key} for dropout

    def init():
        with nn.intercept_methods(record):
            return model.init(rngs, *args, **kwargs)

    shapes = jax.eval_shape(init)  # traces only: nothing is computed
    declared: dict[str, Any] = {"": roots[0] if roots else model}

    def children(module: Any, prefix: str) -> None:
        for name, child in getattr(getattr(module, "_state", None), "children", {}).items():
            if isinstance(child, nn.Module):
                path = f"{prefix}/{name}" if prefix else str(name)
                declared.setdefault(path, child)
                children(child, path)

    children(declared[""], "")
    modules: dict[str, dict[str, tuple[int, ...]]] = {}
    for path in [*declared, *(p for p in called if p not in declared)]:
        for collection in (shapes.get("params", {}), shapes.get("batch_stats", {})):
            node = get_path(collection, path) if path else collection
            if isinstance(node, Mapping):
                for name, leaf in node.items():
                    if not isinstance(leaf, Mapping):
                        modules.setdefault(path, {})[name] = tuple(leaf.shape)
    attention = {p for p, m in declared.items() if isinstance(m, nn.MultiHeadDotProductAttention)}
    modules = pairing.merge_submodules(modules, attention)
    return modules, {p: _kind(declared.get(p), v) for p, v in modules.items()}


def _kind(module: Any, variables: Mapping[str, tuple[int, ...]]) -> str:
    """A Flax module's kind: a ConvTranspose or an Embed from its type, the rest from its variables."""
    import flax.linen as nn

    if isinstance(module, nn.ConvTranspose):
        return pairing.FLAX_TRANSPOSED if module.transpose_kernel else "conv_transpose"
    if isinstance(module, nn.Embed):
        return "embedding"
    if isinstance(module, nn.MultiHeadDotProductAttention):
        return pairing.attention_kind(variables)
    return pairing.flax_variables_kind(variables)


def derive_linen(state_dict: Mapping[str, Any], model: Any, args: tuple, init_kwargs: dict, *,
                 names: Mapping[str, str] | None, kinds: Mapping[str, str] | None,
                 lenient: bool = False) -> pairing.Names:
    modules, jax_kinds = flax_modules(model, args, init_kwargs)
    return pairing.pair(pairing.torch_modules(state_dict), modules, jax_kinds, fixed=dict(names or {}),
                        kinds=dict(kinds or {}), style="flax", framework="Flax", who="derive_names", lenient=lenient)


# ------------------------------------------------------------------------------------------- compare's runner


class LinenRunner:
    def __init__(self, model: Any, variables: Any, eval_kwargs: Mapping | None, train_kwargs: Mapping | None):
        import jax

        if variables is None:
            raise TypeError("compare: a linen model needs its variables: compare(..., variables=variables).")
        self.model, self.variables = model, jax.tree.map(np.asarray, dict(variables))
        self.kwargs = {False: dict(eval_kwargs if eval_kwargs is not None else flag_kwargs(model.__call__, False)),
                       True: dict(train_kwargs if train_kwargs is not None else flag_kwargs(model.__call__, True))}

    def derive(self, state_dict, inputs, names, kinds):
        return derive_linen(state_dict, self.model, tuple(inputs), self.kwargs[False], names=names,
                                   kinds=kinds, lenient=True)

    def run(self, inputs, train, paths, isolated):
        import flax.linen as nn
        import jax

        nested: set[str] = set()

        def forward(variables, inputs, isolated):
            probes = Probes(paths, isolated, nested)

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
        return flax_to_torch(after, names, kinds=kinds)

    def grads(self, inputs, loss, names, kinds):
        import jax

        def objective(params):
            y, _ = self.model.apply({**self.variables, "params": params}, *inputs, **self.kwargs[True],
                                    mutable=["batch_stats"])
            return loss(first_tensor(y))

        grads = jax.jit(jax.grad(objective))(self.variables["params"])
        with_grads = pairing.Names({p: n for p, n in names.items() if has_path(grads, n)}, getattr(names, "kinds", {}))
        return flax_to_torch({"params": grads}, with_grads, kinds=kinds)
