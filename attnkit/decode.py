"""Captured decoding: ``generate()`` with every decode step replayed from one CUDA graph.

    model.generate(**inputs, max_new_tokens=64, custom_generate=attnkit.captured_decoding)

transformers' ``generate`` prepares the inputs, logits processors and stopping criteria, then hands
the decoding loop to a callable given as ``custom_generate`` (its public hook for decoding loops).
This loop prefills the prompt as usual, with the recipe's methods acting on it, copies the cache
into fixed-capacity buffers (:mod:`attnkit.engine.graphs`), captures one decode step, and replays
it for every later token: the host only picks the next tokens. With ``compile=True`` the step's
model code (norms, rotary, projections, MLP) is first compiled by ``torch.compile`` into fewer,
fused kernels, attnkit's attention left out of the compiled graphs, and the graph captures those
(``custom_generate=functools.partial(attnkit.captured_decoding, compile=True)``). The model needs no handle (the
untouched model decodes through the same path); with one, its methods must be replayable
(``Method.replayable``: ``head_mask``, ``ph3``, ``snapkv``, ``streaming``, ``razor``, ``tidaldecode``,
``pine``, ACT's fast path, or any method at its identity setting).

Where a step cannot be captured (no CUDA or Triton, a method whose decode-time work runs on the
host, a cache of another kind, capture failing), the loop says why once and decodes eagerly, with
the same token choice, from the same prefill.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from transformers import DynamicCache

from attnkit import compat, kernels
from attnkit.engine.graphs import GraphCache, GraphError, graph_cache
from attnkit.handle import Handle, active_handle, apply
from attnkit.heads import text_config
from attnkit.methods.base import METHODS

Step = Callable[[torch.Tensor], torch.Tensor]
"""(next tokens [batch]) -> the next step's logits [batch, vocab], float32."""


def captured_decoding(
    model: torch.nn.Module,
    input_ids: torch.LongTensor,
    logits_processor: Any,
    stopping_criteria: Any,
    generation_config: Any,
    synced_gpus: bool = False,
    streamer: Any = None,
    mode: str = "graph",
    compile: bool = False,
    **model_kwargs: Any,
) -> torch.LongTensor:
    """A decoding loop for ``generate(custom_generate=...)``: greedy or sampled, one CUDA graph per
    generation. Returns the sequences (prompt and new tokens), as ``generate`` does by default.

    ``mode``: ``graph`` (capture and replay); ``buffers`` (the captured step's computation run
    eagerly on the same buffers, with no graph: what tests check on a CPU); ``eager``. ``compile``:
    the captured step runs the model's code as ``torch.compile`` builds it (compiled at the first
    decode step; attnkit's attention and the methods' hooks stay as they are).
    """
    check_request(generation_config, synced_gpus, model_kwargs)
    handle = active_handle(model)
    temporary = apply(model, []) if handle is None else None
    try:
        loop = Loop(
            model, handle or temporary, logits_processor, stopping_criteria, generation_config, streamer, mode, compile
        )
        return loop.run(input_ids, model_kwargs.get("attention_mask"), model_kwargs.get("position_ids"))
    finally:
        if temporary is not None:
            temporary.remove()


def decoding(mode: str) -> dict[str, Any]:
    """``generate()`` keyword arguments for a task's ``decode`` setting (``eager``, ``captured`` or
    ``compiled``)."""
    if mode == "eager":
        return {}
    return {"custom_generate": functools.partial(captured_decoding, compile=mode == "compiled")}


