"""attnkit: training-free attention interventions for Hugging Face transformers models.

    with attnkit.apply(model, "recipes/quickstart.yaml") as handle:
        model.generate(...)
        handle.stats()

The names below load on first use, so ``import attnkit`` (and the CLI's ``--help``) does not
import torch or transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY = {
    "apply": "attnkit.handle",
    "Handle": "attnkit.handle",
    "captured_decoding": "attnkit.decode",
    "Recipe": "attnkit.recipe",
    "RecipeError": "attnkit.recipe",
    "load_recipe": "attnkit.recipe",
}

if TYPE_CHECKING:
    from attnkit import methods
    from attnkit.decode import captured_decoding
    from attnkit.handle import Handle, apply
    from attnkit.recipe import Recipe, RecipeError, load_recipe


def __getattr__(name: str) -> Any:
    if name == "methods":
        return importlib.import_module("attnkit.methods")
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'attnkit' has no attribute {name!r}")


__all__ = ["Handle", "Recipe", "RecipeError", "apply", "captured_decoding", "load_recipe", "methods", "__version__"]
