"""The built-in methods, one module each; importing this package registers them.

Their configs (the parameters and the papers' defaults) are in :mod:`attnkit.recipe.methods`.
"""

from attnkit.methods.act import ACT
from attnkit.methods.base import METHODS, Method
from attnkit.methods.head_mask import HeadMask
from attnkit.methods.ph3 import PH3
from attnkit.methods.pine import Pine
from attnkit.methods.razor import Razor
from attnkit.methods.sink_redistribute import SinkRedistribute
from attnkit.methods.snapkv import SnapKV
from attnkit.methods.streaming import Streaming
from attnkit.methods.tidal import TidalDecode


def get_method(name: str) -> type[Method]:
    """The class registered under ``name``, or an error listing the known names."""
    try:
        return METHODS[name]
    except KeyError:
        known = ", ".join(sorted(METHODS))
        raise KeyError(f"unknown method {name!r}; known methods: {known} (see `attnkit list`)") from None


__all__ = [
    "ACT",
    "METHODS",
    "HeadMask",
    "Method",
    "PH3",
    "Pine",
    "Razor",
    "SinkRedistribute",
    "SnapKV",
    "Streaming",
    "TidalDecode",
    "get_method",
]