def check_request(generation_config: Any, synced_gpus: bool, model_kwargs: dict[str, Any]) -> None:
    """Refuse what this loop does not do, naming the way that does."""
    if synced_gpus:
        raise GraphError("captured decoding runs on one process; drop synced_gpus or custom_generate")
    if getattr(generation_config, "return_dict_in_generate", False):
        raise GraphError("captured decoding returns token ids only; drop return_dict_in_generate or custom_generate")
    if (getattr(generation_config, "num_beams", None) or 1) != 1:
        raise GraphError("captured decoding samples or decodes greedily; set num_beams=1 or drop custom_generate")
    extra = sorted(key for key, value in model_kwargs.items() if value is not None and key not in PASSED)
    if extra:
        raise GraphError(
            f"captured decoding takes input ids and an attention mask; it cannot pass {', '.join(extra)} "
            "(drop custom_generate for such inputs)"
        )


PASSED = ("attention_mask", "position_ids", "use_cache", "logits_to_keep", *compat.CACHE_KEYWORDS)
"""What generate hands a decoding loop besides input ids that this loop takes (a cache it makes
itself; logits for the last position only)."""


class Loop:
    """One generation: the prefill, then decode steps through a captured graph or eagerly."""

    def __init__(
        self,
        model: torch.nn.Module,
        handle: Handle,
        processors: Any,
        criteria: Any,
        config: Any,
        streamer: Any = None,
        mode: str = "graph",
        compile: bool = False,
    ):
        self.model, self.handle, self.processors, self.criteria = model, handle, processors, criteria
        self.config, self.streamer, self.mode, self.compile = config, streamer, mode, compile

    def run(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, positions: torch.Tensor | None = None
    ) -> torch.LongTensor:
        model, config = self.model, self.config
        cache = DynamicCache(config=text_config(model.config))
        if positions is None:
            positions = prompt_positions(input_ids, attention_mask)
        with torch.no_grad():
            out = model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=positions,
                **compat.cache_argument(model, cache),
                use_cache=True,
                logits_to_keep=1,
            )
        logits = out.logits[:, -1].to(dtype=torch.float32)
        budget = new_tokens(config, input_ids.shape[1])
        if budget == 0:
            return input_ids
        step: Step | None = None  # made at the first decode step: a one-token generation captures nothing
        sequences = input_ids
        unfinished = torch.ones(input_ids.shape[0], dtype=torch.long, device=input_ids.device)
        pad = pad_token(config)
        for made in range(budget):
            scores = self.processors(sequences, logits)
            tokens = self.choose(scores)
            if pad is not None:
                tokens = tokens * unfinished + pad * (1 - unfinished)
            sequences = torch.cat([sequences, tokens[:, None]], dim=-1)
            if self.streamer is not None:
                self.streamer.put(tokens.cpu())
            unfinished = unfinished & ~self.criteria(sequences, scores)
            if made + 1 == budget or unfinished.max() == 0:
                break
            with torch.no_grad():
                step = step or self.steps(cache, attention_mask, positions[:, -1:] + 1, budget - 1)
                logits = step(tokens)
        if self.streamer is not None:
            self.streamer.end()
        return sequences

    def choose(self, scores: torch.Tensor) -> torch.Tensor:
        if getattr(self.config, "do_sample", False):
            return torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)
        return scores.argmax(dim=-1)

    def steps(self, cache: Any, attention_mask: torch.Tensor | None, positions: torch.Tensor, budget: int) -> Step:
        """The decode step: replayed from a graph where it can be, else eager (saying why)."""
        reason = self.why_eager(cache)
        if reason is None:
            try:
                return self.captured(cache, attention_mask, budget)
            except (GraphError, RuntimeError) as error:
                reason = f"capturing the decode step failed ({error})"
        warnings.warn(f"attnkit: decoding eagerly: {reason}", stacklevel=3)
        return eager_steps(self.model, cache, attention_mask, positions)

    def why_eager(self, cache: Any) -> str | None:
        if self.mode == "eager":
            return "asked to"
        if self.handle.unreplayable:
            replayable = ", ".join(name for name, cls in METHODS.items() if cls.replayable is True)
            return (
                f"{', '.join(self.handle.unreplayable)} change(s) decode steps on the host, which a captured "
                f"graph cannot replay (replayable: {replayable}, act's fast path, and methods at their identity "
                "settings)"
            )
        probe = next((layer.keys for layer in cache.layers if getattr(layer, "keys", None) is not None), None)
        if probe is None:
            return "the prefill left no keys in the cache"
        if not kernels.installed():
            return "captured decoding needs Triton (pip install triton)"
        if self.mode == "graph" and not kernels.available(probe):
            return "captured decoding needs a CUDA device and Triton"
        return None

    def captured(self, cache: Any, attention_mask: torch.Tensor | None, budget: int) -> Step:
        """Copy the prefill into a :class:`GraphCache`, capture one step (or, in ``buffers`` mode,
        run it eagerly on the buffers: the same computation without a graph, for tests)."""
        graphed = graph_copy(self.handle, cache, budget, attention_mask)
        forward, logits = graph_step(self.model, graphed, self.compile)
        if self.mode == "buffers":

            def run(tokens: torch.Tensor) -> torch.Tensor:
                graphed.inputs.tokens.copy_(tokens[:, None])
                forward()
                return logits.clone()

            return run
        replay = Replay(forward, graphed, self.handle, self.compile)

        def run(tokens: torch.Tensor) -> torch.Tensor:
            replay(tokens)
            return logits.clone()

        return run


