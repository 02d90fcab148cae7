"""PyTorch ``state_dict`` <-> Flax variables (``{"params": ..., "batch_stats": ...}``) for whole models.

torch is optional: a state_dict of NumPy arrays works, and tensors are converted with ``.detach().cpu().numpy()``.

``names`` maps each torch module prefix to the Flax module path ("/"-separated), e.g.::

    names = {"features.0": "Conv_0", "features.1": "BatchNorm_0", "head": "Dense_0"}
    variables = torch_to_flax(model.state_dict(), names)
    state_dict = flax_to_torch(variables, names)

Layer kinds are inferred: a prefix with ``running_mean`` or a 1-D ``weight`` is a norm layer (weight/bias ->
scale/bias, running_mean/var/num_batches_tracked -> batch_stats mean/var/count); a 2-D weight is a Linear
(``(out, in)`` -> Dense ``kernel (in, out)``); a 3-D+ weight is a Conv (``(O, I, *k)`` -> ``kernel (*k, I, O)``).
``kinds={"prefix": "norm"}`` overrides the guess (needed for a LayerNorm/RMSNorm over 2+ trailing dims).

``names`` need not be written by hand: :func:`derive_names` pairs the torch modules with the Flax modules by
order (the i-th torch module that holds parameters or buffers with the i-th Flax module that holds variables, in
the order the Flax model declares them), checking each pair's kind and shapes::

    names = derive_names(torch_model.state_dict(), flax_model, sample_input, train=False)

Note: torch flattens NCHW feature maps in (C, H, W) order; a Flax NHWC model that feeds a flattened map into a
converted Linear must flatten in the same order (``jnp.transpose(x, (0, 3, 1, 2)).reshape(n, -1)``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from jaxnorm._tree import get_path, set_path

_NORM_KEYS = {"weight": ("params", "scale"), "bias": ("params", "bias"), "running_mean": ("batch_stats", "mean"),
              "running_var": ("batch_stats", "var"), "num_batches_tracked": ("batch_stats", "count")}
_KINDS = ("norm", "linear", "conv")


def _to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def _group(state_dict: Mapping[str, Any], names: Mapping[str, str]) -> dict[str, dict[str, np.ndarray]]:
    groups: dict[str, dict[str, np.ndarray]] = {prefix: {} for prefix in names}
    for key, value in state_dict.items():
        prefix, _, leaf = key.rpartition(".")
        if prefix not in names:
            raise KeyError(
                f"torch_to_flax: state_dict key {key!r} belongs to module {prefix!r}, which `names` does not map; "
                f"add it, e.g. names[{prefix!r}] = 'Dense_0'."
            )
        groups[prefix][leaf] = _to_numpy(value)
    return groups


def _kind(prefix: str, shapes: Mapping[str, tuple[int, ...]], kinds: Mapping[str, str]) -> str:
    """norm, linear or conv, from ``kinds`` or from the shapes of the module's leaves."""
    if prefix in kinds:
        if kinds[prefix] not in _KINDS:
            raise ValueError(f"kinds[{prefix!r}] must be one of {_KINDS}, got {kinds[prefix]!r}.")
        return kinds[prefix]
    weight_ndim = len(shapes["weight"]) if "weight" in shapes else None
    if "running_mean" in shapes or weight_ndim is None or weight_ndim == 1:
        return "norm"
    return "linear" if weight_ndim == 2 else "conv"


