"""framework_parity: the classic "batch norm by hand in NumPy vs PyTorch vs TensorFlow" comparison, with jaxnorm.

Command: ``python -m experiments framework_parity [--seed 0] [--out results]``
Runtime: a second.
Input: the committed PyTorch fixture for BatchNorm2d on a random (4, 3, 2, 2) input (made by torch 2.13.0 with
tests/fixtures/generate.py), so no torch is needed here.
Expected: jaxnorm, a float64 NumPy formula and PyTorch agree to float32 rounding (~1e-7) in float32 and to ~1e-16
in float64; a normalization with TensorFlow's old default epsilon 1e-3 differs by ~1e-3 on this data, which is
why ``tf.layers.batch_normalization`` disagreed with the other two in the original comparison.
"""

from __future__ import annotations

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

import jaxnorm
from experiments import _common as C

NAME = "framework_parity"
FIXTURES = pathlib.Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "torch"


def numpy_batch_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float) -> np.ndarray:
    """The textbook formula in float64: (x - mean) / sqrt(var + eps) * weight + bias, per channel (axis 1)."""
    x = x.astype(np.float64)
    mean = x.mean(axis=(0, 2, 3), keepdims=True)
    var = x.var(axis=(0, 2, 3), keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * weight.reshape(1, -1, 1, 1) + bias.reshape(1, -1, 1, 1)


def run(out_dir: pathlib.Path, *, epochs: int | None = None, seed: int = 0, quick: bool = False) -> dict:
    import matplotlib.pyplot as plt

    rows = {}
    for dtype in ("float32", "float64"):
        with np.load(FIXTURES / f"BatchNorm2d__4x3x2x2__default__{dtype}.npz") as f:
            a = {k: f[k] for k in f.files}
        cfg = json.loads(str(a["config"]))
        x, torch_y = a["x"][0], a["y"][0]
        with jax.enable_x64(dtype == "float64"):
            params = {"scale": jnp.asarray(a["weight"]), "bias": jnp.asarray(a["bias"])}
            stats = jaxnorm.batch_norm_init(3, dtype=jnp.dtype(dtype))[1]
            ours = np.asarray(jaxnorm.batch_norm(params, stats, jnp.asarray(x), training=True)[0])
        ref = numpy_batch_norm(x, a["weight"], a["bias"], 1e-5)
        tf_like = numpy_batch_norm(x, a["weight"], a["bias"], 1e-3)
        rows[dtype] = {
            "jaxnorm vs NumPy float64": float(np.abs(ours - ref).max()),
            "jaxnorm vs PyTorch": float(np.abs(ours - torch_y).max()),
            "PyTorch vs NumPy float64": float(np.abs(torch_y - ref).max()),
            "eps=1e-3 (TensorFlow default) vs eps=1e-5": float(np.abs(tf_like - ref).max()),
            "torch_version": cfg["torch_version"],
        }
    fig, ax = plt.subplots(figsize=(8, 3.5))
    labels = [k for k in rows["float32"] if k != "torch_version"]
    for i, dtype in enumerate(rows):
        ax.barh(np.arange(len(labels)) + 0.4 * i, [max(rows[dtype][k], 1e-18) for k in labels], 0.4, label=dtype)
    ax.set(yticks=np.arange(len(labels)) + 0.2, yticklabels=labels, xscale="log", xlabel="max |difference|",
           title="BatchNorm2d on a random (4, 3, 2, 2) input")
    ax.legend()
    figure = C.save_figure(fig, out_dir, NAME)
    table = "| comparison | float32 | float64 |\n|---|---|---|\n" + "\n".join(
        f"| {k} | {rows['float32'][k]:.2e} | {rows['float64'][k]:.2e} |" for k in labels)
    report = (
        f"{table}\n\njaxnorm, PyTorch {rows['float32']['torch_version']} and the textbook NumPy formula agree to "
        "float32 rounding in float32 and to float64 rounding in float64. In the original comparison TensorFlow's "
        "`tf.layers.batch_normalization` was the odd one out: its default `epsilon` is 1e-3, not 1e-5; with that "
        f"epsilon the output moves by {rows['float32']['eps=1e-3 (TensorFlow default) vs eps=1e-5']:.1e} on this "
        "data: a relative change of about (1e-3 - 1e-5) / (2 var) in each channel's scale, far above float32 rounding."
    )
    holds = rows["float32"]["jaxnorm vs PyTorch"] < 1e-5 and rows["float64"]["jaxnorm vs NumPy float64"] < 1e-12
    return {"figures": [figure], "seed": seed, "max_abs_difference": rows, "report": report,
            "finding_holds": bool(holds)}
