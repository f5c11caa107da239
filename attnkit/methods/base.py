"""The base classes every method builds on: a typed config and a small class with one job."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict

from attnkit.stats import Stats

if TYPE_CHECKING:
    from attnkit.apply import Attachment


class MethodConfig(BaseModel):
    """A method's parameters; field defaults are the paper's published defaults."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    method: str


class Method:
    """An intervention. ``attach`` installs its stage hooks through the :class:`Attachment`.

    A method holds its config and its statistics, never per-input state: whatever one input
    needs (sinks found at prefill, say) lives in the call state the engine hands to each hook.
    """

    name: ClassVar[str]
    config_class: ClassVar[type[MethodConfig]]

    def __init__(self, config: MethodConfig | None = None, **params: Any) -> None:
        if config is not None and params:
            raise TypeError(f"{type(self).__name__}: pass either a config or keyword parameters, not both")
        self.config = config if config is not None else self.config_class(method=self.name, **params)
        self.stats = Stats()

    def attach(self, at: "Attachment") -> None:
        """Install this method's hooks on the model behind ``at``."""
        raise NotImplementedError

    @property
    def label(self) -> str:
        return self.name

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in self.config.model_dump().items() if k != "method")
        return f"{type(self).__name__}({fields})"
