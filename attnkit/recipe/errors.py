"""Recipe errors: one ``path: problem`` line per mistake, named the way the YAML spells it."""

from __future__ import annotations

from pydantic import ValidationError

from attnkit.errors import UserError


class RecipeError(UserError, ValueError):
    """A recipe that cannot be used; ``errors`` holds one ``path: problem`` line per mistake."""

    def __init__(self, errors: list[str], source: str = "recipe"):
        self.errors = errors
        super().__init__(f"{source} is invalid:\n" + "\n".join(f"  {e}" for e in errors))


def pydantic_errors(err: ValidationError, prefix: str = "") -> list[str]:
    """pydantic's errors as ``path: message`` lines, with list indices written ``[i]``."""
    lines = []
    for item in err.errors():
        path = prefix
        for part in item["loc"]:
            if isinstance(part, int):
                path += f"[{part}]"
            elif not str(part).startswith(("function-", "tagged-union")):
                path += f".{part}" if path else str(part)
        message = item["msg"]
        if item["type"] == "extra_forbidden":
            message = "unknown key; remove it or check its spelling (`attnkit list` shows the parameters)"
        lines.append(f"{path}: {message}")
    return lines
