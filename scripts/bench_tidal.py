"""What does TidalDecode buy on a GPU? Decode step time and tokens/s, untouched model vs ``tidaldecode``.

Llama-3-8B shape (32 layers, 32 query / 8 KV heads of 128), random bf16 weights, sdpa, one GPU. Cases:
contexts of 32K and 128K tokens x batch 1 and 4 (``--batches``; 128K x 4 holds 64 GiB of keys and
values). Configurations: the untouched model and ``tidaldecode`` at budgets 256, 2048 and 4096 (per
query head, the reference's selection; ``--selection`` for the per-KV-head ones), selection at layer
2 and re-selection at 13.

The cache is made directly, not by a prefill: every layer's keys and values are seeded random bf16
numbers of the right shapes, ``context`` tokens of them, in preallocated buffers (one set, shared by
the cases: smaller batches and contexts are views of it). A decode step's time does not depend on
what the cached numbers are, except through which tokens TidalDecode selects, and random keys make
that selection as scattered as any. The cache layer writes each new token in place and hands
attention views of the filled part (``InPlaceLayer``): transformers' ``DynamicCache`` concatenates
the whole cache at every step, a full copy of every layer's keys and values that would cost both
configurations more than attention itself (serving engines and TidalDecode's reference keep a
preallocated pool too). After each step the cache is rewound, so every step sees ``context`` tokens.

Timing: the configurations take turns in interleaved rounds (the order rotated one place each round),
each round a block of ``--steps`` decode steps after ``--warmup`` untimed ones (CUDA events); a
configuration's step time is the median over rounds of its block's mean step, and the spread is
(max - min) / median over rounds. Ratios are against the untouched model of the same run. The
selection layers' overhead is measured apart: the selection (the new query's full logits over the
cache and their top-k, ``attnkit.methods.tidal.select``) on one layer's tensors, timed alone, times
the number of selecting layers per step.

    python scripts/bench_tidal.py [--rounds 5] [--steps 20] [--json out.json]     # on the GPU
    python scripts/bench_tidal.py --quick                                          # CPU smoke run, seconds
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_overhead import LLAMA3_8B, turn  # noqa: E402

import attnkit  # noqa: E402
from attnkit.compat import DynamicLayer, cache_argument  # noqa: E402
from attnkit.engine.plan import AttentionCall  # noqa: E402
from attnkit.methods import TidalDecode  # noqa: E402
from attnkit.methods.tidal import layer_roles, select  # noqa: E402

FULL = dict(LLAMA3_8B, max_position_embeddings=131072 + 64)
TINY = dict(
    FULL,
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=8,
    num_attention_heads=8,
    num_key_value_heads=2,
    vocab_size=1024,
)
SETUPS = {
    "gpu": dict(shape=FULL, contexts=[32768, 131072], budgets=[256, 2048, 4096]),
    "quick": dict(shape=TINY, contexts=[128, 512], budgets=[16, 32, 64]),
}


class InPlaceLayer(DynamicLayer):
    """A cache layer over preallocated key/value buffers [batch, kv heads, capacity, d]: new tokens
    are written in place and attention gets views of the filled part (no concatenation)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, filled: int):
        super().__init__()
        self.key_buffer, self.value_buffer, self.length = keys, values, filled
        self.device, self.dtype, self.is_initialized = keys.device, keys.dtype, True
        self._view()

    def _view(self) -> None:
        self.keys = self.key_buffer[:, :, : self.length]
        self.values = self.value_buffer[:, :, : self.length]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        n = key_states.shape[-2]
        self.key_buffer[:, :, self.length : self.length + n] = key_states
        self.value_buffer[:, :, self.length : self.length + n] = value_states
        self.length += n
        self._view()
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def crop(self, tokens_to_remove: int) -> None:
        self.length -= abs(tokens_to_remove)
        self._view()


