"""Built-in methods. Importing this package registers them."""

from attnkit.methods.base import Method, MethodConfig
from attnkit.methods.head_mask import HeadMask, HeadMaskConfig

__all__ = ["Method", "MethodConfig", "HeadMask", "HeadMaskConfig"]
