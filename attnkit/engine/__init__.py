"""The engine: the stage API methods attach through, below every method.

It routes a model's attention through one registered function (:mod:`.attention`), keeps per-layer
plans of stage hooks (:mod:`.plan`), tracks each forward call's phase from its cache
(:mod:`.calls`, :mod:`.state`), offers the attachment points (:mod:`.attach`) and the compressed
cache layers (:mod:`.kvcache`). It imports nothing from methods, recipes, tasks or the CLI;
``docs/architecture.md`` has the stage table and the order inside one call.
"""

from attnkit.engine.attach import Attachment
from attnkit.engine.plan import AttentionCall
from attnkit.engine.state import CallState

__all__ = ["Attachment", "AttentionCall", "CallState"]
