"""lenet: LeNet with sigmoid activations, with and without BatchNorm (the d2l.ai "Batch Normalization" chapter).

Command: ``python -m experiments lenet [--epochs 40] [--seed 0] [--out results]
          [--data digits|fashion-mnist] [--data-dir DIR]``
Runtime: about 2 minutes on a 2-core CPU with the embedded digits data (eight 40-epoch runs).
Data: scikit-learn's digits (1797 8x8 images, bilinearly upsampled to 28x28, fixed 75/25 split, random_state=0),
or Fashion-MNIST from the standard ``*-ubyte.gz`` IDX files in ``--data-dir`` (nothing is downloaded). Inputs are
standardized with the training set's mean and standard deviation.
Models: conv 6@5x5 (pad 2) -> [BN] -> sigmoid -> avgpool 2 -> conv 16@5x5 -> [BN] -> sigmoid -> avgpool 2 ->
fc 120 -> [BN] -> sigmoid -> fc 84 -> [BN] -> sigmoid -> fc 10, Xavier-uniform weights (as in the tutorial); plain
SGD, batch 32, incomplete last batch dropped. Both nets are trained at each learning rate of one sweep; a third net
uses a BatchNorm written from scratch directly on the functional API (jaxnorm.batch_norm) and a fourth reproduces
the well-known tutorial's buggy from-scratch BN (both at lr 1.0).
Expected: both nets learn; BN reaches 90% test accuracy in far fewer epochs and still learns at the largest swept
lr, where the plain net stays at chance; the from-scratch net matches the BN net; the buggy variant (which never
normalizes by the batch variance) trains worse than the correct one.
"""

from __future__ import annotations

import gzip
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

import jaxnorm
from experiments import _common as C
from jaxnorm import linen as jl

NAME = "lenet"
EPOCHS = 40
BATCH_SIZE = 32
LRS = (0.3, 1.0, 5.0)  # swept for both nets
SCRATCH_LR = 1.0
TARGET = 0.9  # "epochs to 90% test accuracy"
FASHION_FILES = {
    "train_x": "train-images-idx3-ubyte.gz", "train_y": "train-labels-idx1-ubyte.gz",
    "test_x": "t10k-images-idx3-ubyte.gz", "test_y": "t10k-labels-idx1-ubyte.gz",
}


# ------------------------------------------------------------------------------------------- data


def load_idx(path: pathlib.Path) -> np.ndarray:
    """Read an IDX file (gzipped or not): magic 0x0000 <type> <ndim>, big-endian dims, then the data."""
    raw = pathlib.Path(path).read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path}: not an IDX file (bad magic number {raw[:4].hex()})")
    dtypes = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if raw[2] not in dtypes:
        raise ValueError(f"{path}: unknown IDX data type 0x{raw[2]:02x}")
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, dtype=dtypes[raw[2]], offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says shape {shape} but the file holds {data.size} values")
    return data.reshape(shape).astype(dtypes[raw[2]].replace(">", "="))


def load_fashion_mnist(data_dir: pathlib.Path):
    """(x_train, y_train, x_test, y_test) from the four standard Fashion-MNIST IDX files, x in [0, 1], NHWC."""
    data_dir = pathlib.Path(data_dir)
    missing = [f for f in FASHION_FILES.values() if not (data_dir / f).exists()]
    if missing:
        raise FileNotFoundError(f"Fashion-MNIST files missing from {data_dir}: {missing}")
    a = {k: load_idx(data_dir / f) for k, f in FASHION_FILES.items()}
    img = lambda x: (x.astype(np.float32) / 255.0)[..., None]
    return img(a["train_x"]), a["train_y"].astype(np.int32), img(a["test_x"]), a["test_y"].astype(np.int32)


