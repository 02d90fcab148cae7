"""Observing a JAX model's modules for :func:`jaxnorm.interop.compare`: the per-call hook every probed module goes
through (its output recorded; in isolated mode, its inputs replaced by its torch twin's), and the ways each
framework routes a module's call through it (linen's interceptor, a temporary ``__call__`` wrapper for NNX,
``eqx.tree_at`` probes for Equinox)."""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from jaxnorm.interop._record import first_tensor

_MISSING = object()


def trace_level() -> Any:
    """Which JAX transformation is running (Flax NNX's own test for a Variable updated across one)."""
    from jax.extend.core import get_opaque_trace_state

    return get_opaque_trace_state(convention="nnx")


class Probes:
    """The per-call hook every probed JAX module goes through: records its output and, in isolated mode, swaps
    its array arguments for the ones its torch twin received."""

    def __init__(self, paths: Sequence[str], isolated: Mapping[str, list[list[Any]]] | None,
                 nested: set[str]):
        self.records: dict[str, list[Any]] = {p: [] for p in paths}
        self.isolated = isolated
        self.nested = nested  # paths called inside a transformation of the model's own: not recorded
        self.level = trace_level()

    def call(self, path: str, fn: Callable, args: tuple, kwargs: dict) -> Any:
        import jax.numpy as jnp

        if trace_level() != self.level:  # e.g. an Equinox Linear under the model's own jax.vmap over positions:
            self.nested.add(path)  # its output exists only inside that vmap, so it cannot be compared
            return fn(*args, **kwargs)
        calls = self.records[path]
        if self.isolated is not None and path in self.isolated and len(calls) < len(self.isolated[path]):
            given, replaced = self.isolated[path][len(calls)], list(args)
            for i, value in enumerate(given[:len(args)]):
                if np.shape(value) != np.shape(args[i]):
                    raise ValueError(
                        f"compare(isolated=True): the torch twin of {path!r} received an input of shape "
                        f"{np.shape(value)} (after the layout) where the JAX module takes {np.shape(args[i])}; pass "
                        "layouts= for this module, or compare it chained.")
                replaced[i] = jnp.asarray(value, dtype=jnp.result_type(args[i]))
            args = tuple(replaced)
        out = fn(*args, **kwargs)
        calls.append(first_tensor(out))
        return out


def flag_kwargs(fn: Any, train: bool) -> dict[str, Any]:
    """``train=`` or ``use_running_average=`` where the call takes it (the usual Flax conventions)."""
    try:
        parameters = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # pragma: no cover - builtins
        return {}
    if "train" in parameters:
        return {"train": train}
    if "use_running_average" in parameters:
        return {"use_running_average": not train}
    return {}


def has_path(tree: Mapping, path: str) -> bool:
    from jaxnorm._tree import get_path

    return get_path(tree, path) is not None


@contextlib.contextmanager
def wrapped_calls(classes: set[type], hook: Callable[[Any, Callable, tuple, dict], Any]):
    """Within the block, ``cls.__call__`` of each class goes through ``hook(self, original, args, kwargs)``."""
    saved = {cls: cls.__dict__.get("__call__", _MISSING) for cls in classes}
    for cls in classes:
        def wrapper(self, *args, __original=cls.__call__, **kwargs):
            return hook(self, __original, args, kwargs)
        cls.__call__ = wrapper  # type: ignore[method-assign, assignment]
    try:
        yield
    finally:
        for cls, original in saved.items():
            if original is _MISSING:
                del cls.__call__  # type: ignore[method-assign]
            else:
                cls.__call__ = original  # type: ignore[method-assign]


# the probes of the compare run in progress: a stack set only inside `active`'s `with` block (as linen's
# nn.intercept_methods), so a probed Equinox model called outside it runs as the original
_ACTIVE: list[Probes] = []


@contextlib.contextmanager
def active(probes: Probes):
    _ACTIVE.append(probes)
    try:
        yield
    finally:
        _ACTIVE.remove(probes)


@functools.cache
def _probe_class() -> type:
    import equinox as eqx

    class Probe(eqx.nn.StatefulLayer):
        """An Equinox module in a probed copy of the model: calls ``inner`` through the active probes."""

        inner: Any
        path: str = eqx.field(static=True)

        def is_stateful(self) -> bool:
            return isinstance(self.inner, eqx.nn.StatefulLayer) and self.inner.is_stateful()

        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            if not _ACTIVE:
                return self.inner(*args, **kwargs)
            return _ACTIVE[-1].call(self.path, self.inner, args, kwargs)

        def __getattr__(self, name: str) -> Any:  # the parent may read its child's fields
            if name.startswith("__") or name in ("inner", "path"):
                raise AttributeError(name)
            return getattr(self.inner, name)

    return Probe


def probe(inner: Any, path: str) -> Any:
    """A probe of ``inner`` (its class is made on first use: equinox is optional)."""
    return _probe_class()(inner, path)
