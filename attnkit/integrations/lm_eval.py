"""lm-evaluation-harness's ``attnkit`` model type: lm-eval's HF model with an attnkit recipe applied.

Why a subclass and a launcher: lm-eval (0.4.13, the newest release) finds model types only in its
own registry and reads no plugin entry points, so ``lm_eval --model attnkit`` cannot find a type
that another package defines. Importing this module registers ``attnkit`` with lm-eval's
``@register_model``; ``attnkit-lm-eval`` (or ``python -m attnkit.integrations.lm_eval``) imports
it and then runs lm-eval's own command line, so every lm-eval option works as documented:

    attnkit-lm-eval --model attnkit --tasks ... \\
        --model_args pretrained=smollm2-135m-instruct,recipe=recipe.yaml

attnkit loads the model (embedded aliases, ``.gguf`` files, local folders, Hub ids), the recipe
stays applied for the life of the LM object, each request type logs what the methods did, and
the results' ``config`` gets an ``attnkit`` entry with the recipe and the methods' total stats.
From Python, ``attnkit.apply`` around a model handed to lm-eval's ``HFLM`` works as well.
"""

from __future__ import annotations

import logging
import sys
import weakref
from typing import Any

from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from attnkit.handle import Handle, apply
from attnkit.models import load_model
from attnkit.recipe import Recipe, load_recipe

# A child of lm-eval's logger: its command line shows these lines with its own, at its verbosity.
log = logging.getLogger("lm_eval.attnkit")

__all__ = ["AttnkitLM", "main"]


@register_model("attnkit")
class AttnkitLM(HFLM):
    """lm-eval's ``HFLM`` on a model that attnkit loaded and applied ``recipe`` to.

    ``pretrained`` overrides the recipe's ``model.name_or_path``; ``dtype``, ``attn_implementation``
    and ``device`` override the recipe's model settings. Without a recipe the model is untouched
    (the baseline). The recipe's ``task`` is not run: lm-eval's tasks are. Remote code runs only
    with ``trust_remote_code=True`` in the model arguments. Every other keyword goes to ``HFLM``.
    """

    def __init__(
        self,
        pretrained: str | None = None,
        recipe: str | None = None,
        *,
        dtype: str | None = None,
        attn_implementation: str | None = None,
        device: str | None = None,
        trust_remote_code: bool = False,
        **kwargs: Any,
    ) -> None:
        spec = load_recipe(recipe) if recipe else Recipe(name="untouched")
        model, tok = load_model(
            pretrained or spec.model.name_or_path,
            dtype=dtype or spec.model.dtype,
            attn_implementation=attn_implementation or spec.model.attn_implementation,
            device=None if spec.model.device_map is not None else device or spec.model.device,
            device_map=spec.model.device_map,
            trust_remote_code=bool(trust_remote_code),
        )
        super().__init__(pretrained=model, tokenizer=tok, **kwargs)
        self.recipe = spec
        self.handle: Handle = apply(model, spec)
        # the model lives as long as this LM: so does the recipe, removed when it goes (or on close)
        self._finalizer = weakref.finalize(self, self.handle.remove)

    def close(self) -> None:
        """Remove the recipe from the model now (the model is the untouched one again)."""
        self._finalizer()

    def _loglikelihood_tokens(self, *args: Any, **kwargs: Any) -> Any:
        """Score one request per forward call while methods are applied.

        Why: lm-eval right-pads loglikelihood batches with zeros and passes no attention mask, so
        a method with prompt-wide statistics (ACT's column means) would count the padding as
        tokens and a row's score would depend on its batch. Generation (left-padded, masked)
        keeps the batch size.
        """
        if not self.handle.methods or self.batch_size_per_gpu == 1:
            return super()._loglikelihood_tokens(*args, **kwargs)
        log.warning("attnkit: loglikelihood requests run one at a time (batch_size 1) while methods are applied")
        saved, self.batch_size_per_gpu = self.batch_size_per_gpu, 1
        try:
            return super()._loglikelihood_tokens(*args, **kwargs)
        finally:
            self.batch_size_per_gpu = saved

    def loglikelihood(self, *args: Any, **kwargs: Any) -> Any:
        out = super().loglikelihood(*args, **kwargs)
        self._report("loglikelihood")
        return out

    def loglikelihood_rolling(self, *args: Any, **kwargs: Any) -> Any:
        out = super().loglikelihood_rolling(*args, **kwargs)
        self._report("loglikelihood_rolling")
        return out

    def generate_until(self, *args: Any, **kwargs: Any) -> Any:
        out = super().generate_until(*args, **kwargs)
        self._report("generate_until")
        return out

    def attnkit_info(self) -> dict[str, Any]:
        """The recipe applied and each method's stats summed since it was applied."""
        return {
            "recipe": self.recipe.name,
            "methods": [m.model_dump(mode="json") for m in self.recipe.methods],
            "stats": self.handle.stats(total=True),
        }

    def get_model_info(self) -> dict[str, Any]:
        """lm-eval's model info plus ``attnkit``: it lands in the results' ``config``."""
        return {**super().get_model_info(), "attnkit": self.attnkit_info()}

    def _report(self, request_type: str) -> None:
        """Log what each method did; warn about one that never ran (nothing silent)."""
        for label, stats in self.handle.stats(total=True).items():
            if not stats.get("calls"):
                log.warning(f"attnkit: method {label!r} saw no forward call during {request_type}")
            else:
                log.info(f"attnkit after {request_type}: {label}: {stats}")


def main(argv: list[str] | None = None) -> None:
    """``attnkit-lm-eval``: lm-eval's command line, with the ``attnkit`` model type registered."""
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
