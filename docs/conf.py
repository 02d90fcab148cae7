"""Sphinx configuration: MyST Markdown pages, API reference from the docstrings, sphinx-book-theme.

Build: ``python -m sphinx -W docs docs/_build`` (warnings are errors, as in CI).
"""

import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

project = "jaxnorm"
author = "the jaxnorm developers"
copyright = "2026, the jaxnorm developers"

extensions = ["myst_parser", "sphinx.ext.autodoc", "sphinx.ext.napoleon", "sphinx.ext.viewcode"]  # napoleon: Google-style Args/Returns
source_suffix = {".md": "markdown"}
exclude_patterns = ["_build", "figures/report.md"]
myst_heading_anchors = 3
myst_enable_extensions = ["colon_fence"]

autodoc_member_order = "bysource"
napoleon_use_ivar = True  # a class's Attributes: section as fields, not as attributes autodoc documents again
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "undoc-members": False, "show-inheritance": False}

html_theme = "sphinx_book_theme"
html_title = "jaxnorm"
html_theme_options = {"repository_url": "https://github.com/jaxnorm/jaxnorm", "use_repository_button": False}
