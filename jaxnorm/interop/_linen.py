"""PyTorch ``state_dict`` <-> Flax linen variables (``{"params": ..., "batch_stats": ...}``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from jaxnorm._tree import get_path, set_path
from jaxnorm.interop import _pairing as pairing


def torch_to_flax(state_dict: Mapping[str, Any], names: Mapping[str, str], *,
                  kinds: Mapping[str, str] | None = None) -> dict[str, dict]:
    """Convert a PyTorch ``state_dict`` into Flax ``{"params": ..., "batch_stats": ...}`` (NumPy leaves).

    ``names`` maps each torch module prefix to the Flax module path ("/"-separated); :func:`derive_names` derives
    it. ``kinds={"prefix": "norm"}`` overrides the guessed layer kind (needed for a LayerNorm or RMSNorm over 2+
    trailing dims, whose 2-D weight looks like a Linear's).
    """
    kinds = kinds or {}
    out: dict[str, dict] = {"params": {}, "batch_stats": {}}
    for prefix, leaves in pairing.group(state_dict, names, "torch_to_flax").items():
        kind = pairing.torch_kind(prefix, {k: v.shape for k, v in leaves.items()}, kinds)
        pairing.check_leaves(prefix, kind, leaves, "torch_to_flax")
        for name, value in pairing.module_to_jax(kind, leaves, "flax").items():
            collection = "batch_stats" if name in pairing.STATS else "params"
            set_path(out[collection], f"{names[prefix]}/{name}", value)
    return {k: v for k, v in out.items() if v}


def flax_to_torch(variables: Mapping[str, Any], names: Mapping[str, str], *,
                  kinds: Mapping[str, str] | None = None) -> dict[str, np.ndarray]:
    """The inverse of :func:`torch_to_flax`: Flax variables -> a ``state_dict`` of NumPy arrays.

    Load it into a torch model with ``model.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()})``.
    """
    kinds = kinds or {}
    params, stats = variables.get("params", {}), variables.get("batch_stats", {})
    out: dict[str, np.ndarray] = {}
    for prefix, path in names.items():
        leaves = {**(get_path(params, path) or {}), **(get_path(stats, path) or {})}
        if not leaves:
            raise KeyError(f"flax_to_torch: no variables at Flax path {path!r} (torch module {prefix!r}).")
        kind = "norm" if "kernel" not in leaves or kinds.get(prefix) == "norm" else "linear"
        for leaf, value in pairing.module_to_torch(kind, leaves, "flax").items():
            out[f"{prefix}.{leaf}" if prefix else leaf] = value
    return out


def flax_modules(model: Any, args: tuple, kwargs: dict) -> dict[str, dict[str, tuple[int, ...]]]:
    """{module path: {variable: shape}} for every Flax module that owns convertible variables, in declaration order.

    Declaration order is the order of ``setup`` assignments, or of creation in a ``@compact`` method; it is read
    from each bound module's children after tracing ``model.init``. Where that is unavailable (a Flax internals
    change), the order of first calls is used instead.
    """
    import flax.linen as nn
    import jax

    called: dict[str, None] = {}
    declared: dict[str, None] = {}

    def children(module: Any, prefix: str) -> None:
        for name, child in getattr(getattr(module, "_state", None), "children", {}).items():
            if isinstance(child, nn.Module):
                path = f"{prefix}/{name}" if prefix else str(name)
                declared.setdefault(path, None)
                children(child, path)

    def record(next_fun, call_args, call_kwargs, context):
        called.setdefault("/".join(context.module.path), None)
        out = next_fun(*call_args, **call_kwargs)
        if not context.module.path and not declared:  # the root's first call has created every module
            declared[""] = None
            children(context.module, "")
        return out

    kwargs = dict(kwargs)
    rngs = kwargs.pop("rngs", jax.random.key(0))  # e.g. rngs={"params": key, "dropout": key} for dropout

    def init():
        with nn.intercept_methods(record):
            return model.init(rngs, *args, **kwargs)

    shapes = jax.eval_shape(init)  # traces only: nothing is computed
    modules: dict[str, dict[str, tuple[int, ...]]] = {}
    for path in [*declared, *(p for p in called if p not in declared)]:
        for collection in shapes.values():
            node = get_path(collection, path) if path else collection
            if isinstance(node, Mapping):
                for name, leaf in node.items():
                    if not isinstance(leaf, Mapping):
                        modules.setdefault(path, {})[name] = tuple(leaf.shape)
    # modules with variables interop does not convert (e.g. a bare layer-scale parameter) are the user's to map
    return {p: v for p, v in modules.items() if {"kernel", "scale", "bias", "mean", "var"} & set(v)}


def flax_kind(variables: Mapping[str, tuple[int, ...]]) -> str:
    if "kernel" in variables:
        return "linear" if len(variables["kernel"]) == 2 else "conv"
    return "norm"


def derive_linen(state_dict: Mapping[str, Any], model: Any, args: tuple, init_kwargs: dict, *,
                 names: Mapping[str, str] | None, kinds: Mapping[str, str] | None,
                 lenient: bool = False) -> dict[str, str]:
    modules = flax_modules(model, args, init_kwargs)
    return pairing.pair(pairing.torch_modules(state_dict), modules, {p: flax_kind(v) for p, v in modules.items()},
                        fixed=dict(names or {}), kinds=dict(kinds or {}), style="flax", framework="Flax",
                        who="derive_names", lenient=lenient)
