"""attnkit: training-free attention interventions for Hugging Face transformers models.

    with attnkit.apply(model, "recipes/quickstart.yaml") as handle:
        model.generate(...)
        handle.stats()
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from attnkit import methods
from attnkit.apply import Handle
from attnkit.apply import apply as _apply
from attnkit.recipe import Recipe, RecipeError, load_recipe

__version__ = "0.1.0"


def apply(model: Any, recipe: Any = None, *, allow_foreign_heads: bool = False) -> Handle:
    """Apply a recipe (a Recipe, a YAML path, a dict) or methods to a loaded model."""
    if isinstance(recipe, (str, Path, dict)):
        recipe = load_recipe(recipe)
    if isinstance(recipe, Recipe):
        allow_foreign_heads = allow_foreign_heads or recipe.allow_foreign_heads
    return _apply(model, recipe, allow_foreign_heads=allow_foreign_heads)


__all__ = ["Handle", "Recipe", "RecipeError", "apply", "load_recipe", "methods", "__version__"]
