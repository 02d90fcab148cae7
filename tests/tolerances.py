"""The tests' tolerance table is the library's own (``jaxnorm/_tolerances.py``), which ``interop.compare`` uses
too: one table, also in README.md."""

from jaxnorm._tolerances import CUSTOM, DEFAULT, tol

__all__ = ["CUSTOM", "DEFAULT", "tol"]
