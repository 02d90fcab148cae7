"""The torch <-> JAX layouts of one module's leaves, by kind: norm layers' names, the kernels of linears, convs
and transposed convs, embeddings, attention's projections, bare parameters; in two styles, ``"flax"`` (linen and
NNX: ``kernel`` as ``(in, out)`` or ``(*k, in, out)``, ``scale``, ``embedding``) and ``"equinox"`` (torch's own
layouts and names: ``weight`` as ``(out, in)`` or ``(out, in, *k)``, a conv bias of shape ``(out, 1, ..., 1)``).
Running statistics are ``mean``/``var``/``count`` in both."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

STATS = ("mean", "var", "count")  # the JAX names that are running statistics, not parameters
_NORM_JAX = {"flax": {"weight": "scale", "bias": "bias"}, "equinox": {"weight": "weight", "bias": "bias"}}
RUNNING = {"running_mean": "mean", "running_var": "var", "num_batches_tracked": "count"}
# torch.nn.MultiheadAttention's leaves (its out_proj's folded in: see _pairing.split_key); a Flax attention's kind
# is "attention:H", its number of heads, which its kernels (E, H, D) need and torch's (3E, E) do not say
ATTENTION_LEAVES = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight", "in_proj_bias",
                    "out_proj.weight", "out_proj.bias")


def norm_names(style: str) -> dict[str, str]:
    """torch leaf -> JAX name for a norm layer."""
    return {**_NORM_JAX[style], **RUNNING}


def _conv_bias_shape(out: int, weight_ndim: int) -> tuple[int, ...]:
    return (out, *(1,) * (weight_ndim - 2))


def _weight_layout(kind: str, ndim: int, style: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(axes, flipped)``: the JAX weight is ``np.transpose(torch_weight, axes)`` with its ``flipped`` axes
    reversed. torch keeps ``(out, in)`` (Linear, Embedding: ``(num, features)``), ``(out, in, *k)`` (Conv) and
    ``(in, out, *k)`` (ConvTranspose, the gradient of a conv); a ConvTranspose as a forward conv over the dilated
    input has its kernel flipped in space (Flax's default, and Equinox's)."""
    k = tuple(range(2, ndim))
    if kind == "embedding" or (style == "equinox" and not kind.startswith("conv_transpose")):
        return tuple(range(ndim)), ()
    if style == "equinox":  # ConvTranspose: (out, in, *k), flipped
        return (1, 0, *k), k
    if kind == "linear":
        return (1, 0), ()
    if kind == "conv_transpose":  # Flax's ConvTranspose(transpose_kernel=False): (*k, in, out), flipped
        return (*k, 0, 1), tuple(range(ndim - 2))
    return (*k, 1, 0), ()  # conv, and Flax's ConvTranspose(transpose_kernel=True): (*k, out, in)


def _to_jax_weight(kind: str, value: np.ndarray, style: str) -> np.ndarray:
    axes, flipped = _weight_layout(kind, value.ndim, style)
    return np.ascontiguousarray(np.flip(np.transpose(value, axes), flipped))


def _to_torch_weight(kind: str, value: np.ndarray, style: str) -> np.ndarray:
    axes, flipped = _weight_layout(kind, value.ndim, style)
    return np.ascontiguousarray(np.transpose(np.flip(value, flipped), np.argsort(axes)))


def _weight_name(kind: str, style: str) -> str:
    if style == "equinox":
        return "weight"
    return "embedding" if kind == "embedding" else "kernel"


PROJECTIONS = {"flax": ("query", "key", "value", "out"), "equinox": ("query_proj", "key_proj", "value_proj",
                                                                     "output_proj")}


def _attention_to_jax(kind: str, leaves: Mapping[str, np.ndarray], style: str) -> dict[str, np.ndarray]:
    """torch.nn.MultiheadAttention -> Flax's (``query/kernel`` ``(E, H, D)``, ``query/bias`` ``(H, D)``, ...,
    ``out/kernel`` ``(H, D, E)``) or Equinox's (``query_proj/weight`` ``(H * D, E)``, ..., torch's layouts)."""
    if "in_proj_weight" in leaves:
        weights = np.split(leaves["in_proj_weight"], 3)
    else:
        weights = [leaves[f"{q}_proj_weight"] for q in "qkv"]
    biases = np.split(leaves["in_proj_bias"], 3) if "in_proj_bias" in leaves else [None] * 3
    names, out = PROJECTIONS[style], {}
    heads = int(kind.partition(":")[2] or 1)
    for name, w, b in zip(names[:3], weights, biases, strict=True):
        out[f"{name}/{'weight' if style == 'equinox' else 'kernel'}"] = (
            w if style == "equinox" else np.ascontiguousarray(w.T).reshape(w.shape[1], heads, -1))
        if b is not None:
            out[f"{name}/bias"] = b if style == "equinox" else b.reshape(heads, -1)
    w = leaves["out_proj.weight"]
    out[f"{names[3]}/{'weight' if style == 'equinox' else 'kernel'}"] = (
        w if style == "equinox" else np.ascontiguousarray(w.T).reshape(heads, -1, w.shape[0]))
    if "out_proj.bias" in leaves:
        out[f"{names[3]}/bias"] = leaves["out_proj.bias"]
    return out