def buffers(shape: dict, batch: int, capacity: int, device: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Seeded random bf16 keys and values for every layer, [batch, kv heads, capacity, head dim]."""
    heads, dim = shape["num_key_value_heads"], shape["hidden_size"] // shape["num_attention_heads"]
    gen = torch.Generator(device=device).manual_seed(0)
    out = []
    for _ in range(shape["num_hidden_layers"]):
        pair = [torch.empty(batch, heads, capacity, dim, device=device, dtype=torch.bfloat16) for _ in range(2)]
        out.append(tuple(t.normal_(generator=gen) for t in pair))
    return out


def make_cache(model, held: list, batch: int, context: int):
    """A cache of ``context`` tokens per row for the first ``batch`` rows of the buffers."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    cache.layers = [InPlaceLayer(k[:batch], v[:batch], context) for k, v in held]
    return cache


def build_model(shape: dict, device: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(LlamaConfig(**shape, attn_implementation="sdpa"))
    return model.to(torch.bfloat16).eval()


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed_ms(fn: Callable[[], Any], device: str) -> float:
    """Milliseconds of one call of ``fn`` (CUDA events on the GPU, perf_counter on the CPU)."""
    sync(device)
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end)
    began = time.perf_counter()
    fn()
    return (time.perf_counter() - began) * 1e3


def decode_block(model, cache, token: torch.Tensor, steps: int) -> Callable[[], None]:
    """``steps`` decode steps, each against the same ``context`` cached tokens (rewound after each)."""
    with_cache = cache_argument(model, cache)

    def run() -> None:
        for _ in range(steps):
            model(input_ids=token, **with_cache, use_cache=True)
            cache.crop(-1)

    return run


def tidal(budget: int, selection: str) -> list[TidalDecode]:
    return [TidalDecode(budget=budget, selection=selection)]


def measure(model, methods, cache, token, args, device: str) -> tuple[float, dict]:
    """One round of one configuration: the mean step of a timed block, and the method's stats."""
    handle = attnkit.apply(model, methods) if methods else None
    try:
        with torch.no_grad():
            decode_block(model, cache, token, args.warmup)()
            ms = timed_ms(decode_block(model, cache, token, args.steps), device) / args.steps
        stats = handle.stats(total=True)["tidaldecode"] if handle else {}
    finally:
        if handle:
            handle.remove()
    if methods and not stats.get("selections", 0) > 0:
        raise RuntimeError(f"tidaldecode did not act: {stats}")
    return ms, stats


def selection_ms(model, cache, budget: int, selection: str, device: str, reps: int) -> float:
    """The median time of one selection (full logits of a new query over a layer's cache, top-k)."""
    shape = model.config
    keys, values = cache.layers[2].keys, cache.layers[2].values
    dim = keys.shape[-1]
    gen = torch.Generator(device=device).manual_seed(1)
    query = torch.randn(keys.shape[0], shape.num_attention_heads, 1, dim, device=device, generator=gen)
    call = AttentionCall(None, 2, query.to(keys.dtype), keys, values, None, None, scaling=dim**-0.5)
    current = keys.shape[2] - 1
    times = [timed_ms(lambda: select(call, current, budget, 0, selection), device) for _ in range(reps + 1)]
    return statistics.median(times[1:])


def run_case(model, held, batch: int, context: int, configs: dict, args, device: str) -> dict:
    """Interleaved rounds of every configuration on one (context, batch) case."""
    cache = make_cache(model, held, batch, context)
    token = torch.randint(0, model.config.vocab_size, (batch, 1), device=device)
    rounds: dict[str, list[float]] = {name: [] for name in configs}
    read: dict[str, float] = {}
    for r in range(args.rounds):
        for name in turn(configs, r):
            ms, stats = measure(model, configs[name], cache, token, args, device)
            rounds[name].append(ms)
            if stats:
                read[name] = stats["read_fraction"]
    base = statistics.median(rounds["untouched"])
    rows = {}
    for name, times in rounds.items():
        step = statistics.median(times)
        rows[name] = {
            "step_ms": step,
            "rounds_ms": times,
            "spread": (max(times) - min(times)) / step,
            "tokens_per_s": batch * 1e3 / step,
            "speedup": base / step,
            "keys_read_fraction": read.get(name, 1.0),
        }
    layers = model.config.num_hidden_layers
    for name, methods in configs.items():
        if methods:
            cfg = methods[0].config
            roles = layer_roles(list(range(layers)), cfg.selection_layer, cfg.reselection_for(layers))
            selecting = sum(role == "select" for role in roles.values())
            one = selection_ms(model, cache, methods[0].config.budget, args.selection, device, args.reps)
            rows[name]["selection_ms_per_layer"] = one
            rows[name]["selection_ms_per_step"] = one * selecting
            rows[name]["selection_share_of_step"] = one * selecting / rows[name]["step_ms"]
    return rows


def goals(results: dict, contexts: list[int], batches: list[int]) -> dict:
    """The issue's goals, read off this run: throughput at the longest context and largest batch
    against the untouched model (>= 2.1x), and batch 1 at the shortest context (no slower)."""
    longest = results[f"{max(contexts)}x{max(batches)}"]
    shortest = results[f"{min(contexts)}x1"] if 1 in batches else None
    out = {
        "throughput_longest_largest_batch": {n: r["speedup"] for n, r in longest.items() if n != "untouched"},
    }
    if shortest:
        out["batch1_step_shortest_ratio"] = {n: r["step_ms"] / shortest["untouched"]["step_ms"] for n, r in shortest.items() if n != "untouched"}  # fmt: skip
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tiny model on the CPU, to smoke-test the script")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20, help="timed decode steps per round")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--reps", type=int, default=10, help="repetitions of the selection timing")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--contexts", type=int, nargs="+")
    parser.add_argument("--budgets", type=int, nargs="+")
    parser.add_argument("--selection", default="query_head", choices=["query_head", "kv_head_union", "kv_head_sum"])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    setup = SETUPS["quick" if args.quick else "gpu"]
    if args.quick:
        args.rounds, args.steps, args.warmup, args.reps = min(args.rounds, 2), min(args.steps, 3), 1, 2
        args.batches = [1, 2]
    device = "cpu" if args.quick else "cuda"
    contexts, budgets = args.contexts or setup["contexts"], args.budgets or setup["budgets"]
    model = build_model(setup["shape"], device)
    held = buffers(setup["shape"], max(args.batches), max(contexts) + args.steps + args.warmup + 1, device)
    configs = {"untouched": None, **{f"tidal_{b}": tidal(b, args.selection) for b in budgets}}
    results = {}
    for context in contexts:
        for batch in args.batches:
            began = time.perf_counter()
            results[f"{context}x{batch}"] = rows = run_case(model, held, batch, context, configs, args, device)
            print(f"context {context}, batch {batch} ({time.perf_counter() - began:.0f} s)", flush=True)
            for name, row in rows.items():
                extra = ""
                if "selection_ms_per_step" in row:
                    extra = (
                        f"  selection {row['selection_ms_per_step']:.3f} ms/step ({row['selection_share_of_step']:.1%})"
                    )
                print(
                    f"  {name:<12} {row['step_ms']:9.2f} ms/step  {row['tokens_per_s']:9.1f} tok/s  "
                    f"{row['speedup']:5.2f}x  spread {row['spread']:.1%}  keys read {row['keys_read_fraction']:.3f}{extra}",
                    flush=True,
                )
    report = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "shape": setup["shape"],
        "selection": args.selection,
        "settings": {k: getattr(args, k) for k in ("rounds", "steps", "warmup", "reps", "batches")},
        "results": results,
        "goals": goals(results, contexts, args.batches),
        "peak_memory_gb": torch.cuda.max_memory_allocated() / 1e9 if device == "cuda" else None,
    }
    print("goals:", json.dumps(report["goals"], indent=1))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
