"""The documentation is tested: every Python example in the README and docs/ runs, the API reference covers
every public name, and user-facing text stays short and free of tracker references."""

from __future__ import annotations

import contextlib
import importlib
import io
import pathlib
import re
import sys
import types

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
PAGES = [p for p in PAGES if "_build" not in p.parts and p.name != "report.md"]
PUBLIC = ["jaxnorm", "jaxnorm.linen", "jaxnorm.nnx", "jaxnorm.equinox", "jaxnorm.interop", "jaxnorm.precise_bn",
          "jaxnorm.kernels"]


def python_blocks(page: pathlib.Path) -> list[str]:
    return [code for code, _ in blocks_with_output(page)]


def blocks_with_output(page: pathlib.Path) -> list[tuple[str, str | None]]:
    """(code, shown output) for every Python block; the output is a ```text block right after it, else None."""
    found = re.findall(r"^```python\n(.*?)^```\n(?:\n```text\n(.*?)^```\n)?", page.read_text(), re.S | re.M)
    return [(code, output or None) for code, output in found]


def numbers_masked(text: str) -> list[str]:
    """The shown output with every number replaced (they differ in the last digits between machines) and runs of
    spaces collapsed: the words, modules, markers and layout must match what the block really prints."""
    lines = [re.sub(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:e[-+]?\d+)?|inf|nan", "#", line) for line in text.strip().splitlines()]
    return [re.sub(r"-{2,}", "--", re.sub(r" +", " ", line)).rstrip() for line in lines]


@pytest.mark.parametrize("page", [p for p in PAGES if python_blocks(p)], ids=lambda p: str(p.relative_to(ROOT)))
def test_every_python_example_runs(page, monkeypatch):
    """A page's blocks run in order in one namespace, as a reader would paste them; a block followed by a
    ```text block must print that text (numbers aside)."""
    blocks = python_blocks(page)
    for needs in ("torch", "equinox"):
        if any(re.search(rf"^\s*(import|from) {needs}\b", b, re.M) for b in blocks):
            pytest.importorskip(needs, reason=f"{page.name}'s examples use {needs}")
    module = types.ModuleType("docs_example")  # a real module: dataclasses (Flax modules) look theirs up
    monkeypatch.setitem(sys.modules, module.__name__, module)
    for i, (block, shown) in enumerate(blocks_with_output(page)):
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed) if shown is not None else contextlib.nullcontext():
            exec(compile(block, f"{page.relative_to(ROOT)} (python block {i + 1})", "exec"), module.__dict__)
        if shown is not None:
            assert numbers_masked(printed.getvalue()) == numbers_masked(shown), (
                f"{page.relative_to(ROOT)} python block {i + 1} prints:\n{printed.getvalue()}")


def test_the_api_reference_covers_every_public_name():
    api = (ROOT / "docs" / "api.md").read_text()
    for name in PUBLIC:
        if name == "jaxnorm.equinox":
            pytest.importorskip("equinox")
        module = importlib.import_module(name)
        assert f".. automodule:: {name}\n" in api, f"docs/api.md has no automodule for {name}"
        assert module.__doc__ or name == "jaxnorm", name
        for attr in module.__all__:
            assert getattr(module, attr).__doc__, f"{name}.{attr} has no docstring"
            if ":no-members:" in api.split(f".. automodule:: {name}\n", 1)[1].split("```", 1)[0]:
                assert f".. autoclass:: {name}.{attr}\n" in api, f"docs/api.md misses {name}.{attr}"


def test_readme_is_short_and_no_page_mentions_tracker_numbers():
    assert len((ROOT / "README.md").read_text().encode()) <= 10_240, "the README must stay within 10 KB"
    for page in PAGES:
        text = page.read_text()
        # our tracker's numbers mean nothing to a user (other projects' issues are cited as owner#N or equinox#N)
        hits = re.findall(r"(?i)\b(?:issue|task|ticket)s? #?\d+|(?<![\w/])#\d+\b", text)
        assert not hits, f"{page.relative_to(ROOT)} mentions {hits}"


def test_every_page_is_in_the_table_of_contents():
    index = (ROOT / "docs" / "index.md").read_text()
    for page in PAGES:
        if page.parent.name == "docs" and page.name != "index.md" or page.parent.name == "guides":
            rel = page.relative_to(ROOT / "docs").with_suffix("").as_posix()
            assert f"\n{rel}\n" in index, f"docs/index.md's toctree misses {rel}"
