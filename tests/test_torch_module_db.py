"""PyTorch's own sample inputs for its normalization modules, run through jaxnorm.

PyTorch's test suite describes each module class by a ``ModuleInfo`` in
``torch.testing._internal.common_modules.module_db``: ``module_inputs_func`` yields samples (constructor
arguments and a forward input: zero-size batches, unbatched inputs, ``bias=False``, simple averages, ...) and
``module_error_inputs_func`` inputs that must fail. For every normalization class, float32 and float64, training
and eval, each sample is built in torch, its parameters and buffers randomized (torch's ones and zeros hide
bugs), and jaxnorm's functional layer is called with the same values in one jitted program. Compared: the output,
the running statistics, ``num_batches_tracked`` and the gradients of the input, weight and bias for a random
cotangent. Each error input must be refused by jaxnorm too, with an error that names the argument.

A sample that differs by design is listed in ``DIFFERENCES`` with its reason (the PyTorch guide shows the table);
today none does. Needs torch and ``expecttest`` (which torch's testing module imports): both in the test extra.
"""

from __future__ import annotations

import dataclasses
import inspect
import pathlib
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
common_modules = pytest.importorskip("torch.testing._internal.common_modules",
                                     reason="torch's module_db needs expecttest: pip install expecttest")

import jaxnorm  # noqa: E402
from tests.tolerances import tol  # noqa: E402

pytestmark = pytest.mark.torch

CLASSES = ("BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d",
           "GroupNorm", "LayerNorm", "RMSNorm", "LocalResponseNorm")
INFOS = {info.module_cls.__name__: info for info in common_modules.module_db
         if info.module_cls.__name__ in CLASSES}
DTYPES = {"float32": torch.float32, "float64": torch.float64}

# (class, sample description, dtype or None for both, training or None for both) -> why jaxnorm differs by design
DIFFERENCES: dict[tuple[str, str, str | None, bool | None], str] = {}


def markdown() -> str:
    """The table of differences for docs/guides/pytorch.md."""
    rows = [f"| {cls} | {desc} | {dtype or 'both'}, {'both' if training is None else 'train' if training else 'eval'} "
            f"| {why} |" for (cls, desc, dtype, training), why in DIFFERENCES.items()]
    rows = rows or ["| — | none: every sample matches | | |"]
    return "\n".join(["| class | sample | dtype, mode | why jaxnorm differs |", "|---|---|---|---|", *rows])


def test_the_pytorch_guide_holds_the_table_of_differences():
    guide = (pathlib.Path(__file__).resolve().parents[1] / "docs" / "guides" / "pytorch.md").read_text()
    assert markdown() in guide, "paste the output of tests.test_torch_module_db.markdown() into the guide"


def _samples(cls: str, dtype: str, training: bool) -> list:
    info = INFOS[cls]
    return list(info.module_inputs_func(info, device="cpu", dtype=DTYPES[dtype], requires_grad=True,
                                        training=training))


def _cases() -> list:
    cases = []
    for cls in CLASSES:
        for dtype in DTYPES:
            for training in (True, False):
                for i, sample in enumerate(_samples(cls, dtype, training)):
                    mode = "train" if training else "eval"
                    cases.append(pytest.param(cls, dtype, training, i,
                                              id=f"{cls}-{sample.desc or 'default'}-{dtype}-{mode}"))
    return cases


def _randomize(module, rng: np.random.Generator) -> None:
    """Weight and running variance spread around 1, bias and running mean around 0, a non-zero batch count."""
    values = {"weight": lambda n: rng.uniform(0.5, 1.5, n), "bias": lambda n: rng.normal(0, 0.5, n),
              "running_mean": lambda n: rng.normal(0, 0.5, n), "running_var": lambda n: rng.uniform(0.5, 2.0, n)}
    with torch.no_grad():
        for name, t in [*module.named_parameters(), *module.named_buffers()]:
            if name == "num_batches_tracked":
                t.fill_(3)
            else:
                t.copy_(torch.as_tensor(values[name](t.numel())).reshape(t.shape))


