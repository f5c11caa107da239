"""YAML read with bounds: safe tags only, a size cap, and a cap on what aliases expand to.

``yaml.safe_load`` already refuses ``!!python`` tags, but it builds aliases as shared objects, so
727 bytes of nested aliases (a "billion laughs") load at once and explode later, when something
walks the structure (pydantic, the head-set parser). Here the composed document is measured with
every alias expanded, before any Python object is built, and refused past :data:`MAX_NODES`.
"""

from __future__ import annotations

from typing import Any

import yaml

from attnkit.recipe.errors import RecipeError

MAX_BYTES = 1_000_000
"""The largest recipe text read (a recipe is a page of settings; data goes in files)."""
MAX_NODES = 100_000
"""The most YAML nodes a document may hold once its aliases are expanded."""


class BoundedLoader(yaml.SafeLoader):
    """The safe loader, refusing a document whose aliases expand past :data:`MAX_NODES` nodes."""

    def compose_document(self) -> yaml.Node:
        node = super().compose_document()
        expanded_size(node, {})
        return node


def expanded_size(node: yaml.Node, sizes: dict[int, int]) -> int:
    """The nodes under ``node`` with aliases expanded, counted once per shared node (memo ``sizes``)."""
    if id(node) in sizes:
        return sizes[id(node)]
    children: list[yaml.Node] = []
    if isinstance(node, yaml.SequenceNode):
        children = list(node.value)
    elif isinstance(node, yaml.MappingNode):
        children = [part for pair in node.value for part in pair]
    size = 1 + sum(expanded_size(child, sizes) for child in children)
    if size > MAX_NODES:
        raise RecipeError(
            [
                f"the YAML expands to more than {MAX_NODES} values through its aliases (&name / *name); write it out plainly"
            ]
        )
    sizes[id(node)] = size
    return size


def read_yaml(text: str, where: str) -> Any:
    """``text`` parsed as YAML within the bounds; every failure a :class:`RecipeError` naming ``where``."""
    if len(text.encode("utf-8", errors="replace")) > MAX_BYTES:
        raise RecipeError([f"{where}: larger than {MAX_BYTES} bytes; a recipe holds settings, put data in files"])
    try:
        return yaml.load(text, Loader=BoundedLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as err:
        raise RecipeError([f"{where}: not valid YAML: {one_line(err)}"]) from None
    except RecursionError:
        raise RecipeError([f"{where}: nested too deeply to read; flatten it"]) from None


def one_line(err: yaml.YAMLError) -> str:
    """A YAML error on one line: the problem and where it is."""
    return " ".join(str(err).split())
