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


def _kind(prefix: str, leaves: Mapping[str, np.ndarray], kinds: Mapping[str, str]) -> str:
    if prefix in kinds:
        if kinds[prefix] not in _KINDS:
            raise ValueError(f"kinds[{prefix!r}] must be one of {_KINDS}, got {kinds[prefix]!r}.")
        return kinds[prefix]
    weight = leaves.get("weight")
    if "running_mean" in leaves or weight is None or weight.ndim == 1:
        return "norm"
    return "linear" if weight.ndim == 2 else "conv"


def torch_to_flax(state_dict: Mapping[str, Any], names: Mapping[str, str], *,
                  kinds: Mapping[str, str] | None = None) -> dict[str, dict]:
    """Convert a PyTorch ``state_dict`` into Flax ``{"params": ..., "batch_stats": ...}`` (NumPy leaves)."""
    kinds = kinds or {}
    out: dict[str, dict] = {"params": {}, "batch_stats": {}}
    for prefix, leaves in _group(state_dict, names).items():
        path, kind = names[prefix], _kind(prefix, leaves, kinds)
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


__all__ = ["flax_to_torch", "torch_to_flax"]
