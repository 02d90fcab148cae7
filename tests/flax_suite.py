"""Flax's own normalization tests, run against jaxnorm's wrappers.

Flax publishes its tests in its source distribution. This fetches the sdist of the installed flax version (pip, into
a cache folder), swaps flax.linen's and/or flax.nnx's normalization classes for jaxnorm's before Flax's test
modules are imported (their parameterized cases build layers at import), and runs

- ``tests/linen/linen_test.py::NormalizationTest`` with linen swapped, and
- ``tests/nnx/nn/normalization_test.py::TestLinenConsistency``, which holds NNX against linen bit for bit, with
  NNX swapped (jaxnorm's NNX against Flax's linen) and with both swapped (jaxnorm against itself).

Every test that fails is then run again with jaxnorm given Flax's defaults where PyTorch's are ours (epsilon,
InstanceNorm's scale and bias, Flax's momentum, and a plain ``momentum`` read as Flax's): a difference that a
default explains passes there. Every outcome is written as JSON; ``tests/test_flax_suite.py`` compares them with the
table of differences by design (``tests/flax_differences.py``). Run by hand::

    python tests/flax_suite.py --swap linen --out /tmp/linen.json      # also: --swap nnx, --swap both
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import pathlib
import re
import sys
import time
import unittest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script too (python tests/flax_suite.py)
from tests import sdists  # noqa: E402

FILES = {"linen": "tests/linen/linen_test.py", "nnx": "tests/nnx/nn/normalization_test.py"}
# linen alone: linen's own tests; NNX alone and both: the NNX-vs-linen test, one side jaxnorm, then both sides
SUITES = {"linen": [("linen", "NormalizationTest")], "nnx": [("nnx", "TestLinenConsistency")],
          "both": [("nnx", "TestLinenConsistency")]}
LINEN = ("BatchNorm", "LayerNorm", "RMSNorm", "GroupNorm", "InstanceNorm", "SpectralNorm", "WeightNorm")
NNX = LINEN


def flax_tests(version: str | None = None, cache: pathlib.Path = sdists.CACHE) -> pathlib.Path:
    """The folder holding Flax's test files for ``version`` (default: the installed flax), fetched once."""
    return sdists.fetch("flax", version or importlib.metadata.version("flax"), list(FILES.values()), cache)


# Flax's defaults where jaxnorm keeps PyTorch's (docs/guides/flax.md, "differences by design")
FLAX_DEFAULTS = {"BatchNorm": {"flax_momentum": 0.99}, "LayerNorm": {"epsilon": 1e-6}, "RMSNorm": {"epsilon": 1e-6},
                 "GroupNorm": {"epsilon": 1e-6}, "InstanceNorm": {"epsilon": 1e-6, "use_scale": True, "use_bias": True}}
_ORIGINAL: dict[tuple[str, str], object] = {}


def with_flax_defaults(cls, name: str, positional: tuple[str, ...]):
    """``cls`` built with Flax's defaults, and a plain ``momentum`` (positional as in Flax, or keyword) read as
    ``flax_momentum``: a factory with ``cls``'s name, for the rerun of a failed test."""
    defaults = FLAX_DEFAULTS.get(name, {})

    def make(*args, **kw):
        kw.update(zip(positional, args, strict=False))
        if kw.get("momentum") is not None:
            kw["flax_momentum"] = kw.pop("momentum")
        kw.pop("momentum", None)
        for key, value in defaults.items():
            kw.setdefault(key, value)
        return cls(**kw)

    make.__name__ = make.__qualname__ = name
    return make


def swap(which: str, flax_defaults: bool = False) -> None:
    """Replace flax.linen's (``linen``), flax.nnx's (``nnx``) or both's normalization classes by jaxnorm's."""
    import dataclasses
    import inspect

    from flax import linen, nnx

    from jaxnorm import linen as jl
    from jaxnorm import nnx as jn

    for module, ours, on in ((linen, jl, ("linen", "both")), (nnx, jn, ("nnx", "both"))):
        for name in LINEN:
            _ORIGINAL.setdefault((module.__name__, name), getattr(module, name))
            cls = getattr(ours, name) if which in on else _ORIGINAL[(module.__name__, name)]
            if flax_defaults and which in on:
                if module is linen:
                    positional = tuple(f.name for f in dataclasses.fields(cls) if f.init)
                else:
                    params = inspect.signature(cls.__init__).parameters.values()
                    positional = tuple(p.name for p in params if p.kind is p.POSITIONAL_OR_KEYWORD)[1:]
                cls = with_flax_defaults(cls, name, positional)
            setattr(module, name, cls)


