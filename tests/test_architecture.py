"""The architecture's promises (docs/architecture.md), checked: a public function reaches its statistics' formula in
at most four calls, the functional core imports no wrapper, and no module calls another module's private name."""

from __future__ import annotations

import ast
import pathlib
import sys

import jax
import jax.numpy as jnp
import pytest

import jaxnorm
from jaxnorm import _statistics

PACKAGE = pathlib.Path(jaxnorm.__file__).parent
FORMULAS = {f.__code__: f.__name__ for f in (_statistics.row_moments, _statistics.checked_one_pass,
                                             _statistics.two_pass, _statistics.masked_moments,
                                             _statistics.square_mean)}


def _calls_to_formulas(public, call, x) -> dict[str, int]:
    """{formula: calls from ``public`` to it} while ``call(x)`` is traced (the longest way to each). Each frame of
    jaxnorm's in between counts, and so does ``jax.lax.platform_dependent`` (the platform's choice); JAX's own
    machinery (custom_jvp, the branches' tracing) does not."""
    found: dict[str, int] = {}

    def profile(frame, event, _arg):
        if event != "call" or frame.f_code not in FORMULAS:
            return
        calls, f = 1, frame.f_back
        while f is not None and f.f_code is not public.__code__:
            calls += PACKAGE in pathlib.Path(f.f_code.co_filename).parents or f.f_code.co_name == "platform_dependent"
            f = f.f_back
        if f is not None:  # reached from the public function
            name = FORMULAS[frame.f_code]
            found[name] = max(found.get(name, 0), calls)

    sys.setprofile(profile)
    try:
        jax.make_jaxpr(call)(x)
    finally:
        sys.setprofile(None)
    return found


CALLS = {  # name: (the public function, a call of it)
    "batch_norm": (jaxnorm.batch_norm,
                   lambda x: jaxnorm.batch_norm(*jaxnorm.batch_norm_init(6), x, training=True)),
    "batch_norm/masked": (jaxnorm.batch_norm, lambda x: jaxnorm.batch_norm(
        *jaxnorm.batch_norm_init(6), x, training=True, mask=jnp.ones((4, 1, 3, 5), bool))),
    "batch_norm/ghost": (jaxnorm.batch_norm, lambda x: jaxnorm.batch_norm(
        *jaxnorm.batch_norm_init(6), x, training=True, virtual_batch_size=2)),
    "batch_norm/sync": (jaxnorm.batch_norm, lambda x: jax.vmap(lambda x: jaxnorm.batch_norm(
        *jaxnorm.batch_norm_init(6), x, training=True, axis_name="d"), axis_name="d")(x[None])),
    "instance_norm": (jaxnorm.instance_norm, lambda x: jaxnorm.instance_norm({}, {}, x, training=True)),
    "group_norm": (jaxnorm.group_norm, lambda x: jaxnorm.group_norm(jaxnorm.group_norm_init(2, 6), x, num_groups=2)),
    "layer_norm": (jaxnorm.layer_norm, lambda x: jaxnorm.layer_norm(jaxnorm.layer_norm_init(5), x, normalized_shape=5)),
    "layer_norm/rows": (jaxnorm.layer_norm, lambda x: jaxnorm.layer_norm(
        jaxnorm.layer_norm_init(5), jnp.ones((4096, 5)), normalized_shape=5)),
    "rms_norm": (jaxnorm.rms_norm, lambda x: jaxnorm.rms_norm(jaxnorm.rms_norm_init(5), x, normalized_shape=5)),
    "batch_renorm": (jaxnorm.batch_renorm,
                     lambda x: jaxnorm.batch_renorm(*jaxnorm.batch_norm_init(6), x, training=True)),
}


@pytest.mark.parametrize("name", list(CALLS))
def test_a_public_function_reaches_its_statistics_formula_in_four_calls(name):
    public, call = CALLS[name]
    found = _calls_to_formulas(public, call, jnp.ones((4, 6, 3, 5)))
    assert found, f"{name}: no statistics formula reached"
    assert max(found.values()) <= 4, f"{name}: {found}"


def test_the_count_sees_a_longer_way():
    """The counter itself: a dispatcher in jaxnorm between a function and layer_norm adds two calls to layer
    norm's four (itself and layer_norm), on the way to either of the platforms' formulas."""
    def dispatcher(x):
        return jaxnorm.layer_norm(jaxnorm.layer_norm_init(5), x, normalized_shape=5)

    def public(x):
        return dispatcher(x)

    dispatcher.__code__ = dispatcher.__code__.replace(co_filename=str(PACKAGE / "_dispatch.py"))
    assert _calls_to_formulas(public, public, jnp.ones((4, 5))) == {"checked_one_pass": 6, "row_moments": 6}


# ------------------------------------------------------------------------------------------ the import graph

CORE = sorted(p for p in PACKAGE.glob("_*.py")
              if p.stem not in ("__init__", "_conventions", "_linen_weight_norms", "_nnx_weight_norms"))
WRAPPERS = ("jaxnorm.linen", "jaxnorm.nnx", "jaxnorm.equinox", "jaxnorm._conventions", "jaxnorm._linen_weight_norms",
            "jaxnorm._nnx_weight_norms", "jaxnorm.interop", "jaxnorm.precise_bn", "flax", "equinox")


def _imports(path: pathlib.Path) -> list[tuple[str, list[str]]]:
    """(module, names) of every import in the file."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.append((node.module, [a.name for a in node.names]))
    return out


@pytest.mark.parametrize("path", CORE, ids=lambda p: p.name)
def test_the_functional_core_imports_no_wrapper(path):
    for module, names in _imports(path):
        full = [module] + [f"{module}.{n}" for n in names]
        assert not any(m == w or m.startswith(w + ".") for m in full for w in WRAPPERS), (path.name, module, names)


def _private_names_used(source: str) -> list[str]:
    """``module.name`` for each private name of another jaxnorm module the source imports or reads: ``from
    jaxnorm._x import _y``, or ``alias._y`` for an imported jaxnorm module (``from jaxnorm import _conventions``,
    a private module, is allowed: its public names are what modules share)."""
    tree, aliases, used = ast.parse(source), set(), []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("jaxnorm"):
            folder = PACKAGE.parent.joinpath(*node.module.split("."))
            for a in node.names:
                is_module = (folder / f"{a.name}.py").exists() or (folder / a.name).is_dir()
                if a.name.startswith("_") and not is_module:
                    used.append(f"{node.module}.{a.name}")
                if is_module:
                    aliases.add(a.asname or a.name)
        elif isinstance(node, ast.Import):
            aliases |= {a.asname or a.name for a in node.names if a.name.startswith("jaxnorm")}
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
            if node.attr.startswith("_") and not node.attr.startswith("__"):
                used.append(f"{node.value.id}.{node.attr}")
    return used


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_uses_another_modules_private_name(path):
    assert _private_names_used(path.read_text()) == []


def test_a_private_name_of_another_module_is_seen():
    source = ("from jaxnorm import kernels\nfrom jaxnorm.interop import _nnx\nfrom jaxnorm._checks import _KINDS\n"
              "from jaxnorm import _conventions as conventions\n"
              "kernels._mode(); _nnx._path(()); conventions.groups(1, None)\n")
    assert sorted(_private_names_used(source)) == ["_nnx._path", "jaxnorm._checks._KINDS", "kernels._mode"]
