"""Where a port differs: PyTorch's per-module outputs, running statistics and gradients next to the JAX model's.

:func:`record_torch` runs the torch model with forward hooks on every module that holds parameters or buffers
and keeps what each one received and produced (eval and training mode), the running statistics after the
training-mode batch and, given a loss, every parameter's gradient: a :class:`Recording`, which saves to and loads
from an ``.npz`` file. :func:`compare_fixture` runs the JAX model on the same inputs and compares, module by
module, with no torch needed; :func:`compare` does both in one call. The JAX side sees each module's output
through an interceptor (linen), a temporary wrapper of the paired classes' ``__call__`` (NNX, on a merged copy)
or ``eqx.tree_at`` probes (Equinox); the model passed in is never changed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from jaxnorm.interop import _pairing as pairing
from jaxnorm.interop._equinox import EquinoxRunner
from jaxnorm.interop._linen import LinenRunner
from jaxnorm.interop._nnx import NNXRunner
from jaxnorm.interop._record import MODES, Recording, first_tensor, record_torch
from jaxnorm.interop._report import BUFFERS, Report, Row, make_row

Layout = str | Callable[[np.ndarray], Any] | None


# ------------------------------------------------------------------------------------------- layouts


def _layout_fn(layout: Layout) -> Callable[[np.ndarray], Any]:
    if layout is None:
        return lambda a: a
    if layout == "channels_last":  # images and volumes: NC... -> N...C; tokens (N, L, D), (N, C) are left alone
        return lambda a: np.moveaxis(a, 1, -1) if np.ndim(a) >= 4 else a
    if callable(layout):
        return layout
    raise ValueError(f"compare: layout={layout!r}; pass None (the same layout as torch), 'channels_last' "
                     "(NCHW -> NHWC for every array of rank 4 or more) or a function of a NumPy array.")


def _by_prefix(table: Mapping[str, Any], prefix: str, default: Any) -> Any:
    """The value of the longest key of ``table`` that is ``prefix`` or one of its parent modules."""
    parents = [prefix[:i] for i in range(len(prefix), 0, -1) if i == len(prefix) or prefix[i] == "."]
    return next((table[p] for p in parents if p in table), default)


# ------------------------------------------------------------------------------------------- compare


def _split_loss(loss: Any) -> tuple[Any, Any]:
    if loss is None:
        return None, None
    if isinstance(loss, tuple):
        if len(loss) != 2 or not all(callable(f) for f in loss):
            raise TypeError("compare: `loss` is one function of the output (used for both models) or a pair "
                            "(torch_loss, jax_loss).")
        return loss
    if not callable(loss):
        raise TypeError(f"compare: `loss` must be callable, got {type(loss).__name__}.")
    return loss, loss


def compare(torch_model: Any, jax_model: Any, inputs: Any, *, variables: Any = None, state: Any = None,
            names: Mapping[str, str] | None = None, kinds: Mapping[str, str] | None = None, layout: Layout = None,
            layouts: Mapping[str, Layout] | None = None, loss: Any = None, isolated: bool = False,
            modes: Sequence[str] = MODES, tolerance: Mapping[str, float] | None = None,
            tolerances: Mapping[str, Mapping[str, float]] | None = None, axis_name: Any = "batch",
            eval_kwargs: Mapping[str, Any] | None = None, train_kwargs: Mapping[str, Any] | None = None,
            rename: Mapping[str, Any] | None = None, save: str | None = None) -> Report:
    """Run a PyTorch model and its JAX port on the same input and report, module by module, how far apart they are.

    - ``jax_model``: a linen module (with ``variables=``), an NNX module, or an Equinox model (with its
      ``eqx.nn.State`` as ``state=``, called as ``model(*inputs, state) -> (y, state)``, or ``model(*inputs)``
      without state, under ``jax.vmap(..., axis_name=axis_name)`` over the batch).
    - ``inputs``: an array or a tuple of arrays in torch's layout; ``layout`` gives the JAX model its twin and maps
      every module's output the same way before comparing: None (the same layout), ``"channels_last"`` (NCHW ->
      NHWC, axis 1 to the end for every array of rank 4 or more: images and volumes; token arrays ``(N, L, D)``
      are left alone) or a function; ``layouts={prefix: ...}`` for modules whose arrays are laid out otherwise
      (e.g. ConvNeXt's LayerNorm after a permute: ``None``; a 1-D conv's ``(N, C, L)``: a function), a prefix
      covering its submodules too.
    - ``names``: torch prefix -> JAX path, as for the converters; derived by declaration order where left out.
    - Compared: every paired module's output (each call), in eval and in training mode (``modes``); the running
      statistics and ``num_batches_tracked`` after the training-mode batch; with ``loss`` (one function of the
      output for both models, or a pair ``(torch_loss, jax_loss)``), every parameter's gradient in training mode.
      Linen models get ``train=``/``use_running_average=`` where their call takes it (or ``eval_kwargs`` /
      ``train_kwargs``); NNX models ``.train()`` / ``.eval()`` on a copy; Equinox ``eqx.nn.inference_mode``.
    - ``isolated=True`` feeds each paired JAX module the exact inputs its torch twin received (recorded with
      forward hooks), so a fault shows at its own module even when errors pile up downstream. Gradients are always
      of the whole chained model.
    - Tolerances: ``|jax - torch| <= atol * max|torch| + rtol * |torch|`` per array, with the float32 "model" entry of
      jaxnorm's tolerance table (atol 3e-5, rtol 1e-5) for float32 arrays, or ``tolerance=dict(atol=, rtol=)``
      for all and ``tolerances={prefix: dict(...)}`` per module and its submodules; ``num_batches_tracked`` must be
      equal.
    - ``save="port.npz"`` also writes what PyTorch produced, for :func:`compare_fixture` to repeat the comparison
      without torch.

    Returns a :class:`Report`; ``report.assert_close()`` in a parity test. torch is imported here, not before.
    Neither model is changed. For an NNX model the paired classes' ``__call__`` is wrapped while compare runs, so
    do not call those classes from another thread meanwhile.
    """
    torch_loss, jax_loss = _split_loss(loss)
    recording = record_torch(torch_model, inputs, loss=torch_loss, modes=modes, rename=rename)
    if rename is None:  # the kinds a state_dict cannot tell (ConvTranspose, Embedding), from the torch model
        kinds = {**pairing.torch_kinds(torch_model), **(kinds or {})}
    if save is not None:
        recording.save(save)
    return compare_fixture(recording, jax_model, variables=variables, state=state, names=names, kinds=kinds,
                           layout=layout, layouts=layouts, loss=jax_loss, isolated=isolated, modes=modes,
                           tolerance=tolerance, tolerances=tolerances, axis_name=axis_name, eval_kwargs=eval_kwargs,
                           train_kwargs=train_kwargs)


def compare_fixture(fixture: str | Recording, jax_model: Any, *, variables: Any = None, state: Any = None,
                    names: Mapping[str, str] | None = None, kinds: Mapping[str, str] | None = None,
                    layout: Layout = None, layouts: Mapping[str, Layout] | None = None, loss: Any = None,
                    isolated: bool = False, modes: Sequence[str] | None = None,
                    tolerance: Mapping[str, float] | None = None,
                    tolerances: Mapping[str, Mapping[str, float]] | None = None, axis_name: Any = "batch",
                    eval_kwargs: Mapping[str, Any] | None = None,
                    train_kwargs: Mapping[str, Any] | None = None) -> Report:
    """:func:`compare` against a saved fixture (a path written by ``compare(..., save=path)`` or a
    :class:`Recording`), with no torch needed: the same arguments, ``loss`` being the JAX loss, and ``modes``
    defaulting to the modes the fixture holds."""
    import jax.numpy as jnp

    from jaxnorm.interop import framework

    recording = fixture if isinstance(fixture, Recording) else Recording.load(fixture)
    modes = list(recording.modes) if modes is None else list(modes)
    for mode in modes:
        if mode not in recording.modes:
            raise ValueError(f"compare: mode {mode!r} is not in the fixture, which holds {list(recording.modes)}.")
    if loss is not None and not callable(loss):
        raise TypeError(f"compare_fixture: `loss` must be a function of the JAX model's output, got {loss!r}.")
    kind = framework(jax_model)
    side: Any = (LinenRunner(jax_model, variables, eval_kwargs, train_kwargs) if kind == "linen" else
                 NNXRunner(jax_model) if kind == "nnx" else EquinoxRunner(jax_model, state, axis_name))
    default = _layout_fn(layout)
    per_module = {prefix: _layout_fn(value) for prefix, value in (layouts or {}).items()}
    layout_of = lambda prefix: _by_prefix(per_module, prefix, default)
    jax_inputs = tuple(jnp.asarray(default(a)) for a in recording.inputs)
    names = side.derive(recording.state_dict, jax_inputs, names, kinds)
    kinds = dict(kinds or {})
    paths = list(dict.fromkeys(names.values()))
    tol_of = lambda prefix: _by_prefix(tolerances or {}, prefix, tolerance)
    rows: list[Row] = []
    order: list[str] = []
    for mode in modes:
        record = recording.modes[mode]
        order += [p for p in record.order if p not in order]
        isolated_inputs = None
        if isolated:
            isolated_inputs = {names[p]: [[layout_of(p)(a) for a in call.inputs] for call in calls]
                               for p, calls in record.calls.items() if p in names}
        y, outputs, after, nested = side.run(jax_inputs, mode == "train", paths, isolated_inputs)
        for prefix in record.order:
            if prefix not in names:
                continue
            path, calls, got = names[prefix], record.calls[prefix], outputs[names[prefix]]
            if path in nested:
                rows.append(Row(prefix, path, mode, "output", float("nan"), float("nan"), 0.0, 0.0, ok=True,
                                note="not compared: the JAX module runs inside a transformation of the model's own "
                                     "(e.g. a jax.vmap over positions), outside which its output does not exist",
                                skipped=True))
                continue
            for i, call in enumerate(calls):
                quantity = "output" if i == 0 else f"output (call {i + 1})"
                note = "" if i < len(got) else f"called {len(calls)} times by torch, {len(got)} by the JAX model"
                rows.append(make_row(prefix, path, mode, quantity, got[i] if i < len(got) else None,
                                 np.asarray(layout_of(prefix)(call.output)), tol_of(prefix), note))
            if len(got) > len(calls):
                rows.append(make_row(prefix, path, mode, f"output (call {len(calls) + 1})", None, np.zeros(()),
                                 tol_of(prefix), f"called {len(got)} times by the JAX model, {len(calls)} by torch"))
        for prefix in (p for p in names if p not in record.calls):
            rows.append(Row(prefix, names[prefix], mode, "output", float("nan"), float("nan"), 0.0, 0.0, ok=True,
                            note="not compared: torch never called this module through its forward (its parameters "
                                 "are used by its parent's, as a MultiheadAttention's out_proj by the attention)",
                            skipped=True))
        rows.append(make_row("(output)", "(output)", mode, "output", first_tensor(y),
                         np.asarray(default(record.output)), tolerance))
        if mode == "train" and recording.train_state is not None:
            converted = side.to_torch(after, names, kinds)
            for key, expected in recording.train_state.items():
                prefix, _, leaf = key.rpartition(".")
                if prefix not in names or leaf not in BUFFERS:
                    continue
                note = "" if key in converted else (
                    "the JAX module keeps no count (a BatchNorm with flax_momentum, or flax's own)"
                    if leaf == "num_batches_tracked" else "the JAX module keeps no running statistics")
                rows.append(make_row(prefix, names[prefix], mode, leaf, converted.get(key), np.asarray(expected),
                                 tol_of(prefix), note))
    if recording.grads is not None and loss is not None and "train" in modes:
        # a gradient's scale is its module's largest gradient: a conv bias before a norm layer has a gradient that
        # is zero in exact arithmetic, and both frameworks' rounding noise, which only the weight's scale measures
        converted = side.grads(jax_inputs, loss, names, kinds)
        attention = pairing.attention_prefixes(recording.grads)  # an attention's out_proj is the attention's
        module_scale: dict[str, float] = {}
        for key, expected in recording.grads.items():
            prefix = pairing.split_key(key, attention)[0]
            module_scale[prefix] = max(module_scale.get(prefix, 0.0), float(np.max(np.abs(expected), initial=0.0)))
        for key, expected in recording.grads.items():
            prefix, leaf = pairing.split_key(key, attention)
            if prefix in names:
                rows.append(make_row(prefix, names[prefix], "train", f"grad {leaf}", converted.get(key),
                                 np.asarray(expected), tol_of(prefix), scale=module_scale[prefix]))
    return Report(rows, order, {"linen": "Flax", "nnx": "NNX", "equinox": "Equinox"}[kind], isolated, dict(names))

