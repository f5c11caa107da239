"""The ``generate`` task: batched, left-padded ``model.generate`` over a list of prompts."""

from __future__ import annotations

import time
from typing import Any

import torch

from attnkit.decode import decoding
from attnkit.heads import ModelShape
from attnkit.recipe.tasks import GenerateTask
from attnkit.tasks.result import (
    TaskDataError,
    TaskResult,
    chat_prompt,
    progress_bar,
    read_jsonl,
    uses_chat_template,
)


def load_prompts(task: GenerateTask) -> list[str]:
    """The task's prompts, inline or from ``prompts_file`` (``{"prompt": ...}`` per line), cut to ``limit``."""
    if task.prompts is not None:
        prompts = list(task.prompts)
    else:
        prompts = []
        for number, item in read_jsonl(task.prompts_file, "task.prompts_file"):
            if not isinstance(item.get("prompt"), str) or not item["prompt"].strip():
                raise TaskDataError(
                    f'{task.prompts_file}:{number}: needs a "prompt" string with some text, e.g. {{"prompt": "Hello"}}'
                )
            prompts.append(item["prompt"])
    return prompts[: task.limit]


def check_fits(tokenizer: Any, texts: list[str], task: GenerateTask, limit: int | None, add_special: bool) -> None:
    """Refuse, before generating anything, a prompt whose tokens plus ``max_new_tokens`` exceed the
    model's ``limit`` positions (None: unknown, not checked); past them a model's output is garbage."""
    if limit is None:
        return
    for i, text in enumerate(texts):
        length = len(tokenizer(text, add_special_tokens=add_special)["input_ids"])
        if length + task.max_new_tokens > limit:
            raise TaskDataError(
                f"task: prompt {i} is {length} tokens, and with max_new_tokens {task.max_new_tokens} it exceeds the "
                f"model's {limit} positions (max_position_embeddings); shorten it to {limit - task.max_new_tokens} "
                "tokens or lower max_new_tokens"
            )


def eos_ids(model: Any, tokenizer: Any) -> list[int]:
    """End-of-sequence ids to stop on: the model's generation config first, the tokenizer's as fallback.

    The model's own ids win because converted tokenizers (GGUF) can carry the wrong end token.
    """
    ids = getattr(model.generation_config, "eos_token_id", None)
    if ids is None:
        ids = tokenizer.eos_token_id
    if ids is None:
        return []
    return [ids] if isinstance(ids, int) else list(ids)


def count_new_tokens(new: torch.Tensor, stop: list[int]) -> list[int]:
    """Per row, generated tokens up to and including the first stop token (what follows is padding)."""
    return [next((i + 1 for i, token in enumerate(row) if token in stop), len(row)) for row in new.tolist()]


def generation_kwargs(task: GenerateTask, stop: list[int], pad_id: int) -> dict[str, Any]:
    """Arguments for ``model.generate``: length, stop ids, padding id, and sampling when asked for."""
    kwargs: dict[str, Any] = {
        "max_new_tokens": task.max_new_tokens,
        "eos_token_id": stop or None,
        "pad_token_id": pad_id,
        "do_sample": task.do_sample,
        **decoding(task.decode),
    }
    if task.do_sample:
        kwargs.update(temperature=task.temperature, top_p=task.top_p)
    return kwargs


def run_generate(model: Any, tokenizer: Any, task: GenerateTask, *, progress: bool = True) -> TaskResult:
    """Generate a completion for every prompt, ``batch_size`` at a time.

    Sampling is seeded with ``task.seed`` so a baseline run and an intervened run draw the same
    random stream. Rows hold the prompt, the decoded new tokens and how many were generated.
    """
    prompts = load_prompts(task)
    chat = uses_chat_template(tokenizer, task.chat_template)
    texts = [chat_prompt(tokenizer, p, task.system) if chat else p for p in prompts]
    check_fits(tokenizer, texts, task, ModelShape.from_config(model.config).max_positions, add_special=not chat)
    stop = eos_ids(model, tokenizer)
    kwargs = generation_kwargs(task, stop, tokenizer.pad_token_id)
    torch.manual_seed(task.seed)
    rows: list[dict[str, Any]] = []
    start = time.perf_counter()
    with progress_bar("generate", len(texts), progress) as advance:
        for i in range(0, len(texts), task.batch_size):
            batch = texts[i : i + task.batch_size]
            inputs = tokenizer(
                batch, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=not chat
            ).to(model.device)
            output = model.generate(**inputs, **kwargs)
            new = output[:, inputs["input_ids"].shape[1] :]
            for prompt, ids, n in zip(prompts[i : i + task.batch_size], new, count_new_tokens(new, stop)):
                completion = tokenizer.decode(ids[:n], skip_special_tokens=True)
                rows.append({"prompt": prompt, "completion": completion, "n_new_tokens": n})
            advance(len(batch))
    seconds = time.perf_counter() - start
    total = sum(row["n_new_tokens"] for row in rows)
    metrics = {
        "n": len(rows),
        "mean_new_tokens": total / len(rows) if rows else 0.0,
        "tokens_per_s": total / seconds if seconds > 0 else 0.0,
    }
    return TaskResult(metrics=metrics, rows=rows, seconds=seconds)