def graph_copy(handle: Handle, cache: Any, new_tokens: int, attention_mask: torch.Tensor | None) -> GraphCache:
    """``cache`` in fixed-capacity buffers with room for ``new_tokens`` (:func:`graph_cache`), continuing
    its sequence in ``handle``'s tracker, so that what the prefill found stays there for the steps."""
    graphed = graph_cache(cache, new_tokens, attention_mask)
    handle.tracker.share(cache, graphed)
    return graphed


def graph_step(
    model: torch.nn.Module, graphed: GraphCache, compile: bool = False
) -> tuple[Callable[[], None], torch.Tensor]:
    """The decode step a graph captures: the model on the buffers' tokens and positions, its last
    logits [batch, vocab] (float32) into a fixed buffer, the buffers moved on by one token.
    ``compile``: the model as ``torch.compile`` builds it (compiled at the step's first runs)."""
    inputs = graphed.inputs
    vocab = model.get_output_embeddings().weight.shape[0]
    logits = torch.empty(inputs.tokens.shape[0], vocab, device=inputs.tokens.device)
    with_cache = compat.cache_argument(model, graphed)
    call = torch.compile(model) if compile else model
    layers = len(graphed.layers)
    handle = active_handle(model)
    if handle is None:
        raise GraphError("a captured decode step runs under an attnkit handle: attnkit.apply(model, recipe) first")

    def forward() -> None:
        with handle.routing(), compile_limits(layers) if compile else contextlib.nullcontext():
            out = call(input_ids=inputs.tokens, position_ids=inputs.positions, **with_cache, use_cache=True)
        logits.copy_(out.logits[:, -1])
        inputs.advance()

    return forward, logits


@contextlib.contextmanager
def compile_limits(layers: int) -> Iterator[None]:
    """torch.compile's settings for a step of ``layers`` layers: recompile limits raised, and guards
    on the modules' hooks (a handle applied after an earlier compilation brings hooks that
    torch.compile would otherwise not see). Each layer's attention is compiled once per layer (its
    index is a constant of its graph), once more when the host-side lengths become dynamic, and again
    for each kind of cache layer a later handle decodes from (a compressed layer, razor's groups): on
    transformers 5.17 an 8-layer model decoding untouched, then with snapkv and razor, held 3.5
    versions per layer. Past the limit a frame runs uncompiled, so the limit leaves room for
    several handles in one process; a replayed step checks no guards, so versions cost nothing there."""
    limit = 8 * layers + 16
    with torch._dynamo.config.patch(
        recompile_limit=limit, accumulated_recompile_limit=max(256, 8 * limit), skip_nnmodule_hook_guards=False
    ):
        yield


