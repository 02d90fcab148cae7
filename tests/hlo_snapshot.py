"""The compiled programs of every layer and mode, as text, so a refactoring can prove it changed none of them.

For every mode of ``tests/registry.py`` (the functional layers in every mode, the variants, the linen and NNX
wrappers), in float32, bfloat16 and float64, the forward and the forward+backward (``jax.vjp`` with the
cotangent a runtime argument, as in training) are

- compiled for this CPU (the optimized HLO XLA runs), and
- lowered for CPU, CUDA and TPU (StableHLO; CUDA and TPU lowered from the CPU, as the tests do), the row-wise
  layers also with the Pallas kernels enabled (``jaxnorm.kernels.pallas()``),

every text with its debug information (source locations, op metadata) stripped, one file each, plus an index of
their hashes. XLA's default flags are used (run it outside pytest, whose session compiles for speed).

    python tests/hlo_snapshot.py --out /tmp/hlo_new                   # this tree
    python tests/hlo_snapshot.py --out /tmp/hlo_old --jaxnorm-from REV  # this script and registry, REV's library
    python tests/hlo_snapshot.py --compare /tmp/hlo_old /tmp/hlo_new    # exit 0 when every program is identical

``--jaxnorm-from`` extracts ``jaxnorm/`` of a git revision into a temporary folder and runs this script there
against it (the registry and the script are this tree's, so both snapshots hold the same programs).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
DTYPES = ("float32", "bfloat16", "float64")
PLATFORMS = ("cpu", "cuda", "tpu")
ROW_MODES = ("layer_norm", "rms_norm", "rms_norm/mask", "linen.LayerNorm", "linen.RMSNorm", "nnx.LayerNorm",
             "nnx.RMSNorm")
_METADATA = re.compile(r", metadata=\{[^}]*\}|metadata=\{[^}]*\}")


_DEBUG_SECTIONS = {"FileNames", "FunctionNames", "FileLocations", "StackFrames"}


def _strip(text: str) -> str:
    """HLO text without its debug information: the source-location tables after the module header and each op's
    metadata (source lines, op names)."""
    lines, skipping = [], False
    for line in text.splitlines():
        if line.strip() in _DEBUG_SECTIONS:
            skipping = True
        elif skipping and line.startswith(("%", "ENTRY")):
            skipping = False
        if not skipping:
            lines.append(_METADATA.sub("", line).rstrip())
    return "\n".join(lines)


def _programs():
    """(name, jitted function, args) for every mode, dtype and pass."""
    import jax
    import jax.numpy as jnp

    from tests import registry
    from tests.test_transforms import _float_function

    for mode in registry.MODES:
        for dtype in DTYPES:
            if mode.complex and dtype == "bfloat16":  # there is no complex bfloat16
                continue
            inputs = mode.make(jnp.dtype(dtype))
            g, floats = _float_function(mode.call, inputs)
            outs = jax.eval_shape(g, floats)
            cotangents = [jnp.zeros(o.shape, o.dtype) for o in outs]
            base = f"{mode.name}/{dtype}".replace("/", "__").replace(".", "_")
            yield f"{base}__fwd", g, (floats,), mode.name
            yield f"{base}__fwd_bwd", _forward_backward(g), (floats, cotangents), mode.name


def _forward_backward(g):
    import jax

    return lambda floats, cotangents: jax.vjp(g, floats)[1](cotangents)


def snapshot(out: pathlib.Path) -> dict[str, str]:
    import jax

    jax.config.update("jax_enable_x64", True)
    from jaxnorm import kernels

    out.mkdir(parents=True, exist_ok=True)
    index = {}

    def write(name: str, text: str) -> None:
        text = _strip(text)
        (out / f"{name}.txt").write_text(text)
        index[name] = hashlib.sha256(text.encode()).hexdigest()

    for name, f, args, mode in _programs():
        jitted = jax.jit(f)
        write(f"{name}__cpu_compiled", jitted.lower(*args).compile().as_text())
        for platform in PLATFORMS:
            lowered = jitted.trace(*args).lower(lowering_platforms=(platform,))
            write(f"{name}__{platform}_lowered", lowered.as_text(debug_info=False))
        if mode in ROW_MODES:
            with kernels.pallas():
                lowered = jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",))
            write(f"{name}__cuda_pallas_lowered", lowered.as_text(debug_info=False))
    (out / "index.json").write_text(json.dumps(index, indent=1, sort_keys=True))
    return index


def compare(a: pathlib.Path, b: pathlib.Path) -> int:
    ia, ib = (json.loads((p / "index.json").read_text()) for p in (a, b))
    missing = sorted(set(ia) ^ set(ib))
    differ = sorted(k for k in set(ia) & set(ib) if ia[k] != ib[k])
    for k in missing:
        print(f"only in {'the first' if k in ia else 'the second'}: {k}")
    for k in differ:
        print(f"differs: {k}  (diff {a / (k + '.txt')} {b / (k + '.txt')})")
    print(f"{len(set(ia) & set(ib)) - len(differ)} of {len(set(ia) | set(ib))} programs identical")
    return 0 if not missing and not differ else 1


def from_revision(rev: str, out: pathlib.Path) -> int:
    """Run this script, with this tree's tests/, against ``jaxnorm/`` of ``rev``."""
    with tempfile.TemporaryDirectory(prefix="jaxnorm-hlo-") as tmp:
        tree = pathlib.Path(tmp)
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "jaxnorm"], check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
        shutil.copytree(ROOT / "tests", tree / "tests", ignore=shutil.ignore_patterns("__pycache__", "fixtures"))
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "XLA_FLAGS")}
        return subprocess.run([sys.executable, "tests/hlo_snapshot.py", "--out", str(out.resolve())], cwd=tree,
                              env=env).returncode


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=pathlib.Path)
    p.add_argument("--jaxnorm-from", metavar="REV")
    p.add_argument("--compare", nargs=2, type=pathlib.Path, metavar=("A", "B"))
    args = p.parse_args(argv)
    if args.compare:
        return compare(*args.compare)
    if not args.out:
        p.error("give --out (or --compare A B)")
    if args.jaxnorm_from:
        return from_revision(args.jaxnorm_from, args.out)
    sys.path.insert(0, str(pathlib.Path.cwd()))
    index = snapshot(args.out)
    print(f"{len(index)} programs written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