def load_digits_28():
    """scikit-learn's digits upsampled to 28x28 (NHWC, [0, 1]), fixed 75/25 split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = np.asarray(jax.image.resize(jnp.asarray(d.images / 16.0, jnp.float32), (len(d.images), 28, 28), "bilinear"))
    x_train, x_test, y_train, y_test = train_test_split(x[..., None], d.target.astype(np.int32), test_size=0.25,
                                                        random_state=0, stratify=d.target)
    return x_train, y_train, x_test, y_test


def standardize(dataset):
    """Scale both splits by the training set's mean and standard deviation (one scalar each)."""
    x_train, y_train, x_test, y_test = dataset
    mean, std = float(x_train.mean()), float(x_train.std())
    return (x_train - mean) / std, y_train, (x_test - mean) / std, y_test


# ------------------------------------------------------------------------------------------- models


class ScratchBatchNorm(nn.Module):
    """BatchNorm written from scratch on the functional API: declare the variables, call jaxnorm.batch_norm.

    With ``tutorial_bug=True`` it reproduces the well-known tutorial code instead: training batches are normalized
    with the MOVING variance, and the moving variance is updated from itself (so it never leaves 1).
    """

    momentum: float = 0.1  # PyTorch convention: weight of the new batch
    tutorial_bug: bool = False

    @nn.compact
    def __call__(self, x, train: bool):
        c = x.shape[-1]
        params, stats0 = jaxnorm.batch_norm_init(c)
        gamma = self.param("scale", lambda _: params["scale"])
        beta = self.param("bias", lambda _: params["bias"])
        state = {k: self.variable("batch_stats", k, lambda v=v: v) for k, v in stats0.items()}
        stats = {k: v.value for k, v in state.items()}
        if self.tutorial_bug:
            axes, lift = tuple(range(x.ndim - 1)), (lambda v: v.reshape((1,) * (x.ndim - 1) + (c,)))
            mean = jnp.mean(x, axes) if train else stats["mean"]
            y = (x - lift(mean)) / jnp.sqrt(lift(stats["var"]) + 1e-5) * lift(gamma) + lift(beta)  # BUG: moving var
            if train and not self.is_initializing():
                m = self.momentum
                state["mean"].value = (1 - m) * stats["mean"] + m * mean
                state["var"].value = (1 - m) * stats["var"] + m * stats["var"]  # BUG: updated from itself
            return y
        y, new = jaxnorm.batch_norm({"scale": gamma, "bias": beta}, stats, x, training=train, axis=-1,
                                    momentum=self.momentum)
        if train and not self.is_initializing():
            for k, v in state.items():
                v.value = new[k]
        return y


class LeNet(nn.Module):
    norm: str = "none"  # "none" | "jaxnorm" | "scratch" | "tutorial_bug"
    classes: int = 10

    @nn.compact
    def __call__(self, x, train: bool):
        def norm(h):
            if self.norm == "jaxnorm":
                return jl.BatchNorm(use_running_average=not train)(h)
            if self.norm in ("scratch", "tutorial_bug"):
                return ScratchBatchNorm(tutorial_bug=self.norm == "tutorial_bug")(h, train)
            return h

        init = nn.initializers.xavier_uniform()
        x = nn.Conv(6, (5, 5), padding=2, kernel_init=init)(x)
        x = nn.avg_pool(nn.sigmoid(norm(x)), (2, 2), (2, 2))
        x = nn.Conv(16, (5, 5), padding="VALID", kernel_init=init)(x)
        x = nn.avg_pool(nn.sigmoid(norm(x)), (2, 2), (2, 2))
        x = x.reshape(x.shape[0], -1)
        x = nn.sigmoid(norm(nn.Dense(120, kernel_init=init)(x)))
        x = nn.sigmoid(norm(nn.Dense(84, kernel_init=init)(x)))
        return nn.Dense(self.classes, kernel_init=init)(x)


# ------------------------------------------------------------------------------------------- training


def epochs_to(accuracies, target: float = TARGET) -> int | None:
    """The first epoch (1-based) whose test accuracy reaches ``target``; None if none does."""
    return next((e + 1 for e, a in enumerate(accuracies) if a >= target), None)


