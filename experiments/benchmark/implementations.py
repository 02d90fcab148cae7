"""The columns and the layers: what each implementation runs for a case, one table entry each.

Adding a layer is one entry in ``LAYERS`` (its jaxnorm, Flax and PyTorch modules); adding a column is one entry
in ``IMPLEMENTATIONS`` (how to build its three timed functions, where it applies, where it is reported). Every
builder returns ``Fns``: the training forward, the evaluation forward and the forward+backward of a training step
(y, the statistics' update, dparams and dx for a cotangent given at run time), with how to wait for them.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from typing import Any

MODES = ("fwd_train", "fwd_eval", "fwd_bwd")


@dataclasses.dataclass(frozen=True)
class Layer:
    jaxnorm: Callable[[int, dict], Any]  # (channel axis, options) -> a jaxnorm.linen module
    flax: Callable[[int, Any, dict], Any]  # (channel axis, dtype, options) -> the flax.linen module, in x's dtype
    torch: Callable[[tuple, dict], Any]  # (NCHW shape, options) -> the torch.nn module
    stateful: bool = False  # running statistics: training and evaluation differ
    rows: bool = False  # statistics over the trailing dims (no channel axis to move; the Pallas kernels apply)


def _layers() -> dict[str, Layer]:
    import flax.linen as nn

    from jaxnorm import linen as jl

    def torch_nn():
        import torch

        return torch.nn

    return {
        "bn": Layer(lambda axis, o: jl.BatchNorm(axis=axis),
                    lambda axis, dtype, o: nn.BatchNorm(axis=axis, momentum=0.9, dtype=dtype),
                    lambda shape, o: (torch_nn().BatchNorm2d if len(shape) == 4 else torch_nn().BatchNorm1d)(shape[1]),
                    stateful=True),
        "in": Layer(lambda axis, o: jl.InstanceNorm(axis=axis),
                    lambda axis, dtype, o: nn.InstanceNorm(use_scale=False, use_bias=False, feature_axes=axis,
                                                           dtype=dtype),
                    lambda shape, o: torch_nn().InstanceNorm2d(shape[1])),
        "gn": Layer(lambda axis, o: jl.GroupNorm(num_groups=o["groups"], axis=axis),
                    lambda axis, dtype, o: nn.GroupNorm(num_groups=o["groups"], reduction_axes=None, dtype=dtype),
                    lambda shape, o: torch_nn().GroupNorm(o["groups"], shape[1])),
        "ln": Layer(lambda axis, o: jl.LayerNorm(), lambda axis, dtype, o: nn.LayerNorm(epsilon=1e-5, dtype=dtype),
                    lambda shape, o: torch_nn().LayerNorm(shape[-1]), rows=True),
        "rms": Layer(lambda axis, o: jl.RMSNorm(epsilon=1e-6),
                     lambda axis, dtype, o: nn.RMSNorm(epsilon=1e-6, dtype=dtype),
                     lambda shape, o: torch_nn().RMSNorm(shape[-1], eps=1e-6), rows=True),
    }


@dataclasses.dataclass(frozen=True)
class Fns:
    fwd_train: Callable[[], object]
    fwd_eval: Callable[[], object]
    fwd_bwd: Callable[[], object]
    sync: Callable[[object], object]
    memory: Callable[[], int] | None = None  # bytes of the compiled forward+backward (temp + output)
    program: Any = None  # the jitted forward+backward, its arguments and the context it is traced in
    args: tuple = ()
    context: Callable[[], Any] = contextlib.nullcontext


@dataclasses.dataclass(frozen=True)
class Setting:
    """What a run allows: PyTorch (installed and wanted), the Pallas kernels (NVIDIA GPUs; interpreted in the
    smoke run)."""

    with_torch: bool
    pallas: bool


@dataclasses.dataclass(frozen=True)
class Implementation:
    name: str  # its key in benchmark.json
    title: str  # its heading in the tables
    build: Callable[[str, tuple, str, dict], Fns]  # (layer, NCHW shape, dtype, options) -> Fns
    applies: Callable[[Layer, tuple, Setting], bool]
    role: str  # "ours" (the ratios' numerator), "variant", "kernel" (also a ratio to the best peer), "peer"
    ms: tuple[str, ...] = ()  # modes shown in the milliseconds table
    gbps: tuple[str, ...] = ()  # modes shown in the bandwidth table
    required: bool = False  # a failure fails the case (else the column is left out of it, the error recorded)


def jax_fns(name: str, layer: str, shape: tuple, dtype: str, options: dict) -> Fns:
    """Fns of a Flax-API module: ``name`` is 'jaxnorm' (channels-last), 'jaxnorm_nchw', 'jaxnorm_pallas' (traced
    with ``jaxnorm.kernels`` enabled: the Pallas row kernel on NVIDIA GPUs, interpreted elsewhere), 'pallas_vjp'
    (LayerNorm/RMSNorm of 2-D rows: both kernels behind ``jaxnorm.kernels.row_norm_vjp``, reverse mode only,
    timed so a GPU run shows what the backward kernel would gain) or 'flax' (flax.linen computing in x's dtype, so
    every column reads and writes the same bytes)."""
    import jax
    import jax.numpy as jnp

    from jaxnorm import kernels

    spec = LAYERS[layer]
    nchw = name == "jaxnorm_nchw"
    axis = 1 if nchw else -1
    xshape = shape if (nchw or len(shape) == 2 or spec.rows) else (shape[0], *shape[2:], shape[1])
    key = jax.random.key(0)
    x = jax.random.normal(key, xshape, jnp.float32).astype(dtype) * 2 + 1
    g = jax.random.normal(jax.random.key(1), xshape, jnp.float32).astype(dtype)
    module = spec.flax(axis, jnp.dtype(dtype), options) if name == "flax" else spec.jaxnorm(axis, options)
    kw_train = {"use_running_average": False} if spec.stateful else {}
    kw_eval = {"use_running_average": True} if spec.stateful else {}
    mut = {"mutable": ["batch_stats"]} if spec.stateful else {}
    variables = module.init(key, x, **kw_eval)
    fwd_train = jax.jit(lambda v, x: module.apply(v, x, **kw_train, **mut))
    fwd_eval = jax.jit(lambda v, x: module.apply(v, x, **kw_eval))
    interpret = jax.default_backend() != "gpu"
    if name == "pallas_vjp":
        rows = kernels.row_norm_vjp(layer == "ln", module.epsilon, interpret=interpret)

        def forward(params, x):  # the kernels' own backward replaces autodiff of the layer
            return rows(params, x), None
    else:
        def forward(params, x):
            out = module.apply({**variables, "params": params}, x, **kw_train, **mut)
            return (out[0], out[1]) if spec.stateful else (out, None)

    @jax.jit
    def fwd_bwd(params, x, g):
        # a training step's share: y (which the next layer reads) and the batch statistics' update, then dparams
        # and dx for the output's cotangent g. g is an argument, as in training: were it a constant closed over by
        # the jitted function, XLA would fold work that depends on dy alone (sum(dy) for dbias) into the compiled
        # program and leave it out of the timing
        y, vjp, updates = jax.vjp(forward, params, x, has_aux=True)
        return y, updates, vjp(g)

    params = variables.get("params", {})
    kernel = name in ("jaxnorm_pallas", "pallas_vjp")
    context = (lambda: kernels.pallas(interpret=interpret)) if kernel else contextlib.nullcontext

    def call(f, *args):  # the kernel setting is read when each function is traced (its first call)
        with context():
            return f(*args)

    def memory() -> int:
        with context():
            stats = fwd_bwd.lower(params, x, g).compile().memory_analysis()
        return int(stats.temp_size_in_bytes + stats.output_size_in_bytes) if stats is not None else -1

    return Fns(lambda: call(fwd_train, variables, x), lambda: call(fwd_eval, variables, x),
               lambda: call(fwd_bwd, params, x, g), jax.block_until_ready, memory, fwd_bwd, (params, x, g), context)


def torch_device() -> str:
    """PyTorch's device for the benchmark: CUDA where JAX runs on a GPU and torch sees one, else the CPU."""
    import jax
    import torch

    return "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"


