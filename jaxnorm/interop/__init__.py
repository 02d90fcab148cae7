"""PyTorch ``state_dict`` <-> Flax linen variables, Flax NNX modules and Equinox models + state, for whole models;
and :func:`compare`, which says module by module where a port differs from its PyTorch original.

torch is optional: a state_dict of NumPy arrays works, and tensors are converted with ``.detach().cpu().numpy()``.
Only :func:`compare` and :func:`record_torch` need torch, and import it when called.

Layer kinds: a prefix with ``running_mean`` or a 1-D ``weight`` is a norm layer (weight/bias -> scale/bias,
running_mean/var/num_batches_tracked -> mean/var/count); a 2-D weight is a Linear, or an Embedding where the JAX
module is one (Flax's ``Embed``: ``embedding``; Equinox's ``Embedding``); a 3-D+ weight is a Conv (grouped ones
too), or a ConvTranspose where the JAX module is one (Flax's ``ConvTranspose`` with either ``transpose_kernel``
setting, Equinox's ``ConvTranspose``). Flax (linen and NNX) keeps kernels as ``(in, out)`` / ``(*k, in, out)``;
Equinox keeps torch's layouts. ``kinds={"prefix": kind}`` names a kind by hand (``"norm"`` for a LayerNorm/RMSNorm
over 2+ trailing dims); ``kinds=torch_kinds(torch_model)`` reads them from the torch model, so a torch
ConvTranspose or Embedding paired with a JAX Conv or Dense is refused. :func:`derive_names` returns the kinds
with the names (a :class:`Names`), and the converters convert each module as it was paired. A module's bare
parameters (a ViT's class token) pair with the JAX module that holds its own parameters, by name, as they are.

``names`` maps each torch module prefix to the JAX module's path ("/"-separated), e.g.::

    names = {"features.0": "Conv_0", "features.1": "BatchNorm_0", "head": "Dense_0"}      # linen
    variables = torch_to_flax(model.state_dict(), names)
    state_dict = flax_to_torch(variables, names)

It need not be written by hand: :func:`derive_names` pairs the torch modules with the JAX modules by order (the
i-th torch module that holds parameters or buffers with the i-th JAX module that holds convertible leaves, in the
order the JAX model declares them), checking each pair's kind and shapes. :func:`torch_to_nnx` and
:func:`torch_to_equinox` derive it themselves where ``names`` leaves modules out.

Note: torch flattens NCHW feature maps in (C, H, W) order; a channels-last model that feeds a flattened map into
a converted Linear must flatten in the same order (``jnp.transpose(x, (0, 3, 1, 2)).reshape(n, -1)``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from jaxnorm.interop._compare import compare, compare_fixture
from jaxnorm.interop._equinox import derive_equinox, equinox_to_torch, torch_to_equinox
from jaxnorm.interop._linen import derive_linen, flax_to_torch, torch_to_flax
from jaxnorm.interop._nnx import derive_nnx, nnx_to_torch, torch_to_nnx
from jaxnorm.interop._pairing import Names, torch_kinds
from jaxnorm.interop._record import Recording, record_torch
from jaxnorm.interop._report import Report, Row


def framework(model: Any) -> str:
    """"linen", "nnx" or "equinox": which kind of JAX model ``model`` is (a TypeError for anything else)."""
    import flax.linen as nn
    from flax import nnx

    if isinstance(model, nnx.Module):
        return "nnx"
    if isinstance(model, nn.Module):
        return "linen"
    eqx: Any
    try:
        import equinox as eqx
    except ImportError:  # pragma: no cover - without the extra
        eqx = None
    if eqx is not None and isinstance(model, eqx.Module):
        return "equinox"
    raise TypeError(f"interop: expected a flax.linen, flax.nnx or equinox module, got {type(model).__name__}.")


def derive_names(state_dict: Mapping[str, Any], model: Any, *args: Any, names: Mapping[str, str] | None = None,
                 kinds: Mapping[str, str] | None = None, **init_kwargs: Any) -> Names:
    """The ``names`` mapping (torch module prefix -> JAX module path) of a port, derived by declaration order.

    - **linen**: ``args``/``init_kwargs`` are a sample call; ``model.init`` is traced with them (nothing is
      computed), with ``rngs=`` from ``init_kwargs`` if given, else ``jax.random.key(0)``. Flax modules are taken
      in the order of the ``setup`` assignments, or of creation in a ``@compact`` method, at every level.
    - **NNX**: no sample call; modules are taken in the order their attributes were assigned (``nnx.state``
      itself sorts by name), list entries in list order.
    - **Equinox**: ``args`` may hold the model's ``eqx.nn.State`` (the running statistics' shapes are read from
      the state indices otherwise); modules are taken in field order, then list order.

    The i-th torch module of ``state_dict`` that holds parameters or buffers is paired with the i-th JAX module
    that holds convertible leaves (kernel/weight, embedding, scale, bias, running statistics), and each pair must
    agree in kind (norm, linear, conv, conv_transpose, embedding; the JAX module says which of those a state_dict's
    shapes cannot tell apart, ``kinds`` names them from torch's side) and in every converted shape. ``names``
    fixes some pairs by hand; the rest are paired by order. Returns a :class:`Names` (a dict that also carries the
    kind of each pair); raises ``ValueError`` naming the first pair that does not match.
    """
    kind = framework(model)
    if kind == "nnx":
        if args or init_kwargs:
            raise TypeError("derive_names: an NNX model needs no sample call; pass only state_dict and model.")
        return derive_nnx(state_dict, model, names=names, kinds=kinds)
    if kind == "equinox":
        if len(args) > 1 or init_kwargs:
            raise TypeError("derive_names: an Equinox model takes at most its eqx.nn.State after the model.")
        return derive_equinox(state_dict, model, args[0] if args else None, names=names, kinds=kinds)
    return derive_linen(state_dict, model, args, init_kwargs, names=names, kinds=kinds)


__all__ = ["Names", "Recording", "Report", "Row", "compare", "compare_fixture", "derive_names", "equinox_to_torch",
           "flax_to_torch", "nnx_to_torch", "record_torch", "torch_kinds", "torch_to_equinox", "torch_to_flax",
           "torch_to_nnx"]
