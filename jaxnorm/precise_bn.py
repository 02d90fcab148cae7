"""Precise BN: recompute every jaxnorm BatchNorm's running statistics as true population statistics.

Like fvcore's ``update_bn_stats``: after training (or after SWA weight averaging), run N batches through the model
in training mode and set each BatchNorm's ``mean``/``var`` to the exact mean and unbiased variance of everything
its input saw over those batches, instead of a momentum average::

    batch_stats = jaxnorm.precise_bn.recalibrate(model, variables, batches, num_batches=200, train=True)  # linen
    jaxnorm.precise_bn.recalibrate(nnx_model, batches, num_batches=200)                                 # NNX

Each batch is one jit-compiled forward pass that records each BatchNorm's input moments (per feature, its mask
respected); the batches are combined exactly (Chan et al., ``jaxnorm._combine``), so the result equals the
statistics of the concatenated batches. ``count`` is left unchanged. The model itself is not changed: linen
layers are observed with a Flax method interceptor, NNX layers through the wrapper's input hook.
``jaxnorm.equinox.BatchNorm`` is not supported: an Equinox layer sees one example under the caller's
``jax.vmap``, so the batch's moments exist only inside that vmap, and the model's call does not hand them out.
There, run the batches in training mode with ``torch_momentum=None`` (the cumulative average, what
``torch.optim.swa_utils.update_bn`` computes) on fresh running statistics.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxnorm import linen as _linen
from jaxnorm import nnx as _nnx
from jaxnorm._checks import canonical_axes
from jaxnorm._combine import combine
from jaxnorm._moments import moments
from jaxnorm._statistics import unbiased_variance, variance
from jaxnorm._tree import get_path, set_path, walk

__all__ = ["recalibrate"]

_COLLECTION = "precise_bn_moments"


def _triple(x: Any, axis: Any, mask: Any) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(count, mean, M2) of x per feature on ``axis`` (an int or a tuple, as the BatchNorms accept)."""
    feats = canonical_axes(axis, x.ndim, "recalibrate", name="axis")
    fshape = tuple(x.shape[a] for a in feats)
    mean, var, count = moments(x, tuple(i for i in range(x.ndim) if i not in feats), mask=mask)
    count = jnp.broadcast_to(count, mean.shape)
    return count.reshape(fshape), mean.reshape(fshape), (var * count).reshape(fshape)


def _merge(triples: list) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The exact (count, mean, M2) of the union of disjoint parts."""
    return combine(*(jnp.stack(part) for part in zip(*triples, strict=True)))


def recalibrate(model: Any, *args: Any, num_batches: int | None = None, progress: bool = True,
                **call_kwargs: Any) -> Any:
    """Precise BN: set every jaxnorm BatchNorm's ``mean`` to the mean and ``var`` to the unbiased variance
    ``M2 / (n - 1)`` of all its inputs over ``num_batches`` batches, combined exactly (Chan et al.).

    Args:
      model: a Flax linen module, called as ``recalibrate(model, variables, batches, **apply_kwargs)``, or a Flax
        NNX module in training mode (``model.train()``), called as ``recalibrate(model, batches, **call_kwargs)``.
      *args: linen: ``(variables, batches)``; NNX: ``(batches,)``. ``batches`` yields model inputs (or tuples
        whose first element is the input).
      num_batches: how many batches to use (default: all).
      progress: show a tqdm progress bar.
      **call_kwargs: linen: ``model.apply``'s keywords, which must put the model in training mode (e.g.
        ``train=True``); NNX: the model call's.

    Returns:
      linen: the new ``batch_stats``; NNX: the model, its BatchNorm statistics set in place. A layer called
      several times in a forward pass pools all its inputs.
    """
    if isinstance(model, nn.Module):
        if len(args) != 2:
            raise TypeError("recalibrate: a linen model takes (model, variables, batches, ...).")
        return _recalibrate_linen(model, *args, num_batches=num_batches, progress=progress, **call_kwargs)
    from flax import nnx

    if isinstance(model, nnx.Module):
        if len(args) != 1:
            raise TypeError("recalibrate: an NNX model takes (model, batches, ...); its variables are the model's.")
        return _recalibrate_nnx(model, args[0], num_batches=num_batches, progress=progress, **call_kwargs)
    if type(model).__module__.split(".")[0] == "equinox" or any(
            c.__module__.startswith("equinox") for c in type(model).__mro__):
        raise TypeError(
            f"recalibrate: Equinox models are not supported (got {type(model).__name__}): a jaxnorm.equinox "
            "BatchNorm sees one example under the caller's jax.vmap, so the batch's moments exist only inside that "
            "vmap and recalibrate cannot read them. Run the batches in training mode through BatchNorms made with "
            "torch_momentum=None (the cumulative average, what torch.optim.swa_utils.update_bn computes) on fresh "
            "running statistics instead."
        )
    raise TypeError(f"recalibrate: `model` must be a flax.linen or flax.nnx Module, got {type(model).__name__}.")


def _inputs(batches: Iterable[Any], num_batches: int | None, progress: bool) -> Iterator[Any]:
    it = iter(batches)
    if progress:
        try:
            from tqdm.auto import tqdm

            it = iter(tqdm(it, total=num_batches, desc="precise BN", leave=False))
        except ImportError:  # tqdm is optional
            pass
    for i, batch in enumerate(it):
        if num_batches is not None and i >= num_batches:
            return
        yield batch[0] if isinstance(batch, (tuple, list)) else batch


def _accumulate(per_batch: Iterator[dict[str, list]]) -> dict[str, tuple]:
    """{layer: (count, mean, M2)} over every batch's {layer: [triple per call]}."""
    totals: dict[str, tuple] | None = None
    for step in per_batch:
        merged = {p: _merge(calls) for p, calls in step.items()}
        totals = merged if totals is None else {p: _merge([totals[p], merged[p]]) for p in merged}
    if totals is None:
        raise ValueError("recalibrate: `batches` yielded no batch.")
    return totals


