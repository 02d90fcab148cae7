"""batch_renorm: BatchNorm's failure with non-i.i.d. and micro-batches, and batch renormalization's fix.

Command: ``python -m experiments batch_renorm [--epochs STEPS] [--seed 0] [--out results]``.
Runtime: about 20 s on a 2-core CPU (eight runs of 2000 steps, three seeds each side by side under
``jax.vmap``, each a compiled ``lax.scan``).
Data: scikit-learn's digits (8x8, 10 classes, embedded), standardized; 70/30 split (random_state=0).
Model: 64 -> 128 -> 128 -> 10, ReLU, a norm after each hidden Dense (flax.linen with jaxnorm's layers), SGD with
momentum 0.9, learning rate 0.05.
Settings, the two failures Ioffe (2017) made batch renormalization for:

- i.i.d. batches of 32 (the reference);
- non-i.i.d. batches of 32: each batch holds 16 examples of each of two random classes;
- micro-batches: i.i.d. batches of 4.

Norms: BatchNorm, BatchRenorm (the paper's schedule: plain batch norm for the first 10% of the steps, then r_max
relaxed from 1 to 3 and d_max from 0 to 5 over the next 40%), GroupNorm (8 groups, no batch statistics) and ghost
batch norm (sub-batches of 8). The running statistics use the paper's momentum 0.01 for every layer that has them.
Expected (the paper): BN's test accuracy drops with non-i.i.d. batches (its training normalization depends on the
batch's two classes, the running statistics do not), and renorm recovers most of the gap; with micro-batches BN
degrades and renorm does better.
"""

from __future__ import annotations

import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from tqdm.auto import tqdm

from experiments import _common as C
from jaxnorm import linen as jl

NAME = "batch_renorm"
STEPS = 2000
MOMENTUM = 0.01  # the paper's alpha, for every layer with running statistics
SETTINGS = {"iid": ("i.i.d. batches of 32", 32), "non_iid": ("non-i.i.d. batches of 32 (two classes each)", 32),
            "micro": ("i.i.d. micro-batches of 4", 4)}
RUNS = [("iid", "BatchNorm"), ("non_iid", "BatchNorm"), ("non_iid", "BatchRenorm"), ("non_iid", "GroupNorm"),
        ("non_iid", "ghost BatchNorm"), ("micro", "BatchNorm"), ("micro", "BatchRenorm"), ("micro", "GroupNorm")]
EVALS = 30  # test accuracy this many times per run
SEEDS = 3  # networks per run, trained side by side (jax.vmap); the numbers are their mean


