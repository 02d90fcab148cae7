"""What every experiment shares: the jit-compiled optax training loop, the models, and result/figure helpers."""

from __future__ import annotations

import json
import pathlib
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state

from jaxnorm import linen as jl

Array = jax.Array


# ------------------------------------------------------------------------------------------- training loop


class TrainState(train_state.TrainState):
    """flax's TrainState plus the model's ``batch_stats`` collection ({} for a model without BatchNorm)."""

    batch_stats: Any = None


def create_state(model: nn.Module, key: Array, sample_x: Array, tx: optax.GradientTransformation) -> TrainState:
    variables = model.init(key, sample_x, train=False)
    state = TrainState.create(apply_fn=model.apply, params=variables["params"], tx=tx,
                              batch_stats=variables.get("batch_stats", {}))
    # TrainState.create starts `step` as a weak-typed Python int; an int32 array keeps the jitted step's input
    # types identical from the first call on, so it compiles exactly once.
    return state.replace(step=jnp.zeros((), jnp.int32))


def apply_eval(state: TrainState, x: Array) -> Array:
    return state.apply_fn({"params": state.params, "batch_stats": state.batch_stats}, x, train=False)


def make_train_step(loss_fn: Callable[[Array, Array], Array]) -> Callable[[TrainState, Array, Array], tuple]:
    """A jitted ``step(state, x, y) -> (state, loss)`` that also carries the updated ``batch_stats``."""

    @jax.jit
    def step(state: TrainState, x: Array, y: Array) -> tuple[TrainState, Array]:
        def loss(params):
            out, updates = state.apply_fn({"params": params, "batch_stats": state.batch_stats}, x, train=True,
                                          mutable=["batch_stats"])
            return loss_fn(out, y), updates

        (value, updates), grads = jax.value_and_grad(loss, has_aux=True)(state.params)
        state = state.apply_gradients(grads=grads, batch_stats=updates.get("batch_stats", state.batch_stats))
        return state, value

    return step


def cross_entropy(logits: Array, labels: Array) -> Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def mse(pred: Array, target: Array) -> Array:
    return jnp.mean(jnp.square(pred - target))


def accuracy(logits: Array, labels: Array) -> float:
    return float(jnp.mean(jnp.argmax(logits, -1) == labels))


def batches(rng: np.random.Generator, n: int, batch_size: int, drop_last: bool = False):
    """Shuffled index batches for one epoch."""
    order = rng.permutation(n)
    stop = n - n % batch_size if drop_last else n
    for i in range(0, stop, batch_size):
        yield order[i : i + batch_size]


# ------------------------------------------------------------------------------------------- models


class MLP(nn.Module):
    """Dense -> [BatchNorm] -> activation, repeated; a final Dense. BN uses PyTorch's momentum convention."""

    hidden: Sequence[int]
    out: int
    use_bn: bool = False
    bn_input: bool = False
    activation: Callable[[Array], Array] = nn.relu
    bn_momentum: float = 0.1
    kernel_init: Any = nn.initializers.lecun_normal()
    bias_init: Any = nn.initializers.zeros
    record: bool = False  # sow layer inputs and pre-activations into "intermediates"

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        bn = lambda: jl.BatchNorm(use_running_average=not train, torch_momentum=self.bn_momentum)
        if self.bn_input and self.use_bn:
            x = bn()(x)
        for width in self.hidden:
            if self.record:
                self.sow("intermediates", "layer_input", x)
            x = nn.Dense(width, kernel_init=self.kernel_init, bias_init=self.bias_init)(x)
            if self.use_bn:
                x = bn()(x)
            if self.record:
                self.sow("intermediates", "pre_activation", x)
            x = self.activation(x)
        return nn.Dense(self.out, kernel_init=self.kernel_init, bias_init=self.bias_init)(x)


# ------------------------------------------------------------------------------------------- results


def save_figure(fig, out_dir: pathlib.Path, name: str) -> str:
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.png"
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path.name


def merge_results(out_dir: pathlib.Path, name: str, result: dict) -> dict:
    """Write ``result`` under ``name`` into ``out_dir/results.json`` (keeping other experiments' entries)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "results.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    data[name] = result
    path.write_text(json.dumps(data, indent=2, sort_keys=True, default=float))
    return data


def finite(tree: Any) -> bool:
    leaves = [x for x in jax.tree.leaves(tree) if isinstance(x, (int, float, np.floating, np.ndarray))]
    return all(np.all(np.isfinite(np.asarray(x, np.float64))) for x in leaves)