def _unbiased(n: jax.Array, m2: jax.Array) -> jax.Array:
    return unbiased_variance(variance(m2, n), n)


def _record_linen(next_fun, args, kwargs, context):
    module = context.module
    if isinstance(module, _linen.BatchNorm) and context.method_name == "__call__":
        module.sow(_COLLECTION, "moments", _triple(args[0], module.axis, kwargs.get("mask")))
    return next_fun(*args, **kwargs)


def _recalibrate_linen(model, variables, batches, *, num_batches, progress, **apply_kwargs):
    @jax.jit
    def moments_of(variables, x):
        with nn.intercept_methods(_record_linen):
            _, state = model.apply(variables, x, mutable=["batch_stats", _COLLECTION], **apply_kwargs)
        recorded = state.get(_COLLECTION, {})
        # one triple per call of each layer: a layer called twice in a forward pass sees both inputs
        return {path.rsplit("/", 1)[0]: list(calls) for path, calls in walk(recorded)}

    totals = _accumulate(moments_of(variables, x) for x in _inputs(batches, num_batches, progress))
    new_stats = jax.tree.map(lambda v: v, variables["batch_stats"])  # a fresh copy of the nested dicts
    for path, (n, mean, m2) in totals.items():
        dtype = get_path(variables["batch_stats"], path)["mean"].dtype
        set_path(new_stats, f"{path}/mean", mean.astype(dtype))
        set_path(new_stats, f"{path}/var", _unbiased(n, m2).astype(dtype))
    return new_stats


def _recalibrate_nnx(model, batches, *, num_batches, progress, **call_kwargs):
    from flax import nnx

    layers = {"/".join(map(str, path)): m for path, m in nnx.iter_modules(model) if isinstance(m, _nnx.BatchNorm)}
    evaluating = [p for p, m in layers.items() if m.use_running_average]
    if evaluating:
        raise ValueError(f"recalibrate: BatchNorm {evaluating[0]!r} is in evaluation mode; call model.train() first "
                         "(precise BN runs the batches in training mode, as fvcore's update_bn_stats).")
    graphdef, state = nnx.split(model)

    @jax.jit
    def moments_of(state, x):
        copy = nnx.merge(graphdef, state)  # updates to the copy's statistics are dropped: the model is unchanged
        names = {id(m): "/".join(map(str, path)) for path, m in nnx.iter_modules(copy)}
        recorded: dict[str, list] = {}
        with _nnx.observe_inputs(lambda m, x, mask: recorded.setdefault(names[id(m)], []).append(
                _triple(x, m.axis, mask))):
            copy(x, **call_kwargs)
        return recorded

    totals = _accumulate(moments_of(state, x) for x in _inputs(batches, num_batches, progress))
    for path, (n, mean, m2) in totals.items():
        layer = layers[path]
        layer.mean[...] = mean.astype(layer.mean[...].dtype)
        layer.var[...] = _unbiased(n, m2).astype(layer.var[...].dtype)
    return model
