"""Which needle tokens does `snapkv` at 20% keep, per layer and KV head, with the paper's pooling
kernel (7) and with one longer than the needle (31)? SmolLM2-135M, needle at depth 0.5 of 1K and
4K prompts. Each layer prints one digit per KV head: the share of the needle's tokens kept, 0-9.

    python scripts/needle_kept.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import attnkit  # noqa: E402
from attnkit.compat import output_cache  # noqa: E402
from attnkit.engine.kvcache import CompressedLayer  # noqa: E402
from attnkit.methods import SnapKV  # noqa: E402
from attnkit.models import load_model  # noqa: E402
from attnkit.recipe.tasks import NeedleTask  # noqa: E402
from attnkit.tasks.needle import PromptBuilder, load_haystack, uses_chat_template  # noqa: E402


def needle_share(cache, start: int, end: int) -> list[str]:
    """Per compressed layer, one digit per KV head: kept needle tokens / needle tokens, 0-9."""
    out = []
    for layer in cache.layers:
        if isinstance(layer, CompressedLayer):
            group = layer.groups[0]
            kept = [((row >= start) & (row < end)).sum().item() for row in group.columns[0]]
            out.append("".join(str(round(9 * k / (end - start))) for k in kept))
    return out


def main() -> None:
    model, tokenizer = load_model("smollm2-135m-instruct")
    task = NeedleTask()
    haystack, _ = load_haystack(task)
    chat = uses_chat_template(tokenizer, task.chat_template)
    builder = PromptBuilder(
        tokenizer, haystack, question=task.question, template=task.template, chat=chat, system=task.system
    )
    for length in (1024, 4096):
        prompt = builder.build(length, 0.5, task.needle, task.expected)
        start, end = prompt.needle_span
        print(f"{length} tokens, needle at [{start}, {end})")
        for kernel in (7, 31):
            with attnkit.apply(model, [SnapKV(budget=0.2, kernel=kernel)]), torch.no_grad():
                cache = output_cache(model(input_ids=torch.tensor([prompt.input_ids]), use_cache=True))
                print(f"  kernel {kernel:2d}, layers 0-29:", " ".join(needle_share(cache, start, end)))


if __name__ == "__main__":
    main()
