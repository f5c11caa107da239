"""The base class every method builds on, and the registry of method classes."""

from __future__ import annotations

from typing import Any, ClassVar, TypeVar

from attnkit.engine.attach import Attachment
from attnkit.recipe.methods import MethodConfig
from attnkit.stats import Stats


class Method:
    """An intervention. ``attach`` installs its stage hooks through the :class:`Attachment`.

    A method holds its config and its statistics, never per-input state: whatever one input
    needs (sinks found at prefill, say) lives in the call state the engine hands to each hook.
    """

    name: ClassVar[str]
    config_class: ClassVar[type[MethodConfig]]
    one_per_layer: ClassVar[str | None] = None
    """Why two instances of this method cannot edit one layer (None: they can); ``apply`` refuses
    such recipes, naming this reason."""
    replayable: ClassVar[bool] = False
    """Whether a captured decode step (a CUDA graph, :mod:`attnkit.decode`) replays this method's
    decode-time work exactly: true of tensor-only hooks that decide nothing on the host per call."""

    def __init__(self, config: MethodConfig | None = None, **params: Any) -> None:
        if config is not None and params:
            raise TypeError(f"{type(self).__name__}: pass either a config or keyword parameters, not both")
        self.config = config if config is not None else self.config_class(method=self.name, **params)
        self.stats = Stats()

    def attach(self, at: Attachment) -> None:
        """Install this method's hooks on the model behind ``at``."""
        raise NotImplementedError

    @property
    def label(self) -> str:
        return self.name

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in self.config.model_dump().items() if k != "method")
        return f"{type(self).__name__}({fields})"


M = TypeVar("M", bound=type[Method])

METHODS: dict[str, type[Method]] = {}
"""Method name -> method class; the built-in methods register when ``attnkit.methods`` is imported."""


def register(cls: M) -> M:
    """Class decorator: make a method available to recipes under ``cls.name``."""
    if cls.name in METHODS and METHODS[cls.name] is not cls:
        raise ValueError(f"method name {cls.name!r} is already registered by {METHODS[cls.name].__name__}")
    METHODS[cls.name] = cls
    return cls