class Net(nn.Module):
    norm: str
    steps: int

    @nn.compact
    def __call__(self, x, train: bool):
        for width in (128, 128):
            x = nn.Dense(width)(x)
            x = self._norm(train)(x)
            x = nn.relu(x)
        return nn.Dense(10)(x)

    def _norm(self, train):
        if self.norm == "BatchNorm":
            return jl.BatchNorm(use_running_average=not train, torch_momentum=MOMENTUM)
        if self.norm == "ghost BatchNorm":
            return jl.BatchNorm(use_running_average=not train, torch_momentum=MOMENTUM, virtual_batch_size=8)
        if self.norm == "BatchRenorm":
            return jl.BatchRenorm(use_running_average=not train, torch_momentum=MOMENTUM,
                                  warmup_steps=self.steps // 10, relax_steps=self.steps * 4 // 10)
        return jl.GroupNorm(num_groups=8)


def data():
    x, y = load_digits(return_X_y=True)
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    return train_test_split(x.astype(np.float32), y.astype(np.int32), test_size=0.3, random_state=0)


def batch_indices(setting: str, y: np.ndarray, steps: int, rng: np.random.Generator) -> np.ndarray:
    """(steps, batch) indices into the training set for one setting."""
    size = SETTINGS[setting][1]
    if setting != "non_iid":
        return rng.integers(0, len(y), (steps, size))
    by_class = [np.flatnonzero(y == c) for c in range(10)]
    pairs = np.stack([rng.choice(10, 2, replace=False) for _ in range(steps)])
    return np.stack([np.concatenate([rng.choice(by_class[c], size // 2) for c in pair]) for pair in pairs])


def train(norm: str, setting: str, steps: int, seed: int, x_train, y_train, x_test, y_test):
    """SEEDS networks (initialization and batch order seeded from ``seed``), trained side by side under ``jax.vmap``:
    test accuracy (eval mode: the running statistics) EVALS times over the run, per seed, and the last train
    losses."""
    model = Net(norm, steps)
    tx = optax.sgd(0.05, momentum=0.9)
    seeds = [seed * SEEDS + i for i in range(SEEDS)]
    states = jax.vmap(lambda k: C.create_state(model, k, jnp.asarray(x_train[:32]), tx))(
        jnp.stack([jax.random.key(s) for s in seeds]))
    step = C.make_train_step(C.cross_entropy)
    idx = np.stack([batch_indices(setting, y_train, steps, np.random.default_rng(s)) for s in seeds])
    xs, ys = jnp.asarray(x_train)[idx], jnp.asarray(y_train)[idx]

    @jax.jit
    def chunk(states, xs, ys):
        return jax.vmap(lambda s, xs, ys: jax.lax.scan(lambda s, b: step(s, *b), s, (xs, ys)))(states, xs, ys)

    @jax.jit
    def test_accuracy(states):
        logits = jax.vmap(C.apply_eval, in_axes=(0, None))(states, jnp.asarray(x_test))
        return jnp.mean(jnp.argmax(logits, -1) == jnp.asarray(y_test)[None], axis=-1)

    accs, per = [], steps // EVALS
    for i in tqdm(range(EVALS), desc=f"{NAME} {setting} {norm}", leave=False):
        states, losses = chunk(states, xs[:, i * per:(i + 1) * per], ys[:, i * per:(i + 1) * per])
        accs.append(np.asarray(test_accuracy(states)).tolist())
    return np.asarray(accs), np.asarray(losses[:, -1])


def run(out_dir: pathlib.Path, *, epochs: int | None = None, seed: int = 0, quick: bool = False) -> dict:
    import matplotlib.pyplot as plt

    steps = epochs or (60 if quick else STEPS)
    x_train, x_test, y_train, y_test = data()
    results: dict[str, dict] = {}
    for setting, norm in RUNS:
        accs, losses = train(norm, setting, steps, seed, x_train, y_train, x_test, y_test)
        # final: the last 5 evaluations (the last sixth of the run) of every seed; one evaluation is noisy
        finals = accs[-5:].mean(0)
        results.setdefault(setting, {})[norm] = {
            "test_accuracy": accs.mean(1).tolist(), "final_test_accuracy": float(finals.mean()),
            "final_test_accuracy_per_seed": finals.tolist(), "final_train_loss": float(losses.mean())}
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.2), sharey=True)
    x_axis = np.arange(1, EVALS + 1) * (steps // EVALS)
    for ax, (setting, runs) in zip(axes, results.items(), strict=True):
        for norm, r in runs.items():
            ax.plot(x_axis, r["test_accuracy"], label=f"{norm} ({r['final_test_accuracy']:.3f})")
        ax.axvspan(0, steps // 10, color="0.9", zorder=0)
        ax.set(title=SETTINGS[setting][0], xlabel="training step", ylim=(0.2, 1.0))
        ax.legend(loc="lower right", fontsize=8)
    axes[0].set_ylabel("test accuracy (eval mode)")
    figure = C.save_figure(fig, out_dir, NAME)
    final = {s: {n: r["final_test_accuracy"] for n, r in runs.items()} for s, runs in results.items()}
    iid_bn, bn, brn = final["iid"]["BatchNorm"], final["non_iid"]["BatchNorm"], final["non_iid"]["BatchRenorm"]
    gap = iid_bn - bn
    recovered = (brn - bn) / gap if gap > 0 else float("nan")
    micro = final["micro"]
    report = (
        f"Digits, an MLP with a norm after each hidden layer, SGD with momentum, {steps} steps (the shaded start: "
        f"renorm's warm-up); test accuracy in eval mode, the mean over the last sixth of the run and {SEEDS} seeds. "
        f"**Non-i.i.d. batches** (two classes each): BatchNorm's test accuracy falls from "
        f"**{iid_bn:.3f}** (i.i.d. batches) to **{bn:.3f}**; batch renorm reaches **{brn:.3f}** "
        f"({'the whole gap recovered' if recovered >= 1 else f'{recovered:.0%} of the gap recovered'}), group norm "
        f"{final['non_iid']['GroupNorm']:.3f} and ghost batch norm {final['non_iid']['ghost BatchNorm']:.3f}. "
        f"**Micro-batches of 4**: BatchNorm {micro['BatchNorm']:.3f}, "
        f"batch renorm {micro['BatchRenorm']:.3f}, group norm {micro['GroupNorm']:.3f}. Ioffe (2017) found the "
        "same direction on ImageNet with Inception-v3: with non-i.i.d. minibatches batch norm's validation accuracy "
        "drops well below the i.i.d. model's and renorm recovers most of the gap; with micro-batches of 4, renorm "
        "trains substantially better than batch norm. Group norm "
        "has no batch statistics, so the batches' make-up cannot hurt it. Ghost batch norm is the extreme of the "
        "failure: its sub-batches of 8 hold one class each here, so training normalizes the class away and the "
        "running statistics cannot give it back."
    )
    return {"figures": [figure], "steps": steps, "seed": seed, "final_test_accuracy": final,
            "non_iid_gap_recovered": recovered, "runs": results, "report": report,
            "finding_holds": bool(bn < iid_bn and brn > bn and recovered >= 0.5
                                  and micro["BatchRenorm"] >= micro["BatchNorm"])}
