"""What is measured: the per-layer cases, as ``name: (layer, shape, dtype, options)`` (shape in NCHW, (N, C) or
(N, D)); adding a case is one entry here."""

from __future__ import annotations

CASES = {
    "BN2d 32x64x56x56": ("bn", (32, 64, 56, 56), "float32", {}),
    "BN2d 128x256x14x14": ("bn", (128, 256, 14, 14), "float32", {}),
    "BN1d 4096x1024": ("bn", (4096, 1024), "float32", {}),
    "BN1d 64x10": ("bn", (64, 10), "float32", {}),
    "LN 4096x768": ("ln", (4096, 768), "float32", {}),
    "GN(32) 16x256x32x32": ("gn", (16, 256, 32, 32), "float32", {"groups": 32}),
    "IN 16x64x64x64": ("in", (16, 64, 64, 64), "float32", {}),
    "RMSNorm 4096x768": ("rms", (4096, 768), "float32", {}),
    "BN2d bf16 32x64x56x56": ("bn", (32, 64, 56, 56), "bfloat16", {}),
}
# realistic accelerator shapes (bf16), run by default where JAX's backend is not the CPU (select them on the CPU
# with --cases): transformer rows, a ResNet stem's BatchNorm (NHWC) and a diffusion UNet's GroupNorm
LARGE_CASES = {
    "LN bf16 16384x4096": ("ln", (16384, 4096), "bfloat16", {}),
    "LN bf16 4096x8192": ("ln", (4096, 8192), "bfloat16", {}),
    "RMSNorm bf16 16384x4096": ("rms", (16384, 4096), "bfloat16", {}),
    "RMSNorm bf16 4096x8192": ("rms", (4096, 8192), "bfloat16", {}),
    "BN2d bf16 256x64x56x56": ("bn", (256, 64, 56, 56), "bfloat16", {}),
    "GN(32) bf16 32x512x64x64": ("gn", (32, 512, 64, 64), "bfloat16", {"groups": 32}),
}
QUICK_SHAPES = {"bn": [(4, 3, 5, 5), (8, 6)], "ln": [(8, 6)], "gn": [(2, 8, 3, 3)], "in": [(2, 3, 4, 4)],
                "rms": [(8, 6)]}


def quick_cases() -> dict:
    """Tiny float32 shapes of every layer: the smoke run."""
    return {f"{layer} {'x'.join(map(str, s))}": (layer, s, "float32", {"groups": 2} if layer == "gn" else {})
            for layer, shapes in QUICK_SHAPES.items() for s in shapes}


def pass_bytes(shape, dtype) -> dict[str, int]:
    """Bytes each timed function must move at least, by the pass model: a forward reads x and writes y; a
    forward+backward also reads x and dy and writes dx (5 tensors). Parameters and statistics are negligible."""
    import jax.numpy as jnp
    import numpy as np

    nbytes = int(np.prod(shape)) * jnp.dtype(dtype).itemsize
    return {"fwd_train": 2 * nbytes, "fwd_eval": 2 * nbytes, "fwd_bwd": 5 * nbytes}