def train(norm: str, lr: float, epochs: int, seed: int, data, label: str, batch_size: int = BATCH_SIZE):
    x_train, y_train, x_test, y_test = data
    model = LeNet(norm=norm, classes=int(max(y_train.max(), y_test.max())) + 1)
    state = C.create_state(model, jax.random.key(seed), jnp.asarray(x_train[:2]), optax.sgd(lr))
    step = C.make_train_step(C.cross_entropy)
    evaluate = jax.jit(C.apply_eval)
    rng = np.random.default_rng(seed)
    hist = {"train_loss": [], "test_accuracy": []}
    for _ in tqdm(range(epochs), desc=f"lenet {label}", leave=False):
        losses = []
        # drop_last: 1347 % 32 leaves a 3-example batch, whose BN statistics come from 3 examples; one such step
        # per epoch sent the BN net's test accuracy as low as 0.14 between good epochs
        for idx in C.batches(rng, len(x_train), batch_size, drop_last=True):
            state, loss = step(state, jnp.asarray(x_train[idx]), jnp.asarray(y_train[idx]))
            losses.append(float(loss))
        hist["train_loss"].append(float(np.mean(losses)))
        logits = np.concatenate([np.asarray(evaluate(state, jnp.asarray(x_test[i : i + 1000])))
                                 for i in range(0, len(x_test), 1000)])
        hist["test_accuracy"].append(C.accuracy(logits, y_test))
    hist["final_test_accuracy"] = hist["test_accuracy"][-1]
    hist["last5_test_accuracy"] = float(np.mean(hist["test_accuracy"][-5:]))
    hist["epochs_to_target"] = epochs_to(hist["test_accuracy"])
    hist["lr"] = lr
    return hist


