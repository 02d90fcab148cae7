"""Precise BN: recompute every jaxnorm BatchNorm's running statistics as true population statistics.

Like fvcore's ``update_bn_stats`` and ``torch.optim.swa_utils.update_bn``: after training (or after SWA weight
averaging), run N batches through the model in training mode and set each BatchNorm's ``mean``/``var`` to the
exact mean and unbiased variance of everything its input saw over those batches, instead of a momentum average.

    batch_stats = jaxnorm.precise_bn.recalibrate(model, variables, batches, num_batches=200, train=True)

Works for any Flax linen model built with ``jaxnorm.linen.BatchNorm`` (a Flax method interceptor records each
layer's input moments; no model changes). Each batch is one jit-compiled forward pass; batches are combined exactly
(Chan et al.), so the result equals the statistics of the concatenated batches.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxnorm import _core
from jaxnorm._tree import get_path, set_path, walk
from jaxnorm.linen import BatchNorm

__all__ = ["recalibrate"]

_COLLECTION = "precise_bn_moments"


def _record_moments(next_fun, args, kwargs, context):
    module = context.module
    if isinstance(module, BatchNorm) and context.method_name == "__call__":
        x = args[0]
        ax = _core.canonical_axis(module.axis, x.ndim, "recalibrate")
        mean, var, count = _core.moments(x, tuple(i for i in range(x.ndim) if i != ax), mask=kwargs.get("mask"))
        c = x.shape[ax]
        module.sow(_COLLECTION, "moments",
                   (jnp.broadcast_to(count, mean.shape).reshape(c), mean.reshape(c), (var * count).reshape(c)))
    return next_fun(*args, **kwargs)


def _combine(a, b):
    """Chan et al.: (count, mean, M2) of the union of two disjoint sets."""
    (na, ma, m2a), (nb, mb, m2b) = a, b
    n = na + nb
    delta = mb - ma
    mean = ma + delta * nb / jnp.maximum(n, 1)
    return n, mean, m2a + m2b + jnp.square(delta) * na * nb / jnp.maximum(n, 1)


def recalibrate(
    model: nn.Module,
    variables: dict[str, Any],
    batches: Iterable[Any],
    *,
    num_batches: int | None = None,
    progress: bool = True,
    **apply_kwargs: Any,
) -> dict[str, Any]:
    """Return new ``batch_stats`` with population statistics over ``num_batches`` batches (default: all).

    ``batches`` yields model inputs (or tuples whose first element is the input); ``apply_kwargs`` are passed to
    ``model.apply`` and must put the model in training mode (e.g. ``train=True``). ``count`` is left unchanged.
    """

    @jax.jit
    def moments_of(variables, x):
        with nn.intercept_methods(_record_moments):
            _, state = model.apply(variables, x, mutable=["batch_stats", _COLLECTION], **apply_kwargs)
        return state.get(_COLLECTION, {})

    it = iter(batches)
    if progress:
        try:
            from tqdm.auto import tqdm

            it = iter(tqdm(it, total=num_batches, desc="precise BN", leave=False))
        except ImportError:  # tqdm is optional
            pass
    totals = None
    for i, batch in enumerate(it):
        if num_batches is not None and i >= num_batches:
            break
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        recorded = moments_of(variables, x)
        # one triple per call of each layer: a layer called twice in a forward pass sees both inputs
        per_layer = {path.rsplit("/", 1)[0]: calls for path, calls in walk(recorded)}
        step = {p: _merge_calls(calls) for p, calls in per_layer.items()}
        totals = step if totals is None else {p: _combine(totals[p], step[p]) for p in step}
    if totals is None:
        raise ValueError("recalibrate: `batches` yielded no batch.")
    new_stats = jax.tree.map(lambda v: v, variables["batch_stats"])  # a fresh copy of the nested dicts
    for path, (n, mean, m2) in totals.items():
        old = get_path(variables["batch_stats"], path)
        dtype = old["mean"].dtype
        set_path(new_stats, f"{path}/mean", mean.astype(dtype))
        set_path(new_stats, f"{path}/var", (m2 / jnp.maximum(n - 1, 1)).astype(dtype))
    return new_stats


def _merge_calls(calls):
    total = calls[0]
    for triple in calls[1:]:
        total = _combine(total, triple)
    return total