_DIFF = re.compile(r"Max (absolute|relative) difference(?: among violations)?: ([-+0-9.einfa]+)")


_EXCEPTION = re.compile(r"^(?:[\w.]+\.)?(\w+(?:Error|Exception)): (.*)$")


def _outcome(test, error=None, status="passed") -> dict:
    name = test._testMethodName
    params = test.id().split(name, 1)[-1].strip()
    out = {"class": type(test).__name__, "test": name, "status": status, "params": params}
    if error is not None:
        text = unittest.TestResult()._exc_info_to_string(error, test)
        lines = [m for m in (_EXCEPTION.match(line) for line in text.splitlines()) if m]
        out["error"] = f"{lines[-1].group(1)}: {lines[-1].group(2)}"[:400] if lines else text.splitlines()[-1][:400]
        out["detail"] = text[-3000:]
        out.update({f"max_{kind}": float(v) for kind, v in _DIFF.findall(text)})
    return out


class _Collect(unittest.TestResult):
    def __init__(self):
        super().__init__()
        self.outcomes = []

    def startTest(self, test):  # noqa: N802 - unittest's names
        super().startTest(test)
        self._start = time.perf_counter()

    def stopTest(self, test):  # noqa: N802
        super().stopTest(test)
        self.outcomes[-1]["seconds"] = round(time.perf_counter() - self._start, 2)

    def addSuccess(self, test):  # noqa: N802 - unittest's names
        self.outcomes.append(_outcome(test))

    def addFailure(self, test, err):  # noqa: N802
        self.outcomes.append(_outcome(test, err, "failed"))

    def addError(self, test, err):  # noqa: N802
        self.outcomes.append(_outcome(test, err, "error"))

    def addSkip(self, test, reason):  # noqa: N802
        self.outcomes.append({**_outcome(test), "status": "skipped", "error": reason})


def _run_suites(which: str, folder: pathlib.Path, only: set[str] | None = None) -> list[dict]:
    outcomes = []
    for key, cls_name in SUITES[which]:
        # imported afresh: the parameterized cases build their layers at import, from the classes swapped in now
        spec = importlib.util.spec_from_file_location(f"flax_{key}_test", folder / FILES[key])
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        suite = unittest.defaultTestLoader.loadTestsFromTestCase(getattr(module, cls_name))
        if only is not None:
            suite = unittest.TestSuite(t for t in suite if f"{type(t).__name__}.{t._testMethodName}" in only)
        result = _Collect()
        suite.run(result)
        outcomes += result.outcomes
    return outcomes


def _key(outcome: dict) -> str:
    return f"{outcome['class']}.{outcome['test']}"


def run(which: str, folder: pathlib.Path) -> list[dict]:
    """Every test of the suites for ``which``, with jaxnorm swapped in; one dict per test. A failed test's dict
    holds, under ``flax_defaults``, its outcome when jaxnorm is given Flax's defaults."""
    swap(which)
    outcomes = _run_suites(which, folder)
    failed = {_key(o) for o in outcomes if o["status"] in ("failed", "error")}
    if failed:
        swap(which, flax_defaults=True)
        again = {_key(o): o for o in _run_suites(which, folder, only=failed)}
        for o in outcomes:
            if _key(o) in again:
                o["flax_defaults"] = again[_key(o)]
        swap(which)
    return outcomes


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--swap", choices=sorted(SUITES), required=True)
    p.add_argument("--out", type=pathlib.Path, required=True)
    p.add_argument("--flax-tests", type=pathlib.Path, help="a folder holding Flax's tests/ (default: fetch)")
    args = p.parse_args(argv)
    try:
        folder = args.flax_tests or flax_tests()
    except sdists.Unavailable as err:
        print(f"unavailable: {err}", file=sys.stderr)
        return 3
    outcomes = run(args.swap, folder)
    args.out.write_text(json.dumps(outcomes, indent=1))
    counts = {s: sum(o["status"] == s for o in outcomes) for s in ("passed", "failed", "error", "skipped")}
    counts["passed with Flax's defaults"] = sum(o.get("flax_defaults", {}).get("status") == "passed" for o in outcomes)
    print(f"{args.swap}: {counts}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
