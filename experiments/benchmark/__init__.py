"""benchmark: jaxnorm vs flax.linen vs PyTorch, forward (train, eval) and forward+backward, on JAX's backend.

Command: ``python -m experiments benchmark [--runs 15] [--cases BN2d-a,LN] [--quick] [--out results]``
         On a GPU (JAX's default backend not the CPU) it also runs the large bfloat16 cases (``LARGE_CASES``),
         PyTorch on CUDA (eager, cuDNN where PyTorch uses it), jaxnorm with its Pallas row kernels for
         LayerNorm/RMSNorm (NVIDIA GPUs), and times each sample as several calls queued back to back (about 2 ms)
         and one synchronization. Every run reports achieved GB/s by the pass model (forward: read x, write y;
         forward+backward: read x, write y, read x and dy, write dx) as a percentage of the device's copy
         bandwidth, measured in the same run (the faster of a jitted ``x * a + b`` and torch's ``copy_``).
         ``python -m experiments benchmark --model resnet18 [--runs 15] [--quick]``: whole-model training steps
         per second (ResNet-18, 64x64 images, batch 32, SGD with momentum) with jaxnorm's BatchNorm vs
         ``flax.linen.BatchNorm`` in the same Flax model vs torchvision's resnet18 in PyTorch, plus eval; all three
         start from the same (ported) weights. Writes ``benchmark_model.json``.
Runtime: a few minutes on a 2-core CPU (``--quick``: tiny shapes, seconds; the test suite's smoke run).
For each case, in one process and on the same data: median milliseconds of >= ``--runs`` timed calls after a
warm-up, interleaved round-robin across implementations (``timing``), for every implementation that applies
(``implementations``: jaxnorm channels-last and NCHW, its Pallas kernels, flax.linen, torch), the XLA floor (one
jitted ``x * a + b`` over the same tensor), and the compiled forward+backward programs' memory. Ratios are
medians of per-round ratios. Writes ``benchmark.json`` and prints the tables (``report``).

The package, one job a module: ``cases`` (what is measured), ``timing`` (the harness), ``implementations`` (the
columns: one entry each; the layers, one entry each), ``runner`` (one case), ``model`` (the whole-model run),
``report`` (the tables), ``cli`` (the command line).
"""

from experiments.benchmark.cli import main

__all__ = ["main"]
