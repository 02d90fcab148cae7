"""What every converter shares: a state_dict read module by module, a module's kind, the torch <-> JAX layouts of
its leaves, and the pairing of torch modules with JAX modules by order, with the checks that name the first
module that does not match.

Two leaf styles: ``"flax"`` (linen and NNX: ``kernel`` as ``(in, out)`` or ``(*k, in, out)``, ``scale``) and
``"equinox"`` (torch's own layouts and names: ``weight`` as ``(out, in)`` or ``(out, in, *k)``, a conv bias of shape
``(out, 1, ..., 1)``). Running statistics are ``mean``/``var``/``count`` in both.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

KINDS = ("norm", "linear", "conv")
STATS = ("mean", "var", "count")  # the JAX names that are running statistics, not parameters
_NORM_JAX = {"flax": {"weight": "scale", "bias": "bias"}, "equinox": {"weight": "weight", "bias": "bias"}}
_RUNNING = {"running_mean": "mean", "running_var": "var", "num_batches_tracked": "count"}


def norm_names(style: str) -> dict[str, str]:
    """torch leaf -> JAX name for a norm layer."""
    return {**_NORM_JAX[style], **_RUNNING}


def to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def torch_modules(state_dict: Mapping[str, Any]) -> dict[str, dict[str, tuple[int, ...]]]:
    """{module prefix: {leaf: shape}} in state_dict order (the order torch registered the modules)."""
    modules: dict[str, dict[str, tuple[int, ...]]] = {}
    for key, value in state_dict.items():
        prefix, _, leaf = key.rpartition(".")
        shape = value.shape if hasattr(value, "shape") else np.shape(value)  # no copy off an accelerator
        modules.setdefault(prefix, {})[leaf] = tuple(int(d) for d in shape)
    return modules


def group(state_dict: Mapping[str, Any], names: Mapping[str, str], who: str) -> dict[str, dict[str, np.ndarray]]:
    """{prefix: {leaf: array}} for every module ``names`` maps; a key of an unmapped module is a KeyError."""
    groups: dict[str, dict[str, np.ndarray]] = {prefix: {} for prefix in names}
    for key, value in state_dict.items():
        prefix, _, leaf = key.rpartition(".")
        if prefix not in names:
            raise KeyError(
                f"{who}: state_dict key {key!r} belongs to module {prefix!r}, which `names` does not map; "
                f"add it, e.g. names[{prefix!r}] = 'Dense_0'."
            )
        groups[prefix][leaf] = to_numpy(value)
    return groups


def torch_kind(prefix: str, shapes: Mapping[str, tuple[int, ...]], kinds: Mapping[str, str]) -> str:
    """norm, linear or conv, from ``kinds`` or from the shapes of the module's leaves."""
    if prefix in kinds:
        if kinds[prefix] not in KINDS:
            raise ValueError(f"kinds[{prefix!r}] must be one of {KINDS}, got {kinds[prefix]!r}.")
        return kinds[prefix]
    weight_ndim = len(shapes["weight"]) if "weight" in shapes else None
    if "running_mean" in shapes or weight_ndim is None or weight_ndim == 1:
        return "norm"
    return "linear" if weight_ndim == 2 else "conv"


def _known(kind: str) -> set[str]:
    return set(norm_names("flax")) if kind == "norm" else {"weight", "bias"}


def check_leaves(prefix: str, kind: str, leaves: Mapping[str, Any], who: str) -> None:
    unknown = set(leaves) - _known(kind)
    if unknown:
        raise KeyError(
            f"{who}: torch module {prefix!r} holds {sorted(unknown)}, which interop does not convert (a {kind} "
            f"layer holds {sorted(_known(kind))}); rename those keys (e.g. 'self_attn.in_proj_weight' -> "
            "'self_attn.in_proj.weight') or move them by hand and drop them from the state_dict first.")


def _conv_bias_shape(out: int, weight_ndim: int) -> tuple[int, ...]:
    return (out, *(1,) * (weight_ndim - 2))


def converted_shapes(kind: str, leaves: Mapping[str, tuple[int, ...]], style: str) -> dict[str, tuple[int, ...]]:
    """The JAX leaf shapes a torch module of ``kind`` converts to (as :func:`module_to_jax` converts them)."""
    out = {}
    for leaf, shape in leaves.items():
        if kind == "norm":
            out[norm_names(style).get(leaf, leaf)] = shape
        elif style == "equinox":
            conv_bias = kind == "conv" and leaf == "bias" and "weight" in leaves
            out[leaf] = _conv_bias_shape(shape[0], len(leaves["weight"])) if conv_bias else shape
        elif leaf == "weight":
            out["kernel"] = shape[::-1] if kind == "linear" else (*shape[2:], shape[1], shape[0])
        else:
            out[leaf] = shape
    return out