def torch_sync(device: str) -> Callable[[object], object]:
    import torch

    if device == "cpu":
        return lambda out: out

    def sync(out):
        torch.cuda.synchronize()
        return out

    return sync


def torch_fns(name: str, layer: str, shape: tuple, dtype: str, options: dict) -> Fns:
    """Fns of the torch.nn module on ``torch_device()``: eager, ``torch.no_grad`` for the forward passes."""
    import torch

    device = torch_device()
    tdtype = getattr(torch, dtype)
    x = (torch.randn(shape) * 2 + 1).to(device=device, dtype=tdtype)
    g = torch.randn(shape).to(device=device, dtype=tdtype)
    module = LAYERS[layer].torch(shape, options).to(device=device, dtype=tdtype)

    def fwd(train):
        module.train(train)
        with torch.no_grad():
            return module(x)

    def fwd_bwd():
        module.train(True)
        xr = x.detach().requires_grad_(True)
        module.zero_grad(set_to_none=True)
        module(xr).backward(g)
        return xr.grad

    return Fns(lambda: fwd(True), lambda: fwd(False), fwd_bwd, torch_sync(device))


def _kernel_case(layer: Layer, shape: tuple, setting: Setting) -> bool:
    return setting.pallas and layer.rows and len(shape) == 2


IMPLEMENTATIONS = [
    Implementation("jaxnorm", "jaxnorm", jax_fns, lambda layer, shape, s: True, "ours", MODES,
                   ("fwd_train", "fwd_bwd"), required=True),
    Implementation("jaxnorm_nchw", "NCHW", jax_fns, lambda layer, shape, s: len(shape) > 2 and not layer.rows,
                   "variant", ("fwd_train",)),
    Implementation("jaxnorm_pallas", "jaxnorm Pallas", jax_fns, _kernel_case, "kernel", (), ("fwd_train", "fwd_bwd")),
    # its forward is jaxnorm_pallas's: only its forward+backward is reported
    Implementation("pallas_vjp", "both kernels (vjp)", jax_fns, _kernel_case, "kernel", (), ("fwd_bwd",)),
    Implementation("flax", "flax", jax_fns, lambda layer, shape, s: True, "peer", MODES, ("fwd_train", "fwd_bwd"),
                   required=True),
    Implementation("torch", "torch", torch_fns, lambda layer, shape, s: s.with_torch, "peer", MODES,
                   ("fwd_train", "fwd_bwd")),
]
LAYERS = _layers()