def _attention_to_torch(leaves: Mapping[str, Any], style: str) -> dict[str, np.ndarray]:
    """The inverse of :func:`_attention_to_jax`: ``in_proj_weight`` where query, key and value take inputs of
    one size (torch's ``_qkv_same_embed_dim``), else ``q/k/v_proj_weight``."""
    names, weight = PROJECTIONS[style], "weight" if style == "equinox" else "kernel"
    flat = lambda w: np.asarray(w) if style == "equinox" else np.asarray(w).reshape(np.shape(w)[0], -1).T
    weights = [flat(leaves[f"{n}/{weight}"]) for n in names[:3]]
    out = {}
    if len({w.shape[1] for w in weights}) == 1:
        out["in_proj_weight"] = np.ascontiguousarray(np.concatenate(weights))
    else:
        out.update({f"{q}_proj_weight": np.ascontiguousarray(w) for q, w in zip("qkv", weights, strict=True)})
    if f"{names[0]}/bias" in leaves:
        out["in_proj_bias"] = np.concatenate([np.asarray(leaves[f"{n}/bias"]).reshape(-1) for n in names[:3]])
    w = np.asarray(leaves[f"{names[3]}/{weight}"])
    out["out_proj.weight"] = np.ascontiguousarray(w if style == "equinox" else w.reshape(-1, w.shape[-1]).T)
    if f"{names[3]}/bias" in leaves:
        out["out_proj.bias"] = np.asarray(leaves[f"{names[3]}/bias"])
    return out


def converted_shapes(kind: str, leaves: Mapping[str, tuple[int, ...]], style: str) -> dict[str, tuple[int, ...]]:
    """The JAX leaf shapes a torch module of ``kind`` converts to (as :func:`module_to_jax` converts them)."""
    if kind.startswith("attention"):
        dummies = {k: np.broadcast_to(np.int8(0), v) for k, v in leaves.items()}
        return {k: tuple(v.shape) for k, v in _attention_to_jax(kind, dummies, style).items()}
    if kind == "params":
        return dict(leaves)
    out = {}
    for leaf, shape in leaves.items():
        if kind == "norm":
            out[norm_names(style).get(leaf, leaf)] = shape
        elif leaf == "weight":
            axes, _ = _weight_layout(kind, len(shape), style)
            out[_weight_name(kind, style)] = tuple(shape[a] for a in axes)
        elif leaf == "bias" and style == "equinox" and kind.startswith("conv") and "weight" in leaves:
            out[leaf] = _conv_bias_shape(shape[0], len(leaves["weight"]))
        else:
            out[leaf] = shape
    return out


def module_to_jax(kind: str, leaves: Mapping[str, np.ndarray], style: str) -> dict[str, np.ndarray]:
    """One torch module's leaves -> its JAX twin's ``{name: array}`` (``count`` as int32; a "/" in a name is a
    submodule's variable, e.g. an attention's ``query/kernel``)."""
    if kind.startswith("attention"):
        return _attention_to_jax(kind, leaves, style)
    if kind == "params":
        return dict(leaves)
    out = {}
    for leaf, value in leaves.items():
        if kind == "norm":
            name = norm_names(style)[leaf]
            out[name] = value.astype(np.int32) if name == "count" else value
        elif leaf == "weight":
            out[_weight_name(kind, style)] = _to_jax_weight(kind, value, style)
        elif leaf == "bias" and style == "equinox" and kind.startswith("conv") and "weight" in leaves:
            out[leaf] = value.reshape(_conv_bias_shape(value.shape[0], leaves["weight"].ndim))
        else:
            out[leaf] = value
    return out


def module_to_torch(kind: str, leaves: Mapping[str, Any], style: str) -> dict[str, np.ndarray]:
    """The inverse of :func:`module_to_jax` (``num_batches_tracked`` as int64, as torch keeps it)."""
    if kind.startswith("attention"):
        return _attention_to_torch(leaves, style)
    if kind == "params":
        return {k: np.asarray(v) for k, v in leaves.items()}
    out = {}
    reverse = {name: leaf for leaf, name in norm_names(style).items()}
    for name, value in leaves.items():
        value = np.asarray(value)
        if kind == "norm":
            out[reverse[name]] = value.astype(np.int64) if name == "count" else value
        elif name == _weight_name(kind, style):
            out["weight"] = _to_torch_weight(kind, value, style)
        elif name == "bias" and style == "equinox":
            out["bias"] = value.reshape(-1)
        else:
            out[name] = value
    order = ("weight", "bias", *RUNNING)  # torch's order: parameters, then buffers
    return {k: out[k] for k in sorted(out, key=lambda k: order.index(k) if k in order else len(order))}
