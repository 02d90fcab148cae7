"""The README is part of the product: its quick start and sections stay intact."""

import pathlib

README = (pathlib.Path(__file__).parent.parent / "README.md").read_text()


def test_readme_sections_appear_once_and_the_file_is_sane():
    headings = [line for line in README.splitlines() if line.startswith("## ")]
    assert len(headings) == len(set(headings)), "a README section is duplicated"
    for needed in ("## Quick start", "## Functional API", "## Flax modules", "## Tolerances", "## Experiments",
                   "## Benchmarks", "## Multi-device: synchronized statistics"):
        assert needed in headings, needed
    assert len(README) < 80_000, "the README grew suspiciously large"


def test_quick_start_is_two_commands():
    block = README.split("## Quick start", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    commands = [line for line in block.strip().splitlines() if line.strip()]
    assert len(commands) == 2
    assert "python -m experiments" in commands[0] and "pytest" in commands[1]
