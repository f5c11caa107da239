"""One entry per registered method: what the shared contract (tests/test_contract.py) runs it with.

A new method joins the contract by adding one :class:`MethodExample` to :data:`EXAMPLES` (as
kvpress's ``tests/default_presses.py`` does for its presses): a config that visibly changes the
logits, the config that is the method's identity, the tiny model to run it on, the stats key
that proves it acted, and its float64 reference. The contract fails for a registered method
without an entry, naming this file.

The references are the ones each method's own test module already checks it against, imported
from there so the contract and the method's tests cannot drift. Only which tokens a KV method keeps
is written here, from its definition, so that its reference does not read the method's own choice.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import attnkit
from attnkit.recipe.methods import TidalDecodeConfig
from tests.factory import tiny_model
from tests.pine_reference import ReferencePine
from tests.test_act import HEADS as ACT_HEADS
from tests.test_act import ReferenceACT
from tests.test_act import run as run_with
from tests.test_engine import zero_columns
from tests.test_kv import full_kept, generate, reference_backend, snapkv_reference_scores
from tests.test_pine import exact_angles
from tests.test_tidal import reference_backend as tidal_backend
from tests.test_var import SINK_DIM, TAU, ReferenceVAR, declared_positions, with_sinks

Logits = Callable[[Any, dict[str, torch.Tensor]], torch.Tensor]


# --------------------------------------------------------------------------------------------
# The entry
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Built:
    """A config value made on first use, such as the path of an artifact a profiler writes;
    cached for the session, so collecting the tests stays cheap."""

    make: Callable[[], Any]


@dataclass(frozen=True)
class MethodExample:
    """What the contract needs to know to run one method."""

    example: dict[str, Any]
    """A config as a recipe writes it (``{"method": ...}``) that visibly changes the logits."""
    identity: dict[str, Any]
    """The method's identity setting: its logits must be bit-identical to the untouched model's."""
    stat: str
    """A ``handle.stats()`` key that is > 0 once the example acted on a prompt."""
    reference: Logits
    """(float64 model, one unpadded row) -> float64 logits by the method's own reference."""
    acts_at: str = "prefill"
    """When ``stat`` first counts: ``decode`` for a method that leaves the prefill alone."""
    arch: str = "llama-gqa"
    backend: str = "sdpa"
    overrides: dict[str, Any] = field(default_factory=dict)
    """Tiny-config overrides (VAR edits layers 2 to L-2, so it needs more than 3 layers)."""
    prepare: Callable[[Any], Any] | None = None
    """Turns the tiny model into one the method acts on (VAR needs massive activations)."""
    seqs: tuple[list[int], ...] = ()
    """Prompts: the first is the longest; in a left-padded batch the others are padded by several tokens."""
    decode_steps: int = 0
    """KV methods only change what decode steps read: their logits are those of this many greedy
    steps. 0: the logits of one forward pass over the prompt."""
    tolerance: float = 1e-9
    """float64 tolerance against the reference, as the method's own test module uses."""

    def model(self, dtype: torch.dtype = torch.float32):
        """The tiny model this method runs on (a fresh one: tests may not share state)."""
        model = tiny_model(self.arch, attn_implementation=self.backend, dtype=dtype, **self.overrides)
        return self.prepare(model) if self.prepare else model

    def config(self, which: str = "example") -> dict[str, Any]:
        """The ``example`` or ``identity`` config, with :class:`Built` values made."""
        raw = self.example if which == "example" else self.identity
        return {key: value.make() if isinstance(value, Built) else copy.deepcopy(value) for key, value in raw.items()}

    def logits(self, model, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """What this method changes: forward logits [b, q, vocab], or decode logits [b, steps, vocab]."""
        if not self.decode_steps:
            with torch.no_grad():
                return model(**inputs).logits
        return decode_logits(model, inputs, self.decode_steps)


def decode_logits(model, inputs: dict[str, torch.Tensor], steps: int) -> torch.Tensor:
    """The logits of ``steps`` greedy steps [b, steps, vocab] in the model's dtype: read from the
    forward calls, since generate returns them cast to float32, too coarse for a float64 check."""
    seen = []
    hook = model.register_forward_hook(lambda _module, _args, output: seen.append(output.logits[:, -1].clone()))
    try:
        inputs = {k: v for k, v in inputs.items() if k != "position_ids"}  # generate derives them from the mask
        generate(model, inputs, steps)
    finally:
        hook.remove()
    return torch.stack(seen, 1)


# --------------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------------


def prompt(length: int, seed: int) -> list[int]:
    """BOS and ``length - 1`` random ordinary tokens of the tiny vocabulary (ids 3-127)."""
    gen = torch.Generator().manual_seed(seed)
    return [1] + torch.randint(3, 128, (length - 1,), generator=gen).tolist()


SHORT_SEQS = ([5, 9, 17, 33, 4, 8, 21, 60, 7, 11, 3, 90], [12, 40, 3, 77, 15, 6, 44])  # tests/test_act.py's
VAR_SEQS = (  # tests/test_var.py's SEQS: sinks (1, 61, 7, 104) inside and outside the span 2-8
    [1, 20, 61, 21, 22, 7, 23, 24, 25, 26, 104, 27, 28, 29],
    [1, 30, 31, 61, 32, 33, 34, 35, 36, 37, 38],
)
KV_SEQS = (prompt(36, 36), prompt(28, 28))  # longer than every KV example's budget
KV_STEPS = 3


def forward(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


# --------------------------------------------------------------------------------------------
# head_mask and ph3: the o_proj input columns of the heads zeroed by hand (tests/test_engine.py)
# --------------------------------------------------------------------------------------------

MASKED_HEADS = {1: [0, 2], 2: [3]}


def zeroed_heads(heads: dict[int, list[int]]) -> Logits:
    """Reference of pruning ``heads``: a copy of the model with their output columns zeroed."""

    def reference(model, inputs):
        return forward(zero_columns(copy.deepcopy(model), heads), inputs)

    return reference


PH3_K = 2
_ARTIFACTS: list[tempfile.TemporaryDirectory] = []


@functools.cache
def conflict_heads() -> str:
    """A conflict-heads artifact for the tiny llama-gqa, profiled as tests/test_ph3.py does it."""
    from attnkit.probes.configs import ConflictHeadsConfig
    from attnkit.probes.conflict_heads import profile
    from tests.test_ph3 import MERGES, conflict_rows, write
    from tests.test_tasks import char_tokenizer

    folder = tempfile.TemporaryDirectory(prefix="attnkit-contract-")
    _ARTIFACTS.append(folder)  # removed when the session ends
    root = Path(folder.name)
    data = write(root / "conflict.jsonl", conflict_rows(12, relations=True))
    path = root / "conflict.json"
    profile(
        tiny_model("llama-gqa"),
        char_tokenizer(merges=MERGES),
        ConflictHeadsConfig(data=data),
        model_id="tiny",
        output=path,
        progress=False,
    )
    return str(path)


def ph3_reference(model, inputs):
    """PH3 with steer: context prunes the top-k memory heads of the artifact's ranking."""
    ranking = json.loads(Path(conflict_heads()).read_text())["parameters"]["memory_heads"][:PH3_K]
    heads: dict[int, list[int]] = {}
    for layer, head, _ in ranking:
        heads.setdefault(int(layer), []).append(int(head))
    return zeroed_heads(heads)(model, inputs)


# --------------------------------------------------------------------------------------------
# act and sink_redistribute: the reference loops of tests/test_act.py and tests/test_var.py
# --------------------------------------------------------------------------------------------

ACT_THRESHOLD = 0.08
VAR_SPAN = {"start": 2, "end": 9}


def act_reference(model, inputs):
    return run_with(model, [ReferenceACT(ACT_HEADS, beta=0.4, threshold=ACT_THRESHOLD)], **inputs)[0]


def var_reference(model, inputs):
    spans = declared_positions(inputs["attention_mask"], VAR_SPAN["start"], VAR_SPAN["end"])
    return run_with(model, [ReferenceVAR(spans, dims=(SINK_DIM,), tau=TAU, p=0.6)], **inputs)[0]


# --------------------------------------------------------------------------------------------
# KV methods: the kept tokens by each method's definition, then tests/test_kv.py's float64
# attention that reads only those (and RazorAttention's compensation token, by its formula)
# --------------------------------------------------------------------------------------------

SNAPKV = {"budget": 14, "window": 4, "kernel": 3, "pooling": "avg"}
"""Average pooling: max pooling gives neighbours equal scores, so its top-k is not one set to compare with."""
STREAMING = {"budget": 12, "sink": 2}
RAZOR = {"heads": {0: [0], 2: [1]}, "sink": 2, "local": 4, "ratio": 4}


def kv_reference(kept: Callable[[Any, dict[str, torch.Tensor]], dict], compensation: bool = False) -> Logits:
    """Decode logits with attention restricted to ``kept(model, inputs)`` (layer -> KV head -> columns)."""

    def reference(model, inputs):
        restricted = full_kept(kept(model, inputs), model)
        with reference_backend(model, restricted, inputs["input_ids"].shape[1], compensation):
            return decode_logits(model, inputs, KV_STEPS)

    return reference


def every_head(model, columns: list[int]) -> dict:
    kv, layers = model.config.num_key_value_heads, model.config.num_hidden_layers
    return {layer: {head: columns for head in range(kv)} for layer in range(layers)}


def snapkv_kept(model, inputs):
    """The window, plus the top ``budget - window`` prefix tokens by the eager model's own attention."""
    length, window, budget = inputs["input_ids"].shape[1], SNAPKV["window"], SNAPKV["budget"]
    original = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        scores = snapkv_reference_scores(model, inputs, window, SNAPKV["kernel"], SNAPKV["pooling"])
    finally:
        model.set_attn_implementation(original)
    recent = list(range(length - window, length))
    return {
        layer: {head: sorted(row.topk(budget - window).indices.tolist()) + recent for head, row in enumerate(score)}
        for layer, score in scores.items()
    }


def streaming_kept(model, inputs):
    """The first ``sink`` tokens and the last ``budget - sink``, in every head."""
    length, sink = inputs["input_ids"].shape[1], STREAMING["sink"]
    return every_head(model, list(range(sink)) + list(range(length - (STREAMING["budget"] - sink), length)))


def razor_kept(model, inputs):
    """Retrieval KV heads read everything; the rest ``sink`` tokens and the last max(local, N / ratio)."""
    length, sink = inputs["input_ids"].shape[1], RAZOR["sink"]
    recent = max(RAZOR["local"], math.ceil(length / RAZOR["ratio"]))
    kept = every_head(model, list(range(sink)) + list(range(length - recent, length)))
    for layer, heads in RAZOR["heads"].items():
        for head in heads:
            kept[layer][head] = None
    return kept


# --------------------------------------------------------------------------------------------
# The registry of examples
# --------------------------------------------------------------------------------------------

# --------------------------------------------------------------------------------------------
# pine: segments between markers, the loops of tests/pine_reference.py
# --------------------------------------------------------------------------------------------

PINE_OPEN, PINE_CLOSE = 126, 127
PINE_SEQS = (  # prefix, three segments (each from its opening marker), suffix; then two segments
    [1, 5, 6, 126, 20, 21, 126, 30, 31, 32, 126, 40, 127, 50, 51, 52],
    [1, 7, 126, 33, 34, 126, 44, 127, 60, 61],
)


def pine_segments(ids: list[int]) -> list[int]:
    """Segment ids by the marker rule, written out here so the reference does not read the method's."""
    opens = [i for i, t in enumerate(ids) if t == PINE_OPEN]
    close = ids.index(PINE_CLOSE, opens[-1])
    segment = [0] * len(ids)
    for number, (start, end) in enumerate(zip(opens, [*opens[1:], close + 1], strict=True), start=1):
        segment[start:end] = [number] * (end - start)
    return segment


def pine_reference(model, inputs):
    ids = inputs["input_ids"][0].tolist()
    with torch.no_grad(), attnkit.apply(model, [ReferencePine(pine_segments(ids))]):
        return model(**inputs).logits


# --------------------------------------------------------------------------------------------
# tidaldecode: tests/test_tidal.py's float64 masking simulation of the reference code
# --------------------------------------------------------------------------------------------

TIDAL = {"budget": 8, "selection_layer": 1, "reselection_layer": 3}
"""On 5 layers: 1 and 3 select, 2 and 4 read 8 tokens per query head."""


def tidal_reference(model, inputs):
    with tidal_backend(model, TidalDecodeConfig(**TIDAL)):
        return decode_logits(model, inputs, KV_STEPS)


EXAMPLES: dict[str, MethodExample] = {
    "head_mask": MethodExample(
        example={"method": "head_mask", "heads": MASKED_HEADS, "scale": 0.0},
        identity={"method": "head_mask", "heads": MASKED_HEADS, "scale": 1.0},
        stat="head_outputs_scaled",
        reference=zeroed_heads(MASKED_HEADS),
        arch="phi3-mha",  # fused qkv_proj: the heads are still o_proj's input columns
        seqs=SHORT_SEQS,
    ),
    "act": MethodExample(
        example={"method": "act", "heads": ACT_HEADS, "threshold": ACT_THRESHOLD},
        identity={"method": "act", "heads": ACT_HEADS, "threshold": ACT_THRESHOLD, "beta": 1.0},
        stat="sinks_found",
        reference=act_reference,
        arch="gemma3-gqa",  # a sliding layer (1) and a full one (2) among the calibrated
        seqs=SHORT_SEQS,
    ),
    "sink_redistribute": MethodExample(
        example={"method": "sink_redistribute", "sink_dims": [SINK_DIM], "tau": TAU, "span": VAR_SPAN},
        identity={"method": "sink_redistribute", "sink_dims": [SINK_DIM], "tau": TAU, "span": VAR_SPAN, "p": 1.0},
        stat="rows_redistributed",
        reference=var_reference,
        overrides={"num_hidden_layers": 5},
        prepare=with_sinks,
        seqs=VAR_SEQS,
    ),
    "ph3": MethodExample(
        example={"method": "ph3", "heads": Built(conflict_heads), "steer": "context", "k": PH3_K},
        identity={"method": "ph3", "heads": Built(conflict_heads), "steer": "context", "k": 0},
        stat="head_outputs_scaled",
        reference=ph3_reference,
        seqs=SHORT_SEQS,
    ),
    "pine": MethodExample(
        example={"method": "pine", "markers": [PINE_OPEN, PINE_CLOSE]},
        identity={"method": "pine", "markers": [124, 125]},  # markers the prompts do not hold: no segments
        stat="segments",
        reference=pine_reference,
        prepare=exact_angles,  # the readers rotate at other positions than the reference: float32 tables round apart
        seqs=PINE_SEQS,
    ),
    "snapkv": MethodExample(
        example={"method": "snapkv", **SNAPKV},
        identity={"method": "snapkv", **SNAPKV, "budget": 64},
        stat="layers_compressed",
        reference=kv_reference(snapkv_kept),
        seqs=KV_SEQS,
        decode_steps=KV_STEPS,
    ),
    "razor": MethodExample(
        example={"method": "razor", **RAZOR},
        identity={"method": "razor", **RAZOR, "local": 64},
        stat="layers_compressed",
        reference=kv_reference(razor_kept, compensation=True),
        seqs=KV_SEQS,
        decode_steps=KV_STEPS,
    ),
    "streaming": MethodExample(
        example={"method": "streaming", **STREAMING},
        identity={"method": "streaming", **STREAMING, "budget": 64},
        stat="layers_compressed",
        reference=kv_reference(streaming_kept),
        arch="qwen3-gqa",
        seqs=KV_SEQS,
        decode_steps=KV_STEPS,
    ),
    "tidaldecode": MethodExample(
        example={"method": "tidaldecode", **TIDAL},
        identity={"method": "tidaldecode", **TIDAL, "budget": 64},  # more than the prompt and steps hold
        stat="selections",
        acts_at="decode",
        reference=tidal_reference,
        overrides={"num_hidden_layers": 5},
        seqs=KV_SEQS,
        decode_steps=KV_STEPS,
    ),
}
"""Method name -> its example; every name in ``attnkit.registry.METHODS`` needs one."""