def module_to_jax(kind: str, leaves: Mapping[str, np.ndarray], style: str) -> dict[str, np.ndarray]:
    """One torch module's leaves -> its JAX twin's ``{name: array}`` (``count`` as int32)."""
    out = {}
    for leaf, value in leaves.items():
        if kind == "norm":
            name = norm_names(style)[leaf]
            out[name] = value.astype(np.int32) if name == "count" else value
        elif style == "equinox":
            conv_bias = kind == "conv" and leaf == "bias" and "weight" in leaves
            out[leaf] = value.reshape(_conv_bias_shape(value.shape[0], leaves["weight"].ndim)) if conv_bias else value
        elif leaf == "weight":
            kernel = value.T if kind == "linear" else np.transpose(value, (*range(2, value.ndim), 1, 0))
            out["kernel"] = np.ascontiguousarray(kernel)
        else:
            out[leaf] = value
    return out


def module_to_torch(kind: str, leaves: Mapping[str, Any], style: str) -> dict[str, np.ndarray]:
    """The inverse of :func:`module_to_jax` (``num_batches_tracked`` as int64, as torch keeps it)."""
    out = {}
    reverse = {name: leaf for leaf, name in norm_names(style).items()}
    for name, value in leaves.items():
        value = np.asarray(value)
        if kind == "norm":
            out[reverse[name]] = value.astype(np.int64) if name == "count" else value
        elif name == "kernel":
            out["weight"] = np.ascontiguousarray(
                value.T if value.ndim == 2 else np.transpose(value, (value.ndim - 1, value.ndim - 2,
                                                                     *range(value.ndim - 2))))
        elif name == "bias" and style == "equinox":
            out["bias"] = value.reshape(-1)
        else:
            out[name] = value
    order = ("weight", "bias", *_RUNNING)  # torch's order: parameters, then buffers
    return {k: out[k] for k in sorted(out, key=lambda k: order.index(k) if k in order else len(order))}


def pair(torch_mods: Mapping[str, Mapping[str, tuple[int, ...]]], jax_mods: Mapping[str, Mapping[str, tuple]],
         jax_kinds: Mapping[str, str], *, fixed: Mapping[str, str], kinds: Mapping[str, str], style: str,
         framework: str, who: str, lenient: bool = False) -> dict[str, str]:
    """torch prefix -> JAX path: ``fixed`` as given, the rest by order, each pair checked in kind and shapes.

    ``jax_mods`` lists the JAX modules that hold convertible leaves, in declaration order, with each leaf's shape;
    ``jax_kinds`` says which kind each one is. ``lenient`` (for ``compare``) lets a JAX norm layer keep no
    ``count``, which compare reports as a difference instead of refusing to pair, and leaves out the torch modules
    that hold nothing interop converts (e.g. ConvNeXt's layer scale), whose values the user moves by hand.
    """
    for prefix, path in fixed.items():
        if prefix not in torch_mods:
            raise ValueError(f"{who}: names has torch module {prefix!r}, which the state_dict does not hold.")
        if path not in jax_mods:
            raise ValueError(f"{who}: names maps {prefix!r} to {framework} path {path!r}, which is not a module "
                             f"with variables interop converts in this model; the model's are {list(jax_mods)}.")
    convertible = lambda p: not lenient or bool(set(torch_mods[p]) & _known(torch_kind(p, torch_mods[p], kinds)))
    torch_rest = [p for p in torch_mods if p not in fixed and convertible(p)]
    used = set(fixed.values())
    jax_rest = [p for p in jax_mods if p not in used]
    out = dict(fixed)
    for i, (prefix, path) in enumerate(zip(torch_rest, jax_rest, strict=False)):
        leaves, target, jax_kind = torch_mods[prefix], dict(jax_mods[path]), jax_kinds[path]
        kind = torch_kind(prefix, leaves, kinds)
        try:
            check_leaves(prefix, kind, leaves, who)
        except KeyError as error:
            raise ValueError(error.args[0]) from None
        problem = None
        converted = converted_shapes(kind, leaves, style)
        if lenient and "count" in converted and "count" not in target:
            target["count"] = converted["count"]
        if kind != jax_kind:
            problem = f"it is a {kind} layer, the {framework} module a {jax_kind} layer"
            if kind == "linear" and jax_kind == "norm":
                problem += f" (for a LayerNorm or RMSNorm over 2+ trailing dims pass kinds={{{prefix!r}: 'norm'}})"
        elif converted != target:
            problem = f"it converts to {converted}, the {framework} module holds {target}"
            if {k: v for k, v in converted.items() if k != "count"} == target:
                problem += (f" (the {framework} module keeps no count, as a jaxnorm BatchNorm with flax_momentum or "
                            "flax's own BatchNorm: drop the num_batches_tracked keys from the state_dict first)")
        if problem:
            raise ValueError(
                f"{who}: torch module {prefix!r} (module {i + 1} with parameters or buffers, in order) does not "
                f"match {framework} module {path!r}: {problem}. Declare the {framework} modules in the PyTorch "
                f"order, or map this one by hand: names={{{prefix!r}: '{framework}/path'}}.")
        out[prefix] = path
    if len(torch_rest) != len(jax_rest):
        side, extra = (("torch", torch_rest[len(jax_rest):]) if len(torch_rest) > len(jax_rest)
                       else (framework, jax_rest[len(torch_rest):]))
        raise ValueError(
            f"{who}: {len(torch_rest)} torch modules but {len(jax_rest)} {framework} modules to pair by order; the "
            f"first {side} module left without a partner is {extra[0]!r}. Add the missing module, or map it by "
            "hand with names=.")
    return out