class Replay:
    """One decode step captured in a CUDA graph (after a warm-up run on a side stream); calling it
    writes the step's tokens, replays the graph, and counts the step in the methods' stats as the
    captured call counted it (the replay runs no Python), its counters of cached keys grown by the
    tokens since the capture. Neither the warm-up nor the capture
    counts, and the buffers are set back to the first step afterwards."""

    def __init__(self, forward: Callable[[], None], graphed: GraphCache, handle: Handle, compiled: bool = False):
        self.graphed, inputs = graphed, graphed.inputs
        self.stats = [m.stats for m in handle.methods]
        saved = [s.checkpoint() for s in self.stats]
        warmups = 2 if compiled else 1  # a compiled step settles its dynamic host values at the second run
        try:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(warmups):
                    forward()  # allocations and compilation (Triton's, torch.compile's) happen outside the graph
            torch.cuda.current_stream().wait_stream(stream)
            inputs.advance(-warmups)
            self.graph = torch.cuda.CUDAGraph()
            # a compiled step compiles nothing in capture: a recompilation there raises (and decoding falls back)
            frozen = torch._dynamo.config.patch(error_on_recompile=True) if compiled else contextlib.nullcontext()
            with frozen, torch.cuda.graph(self.graph):
                forward()
            self.recorded = [(s.last, s.growth) for s in self.stats]
            # tokens past the captured call: it counted on host lengths the warm-ups had moved on
            self.later = -warmups
        finally:
            for s, state in zip(self.stats, saved):
                s.rollback(state)
        graphed.move(-warmups - 1)  # the warm-ups and the capture each counted a token on the host

    def __call__(self, tokens: torch.Tensor) -> None:
        """One decode step for ``tokens`` [batch]."""
        self.graphed.inputs.tokens.copy_(tokens[:, None])
        self.graph.replay()
        self.graphed.move(1)
        for s, (call, growth) in zip(self.stats, self.recorded):
            s.repeat(call, growth=growth, later=self.later)
        self.later += 1

    def rewind(self, steps: int) -> None:
        """Go back ``steps`` tokens (a benchmark repeating steps over the same context)."""
        self.graphed.inputs.advance(-steps)
        self.graphed.move(-steps)
        self.later -= steps


def eager_steps(
    model: torch.nn.Module, cache: Any, attention_mask: torch.Tensor | None, positions: torch.Tensor
) -> Step:
    """Decode steps on the prefill's own cache, one forward call each."""
    state = {"mask": attention_mask, "positions": positions}
    with_cache = compat.cache_argument(model, cache)

    def run(tokens: torch.Tensor) -> torch.Tensor:
        mask = state["mask"]
        if mask is not None:
            mask = state["mask"] = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=-1)
        out = model(
            input_ids=tokens[:, None],
            attention_mask=mask,
            position_ids=state["positions"],
            **with_cache,
            use_cache=True,
        )
        state["positions"] = state["positions"] + 1
        return out.logits[:, -1].to(dtype=torch.float32)

    return run


def prompt_positions(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Position ids as ``generate`` makes them: real tokens counted from 0, padding at 1."""
    if attention_mask is None:
        return torch.arange(input_ids.shape[1], device=input_ids.device).expand(input_ids.shape[0], -1)
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 1)


def new_tokens(config: Any, prompt: int) -> int:
    """How many tokens to generate, from ``max_new_tokens`` or ``max_length``."""
    if getattr(config, "max_new_tokens", None) is not None:
        return int(config.max_new_tokens)
    return max(int(config.max_length) - prompt, 0)


def pad_token(config: Any) -> int | None:
    """The token finished rows get (generate's rule: the pad token, else the first EOS), or None
    where nothing stops a row early."""
    if getattr(config, "eos_token_id", None) is None:
        return None
    if config.pad_token_id is not None:
        return int(config.pad_token_id)
    eos = config.eos_token_id
    return int(eos[0] if isinstance(eos, (list, tuple)) else eos)