def run(out_dir: pathlib.Path, *, epochs: int | None = None, seed: int = 0, quick: bool = False,
        data: str = "digits", data_dir: pathlib.Path | None = None) -> dict:
    import matplotlib.pyplot as plt

    epochs = epochs or (1 if quick else EPOCHS)
    if data == "fashion-mnist":
        if data_dir is None:
            raise ValueError("--data fashion-mnist needs --data-dir DIR holding the four *-ubyte.gz files")
        dataset = load_fashion_mnist(data_dir)
    else:
        dataset = load_digits_28()
    if quick:
        dataset = (dataset[0][:300], dataset[1][:300], dataset[2][:100], dataset[3][:100])
    raw_dataset, dataset = dataset, standardize(dataset)
    lrs = LRS[:1] if quick else LRS
    plain = {lr: train("none", lr, epochs, seed, dataset, f"no BN lr={lr}") for lr in lrs}
    bn = {lr: train("jaxnorm", lr, epochs, seed, dataset, f"BN lr={lr}") for lr in lrs}
    scratch = train("scratch", SCRATCH_LR, epochs, seed, dataset, "scratch BN")
    buggy = train("tutorial_bug", SCRATCH_LR, epochs, seed, dataset, "buggy BN")
    raw = train("none", lrs[0], epochs, seed, raw_dataset, "no BN, raw inputs")
    runs = {**{f"no BN, lr {lr}": h for lr, h in plain.items()},
            **{f"BN (jaxnorm.linen), lr {lr}": h for lr, h in bn.items()},
            f"BN from scratch on jaxnorm.batch_norm, lr {SCRATCH_LR}": scratch,
            f"tutorial's buggy from-scratch BN, lr {SCRATCH_LR}": buggy,
            f"no BN, lr {lrs[0]}, inputs not standardized": raw}

    fig, axes = plt.subplots(1, 2, figsize=(13, 4))
    blues, reds = plt.get_cmap("Blues"), plt.get_cmap("Oranges")
    shade = lambda i: 0.45 + 0.5 * i / max(len(lrs) - 1, 1)
    styles = {**{f"no BN, lr {lr}": (blues(shade(i)), "-") for i, lr in enumerate(lrs)},
              **{f"BN (jaxnorm.linen), lr {lr}": (reds(shade(i)), "-") for i, lr in enumerate(lrs)}}
    extra = [("green", "--"), ("grey", ":"), ("purple", ":")]  # scratch, buggy, raw inputs
    for (label, h), (color, style) in zip(runs.items(), [*styles.values(), *extra], strict=True):
        axes[0].plot(np.arange(1, epochs + 1), h["train_loss"], style, color=color, label=label)
        axes[1].plot(np.arange(1, epochs + 1), h["test_accuracy"], style, color=color, label=label)
    axes[0].set(title=f"LeNet on {data} (batch {BATCH_SIZE}): train loss", xlabel="epoch", yscale="log")
    axes[1].axhline(TARGET, color="black", lw=0.5)
    axes[1].set(title="test accuracy (eval mode)", xlabel="epoch")
    axes[1].legend(fontsize=7)
    figure = C.save_figure(fig, out_dir, NAME)

    never = float("inf")
    fastest = lambda hs: min((h["epochs_to_target"] or never) for h in hs.values())
    largest_lr = lambda hs: max((lr for lr, h in hs.items() if h["epochs_to_target"]), default=0.0)
    ref = bn.get(SCRATCH_LR, next(iter(bn.values())))
    shown = lambda n: "not reached" if n is None else str(n)
    rows = "\n".join(f"| {label} | {shown(h['epochs_to_target'])} | {h['last5_test_accuracy']:.3f} | "
                     f"{h['final_test_accuracy']:.3f} |" for label, h in runs.items())
    report = (
        f"{data}, {epochs} epochs of plain SGD at batch {BATCH_SIZE} (incomplete last batch dropped), standardized "
        f"inputs, Xavier-uniform weights; both nets at each lr of the sweep {', '.join(map(str, lrs))}.\n\n"
        f"| run | epochs to {TARGET:.0%} test accuracy | mean test accuracy, last 5 epochs | final |\n"
        f"|---|---|---|---|\n{rows}\n\n"
        f"Both nets learn. BatchNorm reaches {TARGET:.0%} in {shown(ref['epochs_to_target'])} epoch(s) at lr "
        f"{ref['lr']}; the plain net's fastest is {'never' if fastest(plain) == never else int(fastest(plain))} "
        f"epochs, after a plateau at chance accuracy. BN reaches {TARGET:.0%} at every swept lr up to "
        f"{largest_lr(bn)}; the plain net at lr up to {largest_lr(plain)} only. The d2l chapter reports the same: "
        "BN LeNet trains much faster and with a larger learning rate.\n\n"
        "The well-known from-scratch tutorial code normalizes *training* batches with the moving variance "
        "(`X_hat = (X - mean) / sqrt(moving_var + eps)`) and updates the moving variance from itself "
        "(`moving_var = momentum * moving_var + (1 - momentum) * moving_var`), so the moving variance never leaves its "
        "initial 1 and no batch is ever scaled by its own spread: the layer only centres. The correct version "
        "(ours, via `jaxnorm.batch_norm`) normalizes training batches with the biased *batch* variance and updates the "
        f"moving variance with the unbiased batch variance. Here the buggy layer reaches {TARGET:.0%} in "
        f"{shown(buggy['epochs_to_target'])} epoch(s), the correct one in {shown(scratch['epochs_to_target'])}; "
        "centring alone already does much on standardized inputs.\n\n"
        "Two details of the setup matter. Without standardized inputs (pixels in [0, 1]) the plain net at lr "
        f"{lrs[0]} reaches {TARGET:.0%} in: {shown(raw['epochs_to_target'])} (last-5 mean "
        f"{raw['last5_test_accuracy']:.3f}); BN normalizes its inputs' scale away. And the incomplete last batch is "
        f"dropped: {len(dataset[0])} training images in batches of {BATCH_SIZE} leave "
        f"{len(dataset[0]) % BATCH_SIZE} over each epoch. A batch that small gives BatchNorm statistics of a few "
        "examples; on digits (a batch of 3), keeping it sent the BN net's test accuracy as low as 0.14 between good "
        "epochs."
    )
    finding = (fastest(plain) < never  # the plain net learns
               and fastest(bn) < fastest(plain)  # BN learns faster
               and largest_lr(bn) > largest_lr(plain)  # and at a larger lr
               and abs(scratch["last5_test_accuracy"] - ref["last5_test_accuracy"]) < 0.03)
    return {"figures": [figure], "epochs": epochs, "seed": seed, "data": data, "batch_size": BATCH_SIZE,
            "lrs": list(lrs), "runs": runs, "report": report, "finding_holds": bool(finding)}