def _init(cls: str, ctor, dtype: str) -> tuple[dict, dict]:
    """jaxnorm's fresh state from the torch constructor's own arguments, keyword for keyword (``bias=False``
    included), through the init functions."""
    bound = inspect.signature(INFOS[cls].module_cls).bind(*ctor.args, **ctor.kwargs)
    bound.apply_defaults()
    a, dt = bound.arguments, jnp.dtype(dtype)
    if cls.startswith(("BatchNorm", "InstanceNorm")):
        init = jaxnorm.batch_norm_init if cls.startswith("BatchNorm") else jaxnorm.instance_norm_init
        return init(a["num_features"], affine=a["affine"], bias=a["bias"],
                    track_running_stats=a["track_running_stats"], dtype=dt)
    if cls == "GroupNorm":
        return jaxnorm.group_norm_init(a["num_groups"], a["num_channels"], affine=a["affine"], bias=a["bias"],
                                       dtype=dt), {}
    if cls == "LayerNorm":
        return jaxnorm.layer_norm_init(a["normalized_shape"], elementwise_affine=a["elementwise_affine"],
                                       bias=a["bias"], dtype=dt), {}
    if cls == "RMSNorm":
        return jaxnorm.rms_norm_init(a["normalized_shape"], elementwise_affine=a["elementwise_affine"], dtype=dt), {}
    return {}, {}


def _arrays(module) -> tuple[dict, dict]:
    """jaxnorm's (params, batch_stats) holding the torch module's parameters and buffers."""
    as_jax = lambda t: jnp.asarray(t.detach().numpy())
    params = {k: as_jax(getattr(module, t)) for k, t in (("scale", "weight"), ("bias", "bias"))
              if getattr(module, t, None) is not None}
    stats = {}
    if getattr(module, "running_mean", None) is not None:
        stats = {"mean": as_jax(module.running_mean), "var": as_jax(module.running_var),
                 "count": jnp.asarray(int(module.num_batches_tracked), jnp.int32)}
    return params, stats


def _layer(module, x_ndim: int, training: bool):
    """``(params, batch_stats, x) -> (y, batch_stats)``: the jaxnorm call equivalent to ``module``."""
    cls = type(module).__name__
    if cls.startswith("BatchNorm"):
        return lambda p, s, x: jaxnorm.batch_norm(p, s, x, training=training, momentum=module.momentum,
                                                  eps=module.eps)
    if cls.startswith("InstanceNorm"):
        batched = x_ndim != module._get_no_batch_dim()  # torch's own test for an unbatched input
        return lambda p, s, x: jaxnorm.instance_norm(p, s, x, training=training, momentum=module.momentum,
                                                     eps=module.eps, batched=batched)
    if cls == "GroupNorm":
        return lambda p, s, x: (jaxnorm.group_norm(p, x, num_groups=module.num_groups, eps=module.eps), s)
    if cls == "LayerNorm":
        return lambda p, s, x: (jaxnorm.layer_norm(p, x, normalized_shape=module.normalized_shape,
                                                   eps=module.eps), s)
    if cls == "RMSNorm":
        return lambda p, s, x: (jaxnorm.rms_norm(p, x, normalized_shape=module.normalized_shape, eps=module.eps), s)
    if cls == "LocalResponseNorm":
        return lambda p, s, x: (jaxnorm.local_response_norm(x, size=module.size, alpha=module.alpha,
                                                            beta=module.beta, k=module.k), s)
    raise KeyError(cls)


@dataclasses.dataclass
class Result:
    y: np.ndarray
    stats: dict[str, np.ndarray]
    grads: dict[str, np.ndarray | None]  # dx, dweight, dbias


def _torch_run(module, x, dy) -> Result:
    y = module(x)
    inputs = [x] + [t for t in (getattr(module, "weight", None), getattr(module, "bias", None)) if t is not None]
    grads = torch.autograd.grad(y, inputs, dy, allow_unused=True)
    named = dict(zip(["dx", *(n for n in ("dweight", "dbias") if getattr(module, n[1:], None) is not None)],
                     grads, strict=True))
    stats = {}
    if getattr(module, "running_mean", None) is not None:
        stats = {"mean": module.running_mean, "var": module.running_var, "count": module.num_batches_tracked}
    as_np = lambda t: None if t is None else t.detach().numpy()
    return Result(as_np(y), {k: as_np(v) for k, v in stats.items()}, {k: as_np(v) for k, v in named.items()})


def _jax_run(layer, params, stats, x, dy) -> Result:
    @jax.jit
    def run(params, stats, x, dy):
        (y, new), vjp = jax.vjp(lambda x, p: layer(p, stats, x), x, params)
        dx, dparams = vjp((dy, jax.tree.map(jnp.zeros_like, new)))
        return y, new, dx, dparams

    y, new, dx, dparams = jax.tree.map(np.asarray, run(params, stats, x, dy))
    return Result(y, new, {"dx": dx, "dweight": dparams.get("scale"), "dbias": dparams.get("bias")})


