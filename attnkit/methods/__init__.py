"""Built-in methods. Importing this package registers them."""

from attnkit.methods.act import ACT, ACTConfig
from attnkit.methods.base import Method, MethodConfig
from attnkit.methods.head_mask import HeadMask, HeadMaskConfig
from attnkit.methods.ph3 import PH3, PH3Config
from attnkit.methods.razor import Razor, RazorConfig
from attnkit.methods.snapkv import SnapKV, SnapKVConfig
from attnkit.methods.streaming import Streaming, StreamingConfig
from attnkit.methods.var import VAR, VARConfig

__all__ = [
    "ACT", "ACTConfig", "Method", "MethodConfig", "HeadMask", "HeadMaskConfig", "PH3", "PH3Config", "Razor", "RazorConfig",
    "SnapKV", "SnapKVConfig", "Streaming", "StreamingConfig", "VAR", "VARConfig",
]