def torch_to_flax(state_dict: Mapping[str, Any], names: Mapping[str, str], *,
                  kinds: Mapping[str, str] | None = None) -> dict[str, dict]:
    """Convert a PyTorch ``state_dict`` into Flax ``{"params": ..., "batch_stats": ...}`` (NumPy leaves)."""
    kinds = kinds or {}
    out: dict[str, dict] = {"params": {}, "batch_stats": {}}
    for prefix, leaves in _group(state_dict, names).items():
        path, kind = names[prefix], _kind(prefix, {k: v.shape for k, v in leaves.items()}, kinds)
        for leaf, value in leaves.items():
            if kind == "norm":
                if leaf not in _NORM_KEYS:
                    raise KeyError(f"torch_to_flax: unexpected key {prefix}.{leaf} for a norm layer.")
                collection, name = _NORM_KEYS[leaf]
                if name == "count":
                    value = value.astype(np.int32)
                set_path(out[collection], f"{path}/{name}", value)
            elif leaf == "weight":
                kernel = value.T if kind == "linear" else np.transpose(value, (*range(2, value.ndim), 1, 0))
                set_path(out["params"], f"{path}/kernel", np.ascontiguousarray(kernel))
            elif leaf == "bias":
                set_path(out["params"], f"{path}/bias", value)
            else:
                raise KeyError(f"torch_to_flax: unexpected key {prefix}.{leaf} for a {kind} layer.")
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
        p, s = get_path(params, path) or {}, get_path(stats, path) or {}
        if not p and not s:
            raise KeyError(f"flax_to_torch: no variables at Flax path {path!r} (torch module {prefix!r}).")
        p = {k: np.asarray(v) for k, v in p.items()}
        s = {k: np.asarray(v) for k, v in s.items()}
        if "kernel" in p and kinds.get(prefix) != "norm":
            k = p["kernel"]
            out[f"{prefix}.weight"] = np.ascontiguousarray(
                k.T if k.ndim == 2 else np.transpose(k, (k.ndim - 1, k.ndim - 2, *range(k.ndim - 2))))
            if "bias" in p:
                out[f"{prefix}.bias"] = p["bias"]
            continue
        reverse = {name: leaf for leaf, (_, name) in _NORM_KEYS.items()}
        for name, value in {**p, **s}.items():
            out[f"{prefix}.{reverse[name]}"] = value.astype(np.int64) if name == "count" else value
    return out


def _torch_modules(state_dict: Mapping[str, Any]) -> dict[str, dict[str, tuple[int, ...]]]:
    """{module prefix: {leaf: shape}} in state_dict order (the order torch registered the modules)."""
    modules: dict[str, dict[str, tuple[int, ...]]] = {}
    for key, value in state_dict.items():
        prefix, _, leaf = key.rpartition(".")
        shape = value.shape if hasattr(value, "shape") else np.shape(value)  # no copy off an accelerator
        modules.setdefault(prefix, {})[leaf] = tuple(int(d) for d in shape)
    return modules