@pytest.mark.parametrize(("cls", "dtype", "training", "index"), _cases())
def test_torch_sample(cls, dtype, training, index):
    torch.manual_seed(index)
    sample = _samples(cls, dtype, training)[index]
    key = next((k for k in DIFFERENCES if k[:2] == (cls, sample.desc) and k[2] in (None, dtype)
                and k[3] in (None, training)), None)
    if key is not None:
        pytest.skip(f"differs by design: {DIFFERENCES[key]}")
    ctor, fwd = sample.constructor_input, sample.forward_input
    module = INFOS[cls].module_cls(*ctor.args, **ctor.kwargs).to(DTYPES[dtype])
    _randomize(module, np.random.default_rng(index))
    module.train(training)
    x = fwd.args[0]
    assert len(fwd.args) == 1 and not fwd.kwargs, "a norm layer's forward takes one input"
    params, stats = _arrays(module)
    # the init functions make the same structure from torch's own constructor arguments
    chex.assert_trees_all_equal_shapes_and_dtypes(_init(cls, ctor, dtype), (params, stats))
    dy = torch.as_tensor(np.random.default_rng(100 + index).normal(size=tuple(x.shape)), dtype=x.dtype)
    layer = _layer(module, x.dim(), training)
    got = _jax_run(layer, params, stats, jnp.asarray(x.detach().numpy()), jnp.asarray(dy.numpy()))
    want = _torch_run(module, x, dy)

    what = f"{cls} {sample.desc!r} {dtype} {'train' if training else 'eval'}"
    assert got.y.shape == want.y.shape and got.y.dtype == want.y.dtype, (what, got.y.shape, want.y.shape)
    np.testing.assert_allclose(got.y, want.y, **tol(dtype), err_msg=f"{what}: output")
    assert sorted(got.stats) == sorted(want.stats), (what, sorted(got.stats), sorted(want.stats))
    for k in ("mean", "var"):
        if k in want.stats:
            np.testing.assert_allclose(got.stats[k], want.stats[k], **tol(dtype), err_msg=f"{what}: running {k}")
    if "count" in want.stats:
        assert int(got.stats["count"]) == int(want.stats["count"]), (what, got.stats["count"], want.stats["count"])
    for k, w in want.grads.items():
        g = got.grads[k]
        assert g is not None and g.shape == w.shape, (what, k)
        np.testing.assert_allclose(g, w, **tol(dtype, "grad"), err_msg=f"{what}: {k}")


# ------------------------------------------------------------------ the inputs torch refuses

_INITS = {"BatchNorm": jaxnorm.batch_norm_init, "InstanceNorm": jaxnorm.instance_norm_init}


def _error_cases() -> list:
    cases = []
    for cls in CLASSES:
        info = INFOS[cls]
        if info.module_error_inputs_func is None:
            continue
        errors = info.module_error_inputs_func(info, device="cpu", dtype=torch.float32, requires_grad=True,
                                               training=True)
        cases += [pytest.param(cls, i, id=f"{cls}-{i}") for i in range(len(errors))]
    return cases


def _jax_construct_and_call(cls: str, ctor, x) -> None:
    """jaxnorm's equivalent of ``cls(*ctor.args, **ctor.kwargs)(x)``, keyword for keyword."""
    sig = inspect.signature(INFOS[cls].module_cls)
    bound = dict(sig.bind(*ctor.args, **ctor.kwargs).arguments)
    if cls == "GroupNorm":
        params = jaxnorm.group_norm_init(bound["num_groups"], bound["num_channels"])
        jaxnorm.group_norm(params, jnp.asarray(x.detach().numpy()), num_groups=bound["num_groups"],
                           eps=bound.get("eps", 1e-5))
        return
    family = re.sub(r"\dd$", "", cls)
    params, stats = _INITS[family](bound["num_features"])
    fn = jaxnorm.batch_norm if family == "BatchNorm" else jaxnorm.instance_norm
    fn(params, stats, jnp.asarray(x.detach().numpy()), training=True, eps=bound.get("eps", 1e-5))


@pytest.mark.parametrize(("cls", "index"), _error_cases())
def test_torch_error_input(cls, index):
    info = INFOS[cls]
    error = info.module_error_inputs_func(info, device="cpu", dtype=torch.float32, requires_grad=True,
                                          training=True)[index]
    sample = error.module_error_input
    ctor, fwd = sample.constructor_input, sample.forward_input
    with pytest.raises(error.error_type, match=error.error_regex):  # torch refuses it ...
        module = info.module_cls(*ctor.args, **ctor.kwargs)
        module(*fwd.args, **fwd.kwargs)
    # ... and so does jaxnorm, at construction or at the call, naming the argument torch's message names
    argument = "eps" if "eps" in error.error_regex else "num_groups"
    x = fwd.args[0] if fwd.args else torch.zeros(2, ctor.args[1])
    with pytest.raises(ValueError, match=rf"`{argument}`"):
        _jax_construct_and_call(cls, ctor, x)
