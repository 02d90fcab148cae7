"""The README is part of the product: its quick start and sections stay intact."""

import pathlib
import re

README = (pathlib.Path(__file__).parent.parent / "README.md").read_text()


def test_readme_sections_appear_once_and_the_file_is_sane():
    headings = [line for line in README.splitlines() if line.startswith("## ")]
    assert len(headings) == len(set(headings)), "a README section is duplicated"
    for needed in ("## Quick start", "## Example", "## From PyTorch or Flax, in brief", "## Documentation"):
        assert needed in headings, needed


def test_every_relative_link_in_the_readme_and_docs_exists():
    root = pathlib.Path(__file__).parent.parent
    pages = [root / "README.md", *(p for p in (root / "docs").rglob("*.md") if "_build" not in p.parts)]
    for page in pages:
        for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" not in target:
                assert (page.parent / target).exists(), f"{page.name} links to missing {target}"


def test_quick_start_is_two_commands():
    block = README.split("## Quick start", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    commands = [line for line in block.strip().splitlines() if line.strip()]
    assert len(commands) == 2
    assert "python -m experiments" in commands[0] and "pytest" in commands[1]
