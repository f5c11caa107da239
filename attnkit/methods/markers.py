"""Markers in a prompt: token ids given as ids or as text, found in a row of token ids."""

from __future__ import annotations

from typing import Any

import torch
from transformers import AutoTokenizer

from attnkit.recipe.methods import Marker


def marker_ids(marker: Marker, tokenizer: Any, what: str, cls: str) -> list[int]:
    """A marker's token ids: ids as given, or text encoded by ``tokenizer`` (without special tokens).
    ``what`` and ``cls`` name the setting and the method class in errors."""
    if isinstance(marker, int):
        return [marker]
    if isinstance(marker, list):
        if not marker:
            raise ValueError(f"{what}: an empty list of token ids")
        return list(marker)
    if tokenizer is None:
        raise ValueError(
            f"{what} {marker!r} is a string but no tokenizer was found; pass {cls}(..., tokenizer=tok) "
            "or give the marker as token ids"
        )
    ids = tokenizer.encode(marker, add_special_tokens=False)
    if not ids:
        raise ValueError(f"{what} {marker!r} encodes to no tokens")
    return list(ids)


def find(tokens: list[int | None], pattern: list[int], start: int) -> int | None:
    """The first index >= start where ``pattern`` occurs in ``tokens``."""
    n = len(pattern)
    for i in range(start, len(tokens) - n + 1):
        if tokens[i : i + n] == pattern:
            return i
    return None


def saved_tokenizer(model: torch.nn.Module) -> Any:
    """The tokenizer saved beside a model loaded from a local folder, if any (no downloads)."""
    path = getattr(model.config, "_name_or_path", "") or ""
    if not path:
        return None
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception:
        return None
