"""Nested-dict helpers for "/"-separated Flax module paths (used by interop and fold_variables)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any


def get_path(tree: Mapping, path: str) -> Any:
    """The node at ``path``, or None when any part is missing."""
    node: Any = tree
    for part in path.split("/"):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def set_path(tree: dict, path: str, value: Any) -> None:
    *parents, leaf = path.split("/")
    for part in parents:
        tree = tree.setdefault(part, {})
    tree[leaf] = value


def walk(tree: Mapping, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(path, leaf) for every leaf of a nested dict."""
    for key, value in tree.items():
        path = f"{prefix}/{key}" if prefix else key
        if isinstance(value, Mapping):
            yield from walk(value, path)
        else:
            yield path, value
