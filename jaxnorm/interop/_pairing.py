"""What every converter shares: a state_dict read module by module, a module's kind, and the pairing of torch
modules with JAX modules by order, with the checks that name the first module that does not match.

The layouts of each kind's leaves, in the two styles (``"flax"``, ``"equinox"``), are in ``jaxnorm.interop._leaves``.

A state_dict's shapes cannot tell a ``ConvTranspose`` weight ``(in, out, *k)`` from a ``Conv`` weight
``(out, in, *k)``, nor an ``Embedding`` from a ``Linear``: the JAX module that a torch module pairs with says which
it is (a Flax ``ConvTranspose`` or ``Embed``, an Equinox ``ConvTranspose`` or ``Embedding``), or ``kinds=`` does.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from jaxnorm.interop._leaves import ATTENTION_LEAVES, RUNNING, converted_shapes, norm_names

FLAX_TRANSPOSED = "conv_transpose:transpose_kernel"  # Flax's ConvTranspose(transpose_kernel=True)
# "params": a module's bare parameters (a ViT's class token, ConvNeXt's layer scale), paired by name, as they are
KINDS = ("norm", "linear", "conv", "conv_transpose", "embedding", "attention", "params", FLAX_TRANSPOSED)
LAYER_VARIABLES = {"kernel", "embedding", "scale", "bias", "mean", "var", "count", "query/kernel"}  # JAX's
# the kinds a state_dict's shapes read as another: the JAX module (or kinds=) decides
LOOKS_LIKE = {"conv_transpose": "conv", FLAX_TRANSPOSED: "conv", "embedding": "linear"}


class Names(dict):
    """``{torch module prefix: JAX module path}``, as :func:`derive_names` returns it: a dict that also carries
    ``kinds``, the kind each pair was checked as (a ConvTranspose or an Embedding, which a state_dict's shapes do
    not tell apart), so the converters it is passed to convert each module as it was paired."""

    def __init__(self, pairs: Mapping[str, str] | None = None, kinds: Mapping[str, str] | None = None):
        super().__init__(pairs or {})
        self.kinds = dict(kinds or {})


def given_kinds(names: Mapping[str, str] | None, kinds: Mapping[str, str] | None) -> dict[str, str]:
    """The kinds a conversion knows before looking at shapes: ``names.kinds`` (derive_names'), then ``kinds=``."""
    return {**getattr(names, "kinds", {}), **(kinds or {})}


def flax_variables_kind(variables: Mapping[str, tuple[int, ...]]) -> str:
    """A Flax module's kind from its variables alone (a ConvTranspose reads as a conv: the module says which)."""
    if not set(variables) & LAYER_VARIABLES:
        return "params"
    if "embedding" in variables:
        return "embedding"
    if "kernel" in variables:
        return "linear" if len(variables["kernel"]) == 2 else "conv"
    return "norm"


def attention_kind(shapes: Mapping[str, tuple[int, ...]]) -> str:
    """A Flax attention's kind, ``"attention:H"``: its heads, from its query kernel ``(E, H, D)``."""
    return f"attention:{shapes['query/kernel'][1]}"


def torch_kinds(model: Any) -> dict[str, str]:
    """``{prefix: kind}`` for the modules of a torch model whose kind its state_dict's shapes cannot tell: each
    ``ConvTranspose1d/2d/3d`` (``"conv_transpose"``) and ``Embedding`` (``"embedding"``). Pass it as ``kinds=`` to
    :func:`derive_names` or a converter: a torch ConvTranspose paired with a JAX Conv is then refused, not
    converted as a conv."""
    import torch

    transposed = (torch.nn.ConvTranspose1d, torch.nn.ConvTranspose2d, torch.nn.ConvTranspose3d)
    out = {}
    for prefix, module in model.named_modules():
        if isinstance(module, transposed):
            out[prefix] = "conv_transpose"
        elif isinstance(module, torch.nn.Embedding):
            out[prefix] = "embedding"
    return out


def merge_submodules(modules: Mapping[str, Mapping[str, Any]], owners: set[str]) -> dict[str, dict[str, Any]]:
    """``modules`` ({path: {name: leaf}}, in order) with each owner's submodules folded into it, at the place of
    the first: an attention's ``query``, ``key``, ``value`` and ``out`` become its ``query/kernel``, ...."""
    out: dict[str, dict[str, Any]] = {}
    for path, leaves in modules.items():
        parent, _, child = path.rpartition("/")
        if parent in owners:
            out.setdefault(parent, {}).update({f"{child}/{k}": v for k, v in leaves.items()})
        else:
            out.setdefault(path, {}).update(leaves)
    return out


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested dict of leaves as ``{"a/b": leaf}``."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(flatten(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = v
    return out


def to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def split_key(key: str, attention: set[str]) -> tuple[str, str]:
    """``(module prefix, leaf)`` of a state_dict key; a MultiheadAttention's ``out_proj`` belongs to the attention
    (``"attn.out_proj.weight"`` -> ``("attn", "out_proj.weight")``), which converts as one module."""
    prefix, _, leaf = key.rpartition(".")
    owner, _, child = prefix.rpartition(".")
    if child == "out_proj" and owner in attention:
        return owner, f"out_proj.{leaf}"
    if prefix == "out_proj" and "" in attention:
        return "", f"out_proj.{leaf}"
    return prefix, leaf


def attention_prefixes(keys: Any) -> set[str]:
    """The prefixes of the MultiheadAttention modules among state_dict keys."""
    return {k.rpartition(".")[0] for k in keys if k.rpartition(".")[2] in ("in_proj_weight", "q_proj_weight")}


def torch_modules(state_dict: Mapping[str, Any]) -> dict[str, dict[str, tuple[int, ...]]]:
    """{module prefix: {leaf: shape}} in state_dict order (the order torch registered the modules)."""
    modules: dict[str, dict[str, tuple[int, ...]]] = {}
    attention = attention_prefixes(state_dict)
    for key, value in state_dict.items():
        prefix, leaf = split_key(key, attention)
        shape = value.shape if hasattr(value, "shape") else np.shape(value)  # no copy off an accelerator
        modules.setdefault(prefix, {})[leaf] = tuple(int(d) for d in shape)
    return modules


def group(state_dict: Mapping[str, Any], names: Mapping[str, str], who: str) -> dict[str, dict[str, np.ndarray]]:
    """{prefix: {leaf: array}} for every module ``names`` maps; a key of an unmapped module is a KeyError."""
    groups: dict[str, dict[str, np.ndarray]] = {prefix: {} for prefix in names}
    attention = attention_prefixes(state_dict)
    for key, value in state_dict.items():
        prefix, leaf = split_key(key, attention)
        if prefix not in names:
            raise KeyError(
                f"{who}: state_dict key {key!r} belongs to module {prefix!r}, which `names` does not map; "
                f"add it, e.g. names[{prefix!r}] = 'Dense_0'."
            )
        groups[prefix][leaf] = to_numpy(value)
    return groups


def torch_kind(prefix: str, shapes: Mapping[str, tuple[int, ...]], kinds: Mapping[str, str]) -> str:
    """norm, linear or conv from the shapes of the module's leaves, unless ``kinds`` names the module's kind."""
    if prefix in kinds:
        kind, _, heads = kinds[prefix].partition(":")
        if kinds[prefix] not in KINDS and not (kind == "attention" and heads.isdigit()):
            raise ValueError(f"kinds[{prefix!r}] must be one of {KINDS} (or 'attention:H', H heads), got "
                             f"{kinds[prefix]!r}.")
        return kinds[prefix]
    if "in_proj_weight" in shapes or "q_proj_weight" in shapes:
        return "attention"
    if not set(shapes) & ({"weight", "bias"} | set(RUNNING) | set(ATTENTION_LEAVES)):
        return "params"
    weight_ndim = len(shapes["weight"]) if "weight" in shapes else None
    if "running_mean" in shapes or weight_ndim is None or weight_ndim == 1:
        return "norm"
    return "linear" if weight_ndim == 2 else "conv"


def resolve_kind(kind: str, jax_kind: str, given: bool) -> str:
    """The kind a torch module converts as, paired with a JAX module of ``jax_kind``: where the state_dict's shapes
    cannot tell (``LOOKS_LIKE``), or ``kinds=`` named the ConvTranspose without Flax's variant, the JAX module's."""
    if not given and LOOKS_LIKE.get(jax_kind) == kind:
        return jax_kind
    if kind.split(":")[0] == jax_kind.split(":")[0]:
        return jax_kind
    return kind


def _known(kind: str, leaves: Any = ()) -> set[str]:
    if kind == "params":
        return set(leaves)
    if kind.startswith("attention"):
        return set(ATTENTION_LEAVES)
    return set(norm_names("flax")) if kind == "norm" else {"weight", "bias"}


def check_leaves(prefix: str, kind: str, leaves: Mapping[str, Any], who: str) -> None:
    unknown = set(leaves) - _known(kind, leaves)
    if unknown:
        extra = ""
        if kind.startswith("attention") and {"bias_k", "bias_v"} & unknown:
            extra = " (MultiheadAttention's add_bias_kv=True has no counterpart in Flax's or Equinox's attention)"
        raise KeyError(
            f"{who}: torch module {prefix!r} holds {sorted(unknown)}, which interop does not convert (a {kind} "
            f"layer holds {sorted(_known(kind))}){extra}; move them by hand and drop them from the state_dict "
            "first, or rename them to a module interop converts.")
    if kind.startswith("attention"):
        inputs = {"in_proj_weight"} <= set(leaves) or {f"{q}_proj_weight" for q in "qkv"} <= set(leaves)
        if not inputs or "out_proj.weight" not in leaves:
            raise KeyError(
                f"{who}: torch module {prefix!r} looks like a MultiheadAttention but holds {sorted(leaves)}; a "
                "MultiheadAttention holds in_proj_weight (or q/k/v_proj_weight), out_proj.weight and, with "
                "bias=True, in_proj_bias and out_proj.bias.")


def pair(torch_mods: Mapping[str, Mapping[str, tuple[int, ...]]], jax_mods: Mapping[str, Mapping[str, tuple]],
         jax_kinds: Mapping[str, str], *, fixed: Mapping[str, str], kinds: Mapping[str, str], style: str,
         framework: str, who: str, lenient: bool = False) -> Names:
    """torch prefix -> JAX path: ``fixed`` as given, the rest by order, each pair checked in kind and shapes.

    ``jax_mods`` lists the JAX modules that hold convertible leaves, in declaration order, with each leaf's shape;
    ``jax_kinds`` says which kind each one is; the result carries the kind each pair converts as
    (``resolve_kind``). ``lenient`` (for ``compare``) lets a JAX norm layer keep no
    ``count``, which compare reports as a difference instead of refusing to pair, and leaves out the torch modules
    that hold nothing interop converts (e.g. ConvNeXt's layer scale), whose values the user moves by hand.
    """
    for prefix, path in fixed.items():
        if prefix not in torch_mods:
            raise ValueError(f"{who}: names has torch module {prefix!r}, which the state_dict does not hold.")
        if path not in jax_mods:
            raise ValueError(f"{who}: names maps {prefix!r} to {framework} path {path!r}, which is not a module "
                             f"with variables interop converts in this model; the model's are {list(jax_mods)}.")
    convertible = lambda p: not lenient or bool(set(torch_mods[p]) & _known(torch_kind(p, torch_mods[p], kinds),
                                                                           torch_mods[p]))
    torch_rest = [p for p in torch_mods if p not in fixed and convertible(p)]
    used = set(fixed.values())
    jax_rest = [p for p in jax_mods if p not in used]
    resolved = {p: resolve_kind(torch_kind(p, torch_mods[p], kinds), jax_kinds[path], p in kinds)
                for p, path in fixed.items()}
    out, pair_kinds = dict(fixed), {}
    for i, (prefix, path) in enumerate(zip(torch_rest, jax_rest, strict=False)):
        leaves, target, jax_kind = torch_mods[prefix], dict(jax_mods[path]), jax_kinds[path]
        kind = resolve_kind(torch_kind(prefix, leaves, kinds), jax_kind, prefix in kinds)
        try:
            check_leaves(prefix, kind, leaves, who)
        except KeyError as error:
            raise ValueError(error.args[0]) from None
        problem = None
        converted = converted_shapes(kind, leaves, style)
        if lenient and "count" in converted and "count" not in target:
            target["count"] = converted["count"]
        if kind != jax_kind:
            article = lambda k: "an" if k[0] in "aeiou" else "a"
            problem = f"it is {article(kind)} {kind} layer, the {framework} module {article(jax_kind)} {jax_kind} layer"
            if kind == "linear" and jax_kind == "norm":
                problem += f" (for a LayerNorm or RMSNorm over 2+ trailing dims pass kinds={{{prefix!r}: 'norm'}})"
            elif kind.startswith("conv_transpose") or jax_kind.startswith("conv_transpose"):
                problem += (" (a torch ConvTranspose pairs with a Flax or NNX ConvTranspose, either transpose_kernel "
                            "setting, or an Equinox ConvTranspose; a torch Conv with a Conv)")
        elif converted != target:
            problem = f"it converts to {converted}, the {framework} module holds {target}"
            if kind == "params":
                problem += " (bare parameters pair by name and keep their shape: give them torch's names)"
            if {k: v for k, v in converted.items() if k != "count"} == target:
                problem += (f" (the {framework} module keeps no count, as a jaxnorm BatchNorm with flax_momentum or "
                            "flax's own BatchNorm: drop the num_batches_tracked keys from the state_dict first)")
        if problem:
            raise ValueError(
                f"{who}: torch module {prefix!r} (module {i + 1} with parameters or buffers, in order) does not "
                f"match {framework} module {path!r}: {problem}. Declare the {framework} modules in the PyTorch "
                f"order, or map this one by hand: names={{{prefix!r}: '{framework}/path'}}.")
        out[prefix] = path
        pair_kinds[prefix] = kind
    if len(torch_rest) != len(jax_rest):
        side, extra = (("torch", torch_rest[len(jax_rest):]) if len(torch_rest) > len(jax_rest)
                       else (framework, jax_rest[len(torch_rest):]))
        raise ValueError(
            f"{who}: {len(torch_rest)} torch modules but {len(jax_rest)} {framework} modules to pair by order; the "
            f"first {side} module left without a partner is {extra[0]!r}. Add the missing module, or map it by "
            "hand with names=.")
    return Names(out, {**resolved, **pair_kinds})