def _flax_modules(model: Any, args: tuple, kwargs: dict) -> dict[str, dict[str, tuple[int, ...]]]:
    """{module path: {variable: shape}} for every Flax module that owns variables, in declaration order.

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


def _flax_kind(variables: Mapping[str, tuple[int, ...]]) -> str:
    if "kernel" in variables:
        return "linear" if len(variables["kernel"]) == 2 else "conv"
    return "norm"


def _converted_shapes(kind: str, leaves: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """The Flax variable shapes a torch module of ``kind`` converts to (as torch_to_flax converts them)."""
    out = {}
    for leaf, shape in leaves.items():
        if kind == "norm":
            out[_NORM_KEYS[leaf][1] if leaf in _NORM_KEYS else leaf] = shape
        elif leaf == "weight":
            out["kernel"] = shape[::-1] if kind == "linear" else (*shape[2:], shape[1], shape[0])
        else:
            out[leaf] = shape
    return out


def derive_names(state_dict: Mapping[str, Any], model: Any, *args: Any, names: Mapping[str, str] | None = None,
                 kinds: Mapping[str, str] | None = None, **init_kwargs: Any) -> dict[str, str]:
    """The ``names`` mapping for :func:`torch_to_flax` / :func:`flax_to_torch`, derived by order.

    ``model`` is a Flax linen module and ``args``/``init_kwargs`` a sample call: ``model.init`` is traced with
    them (nothing is computed), with ``rngs=`` from ``init_kwargs`` if given, else ``jax.random.key(0)``. The
    i-th torch module of ``state_dict`` that holds parameters or buffers is paired with the i-th Flax module that
    holds variables, and each pair must agree in kind (norm, linear, conv) and in every converted shape. Flax
    modules are taken in declaration order: the order of the ``setup`` assignments, or of creation in a
    ``@compact`` method. ``names`` fixes some pairs by hand; the rest are paired by order. Flax modules whose
    variables interop does not convert (no kernel, scale, bias, mean or var) are left out. Raises ``ValueError``
    naming the first pair that does not match.
    """
    kinds, fixed = dict(kinds or {}), dict(names or {})
    torch_modules, flax_modules = _torch_modules(state_dict), _flax_modules(model, args, init_kwargs)
    for prefix, path in fixed.items():
        if prefix not in torch_modules:
            raise ValueError(f"derive_names: names has torch module {prefix!r}, which the state_dict does not hold.")
        if path not in flax_modules:
            raise ValueError(f"derive_names: names maps {prefix!r} to Flax path {path!r}, which is not a module "
                             f"with variables in this model; the model's are {list(flax_modules)}.")
    torch_rest = [p for p in torch_modules if p not in fixed]
    used = set(fixed.values())
    flax_rest = [p for p in flax_modules if p not in used]
    out = dict(fixed)
    for i, (prefix, path) in enumerate(zip(torch_rest, flax_rest, strict=False)):
        leaves, target = torch_modules[prefix], flax_modules[path]
        kind = _kind(prefix, leaves, kinds)
        known = set(_NORM_KEYS) if kind == "norm" else {"weight", "bias"}
        if set(leaves) - known:
            raise ValueError(
                f"derive_names: torch module {prefix!r} holds {sorted(set(leaves) - known)}, which interop does not "
                f"convert (a {kind} layer holds {sorted(known)}); rename those keys (e.g. "
                "'self_attn.in_proj_weight' -> 'self_attn.in_proj.weight') or move them by hand and drop them from "
                "the state_dict first.")
        problem = None
        if kind != _flax_kind(target):
            problem = f"it is a {kind} layer, the Flax module a {_flax_kind(target)} layer"
            if kind == "linear" and _flax_kind(target) == "norm":
                problem += (f" (for a LayerNorm or RMSNorm over 2+ trailing dims pass "
                            f"kinds={{{prefix!r}: 'norm'}})")
        elif _converted_shapes(kind, leaves) != target:
            problem = f"it converts to {_converted_shapes(kind, leaves)}, the Flax module holds {target}"
            if {k: v for k, v in _converted_shapes(kind, leaves).items() if k != "count"} == target:
                problem += (" (the Flax module keeps no count, as flax.linen.BatchNorm or a jaxnorm BatchNorm with "
                            "flax_momentum: drop the num_batches_tracked keys from the state_dict first)")
        if problem:
            raise ValueError(
                f"derive_names: torch module {prefix!r} (module {i + 1} with parameters or buffers, in order) does "
                f"not match Flax module {path!r}: {problem}. Declare the Flax modules in the PyTorch order, or map "
                f"this one by hand: names={{{prefix!r}: 'Flax/path'}}.")
        out[prefix] = path
    if len(torch_rest) != len(flax_rest):
        side, extra = (("torch", torch_rest[len(flax_rest):]) if len(torch_rest) > len(flax_rest)
                       else ("Flax", flax_rest[len(torch_rest):]))
        raise ValueError(
            f"derive_names: {len(torch_rest)} torch modules but {len(flax_rest)} Flax modules to pair by order; the "
            f"first {side} module left without a partner is {extra[0]!r}. Add the missing module, or map it by "
            "hand with names=.")
    return out


__all__ = ["derive_names", "flax_to_torch", "torch_to_flax"]
