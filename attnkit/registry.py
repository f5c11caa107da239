"""Method name -> method class. Methods register themselves with :func:`register`."""

from __future__ import annotations

from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from attnkit.methods.base import Method

M = TypeVar("M", bound="type[Method]")

METHODS: dict[str, "type[Method]"] = {}


def register(cls: M) -> M:
    """Class decorator: make a method available to recipes under ``cls.name``."""
    if cls.name in METHODS and METHODS[cls.name] is not cls:
        raise ValueError(f"method name {cls.name!r} is already registered by {METHODS[cls.name].__name__}")
    METHODS[cls.name] = cls
    return cls


def get_method(name: str) -> "type[Method]":
    """The class registered under ``name``, or an error listing the known names."""
    import attnkit.methods  # noqa: F401  (registers the built-in methods)

    try:
        return METHODS[name]
    except KeyError:
        known = ", ".join(sorted(METHODS))
        raise KeyError(f"unknown method {name!r}; known methods: {known} (see `attnkit list`)") from None
