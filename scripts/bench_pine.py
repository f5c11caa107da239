"""What does PINE cost against the untouched model? Untouched sdpa vs Pine vs eager attention everywhere.

Llama-3-8B shape, random bf16 weights, sdpa, one GPU, batch 1, random token ids (seeded). Two cases:
``4k_2seg`` (4096 tokens: a 64-token prefix, 2 segments of equal length, a 64-token suffix) and
``8k_20seg`` (8192 tokens: prefix 64, 20 segments of equal length with the remainder spread over
the first ones, suffix 64). Three configurations per case: ``untouched`` (no attnkit), ``pine``
(attnkit with ``Pine`` and the case's segment ids) and ``eager_anchor`` (the untouched model with
eager attention, the shape of work of PINE's reference code, which runs eager attention everywhere).

Measured per case and configuration: the prefill (last-position logits only), one decode step after
it (a block of ``DECODE_BLOCK`` steps on the prefill's DynamicCache, reported per step; the cache is
cropped back to the prompt between repetitions) and the peak GPU memory of the prefill (from a reset;
also the part above what was allocated before it). The configurations are timed in interleaved
rounds in one process, the order rotated one place each round, so drift hits them alike; each time is
the median over rounds of the median over repetitions (CUDA events). Ratios are against the
untouched model of the same run. On a GPU two more configurations decode through captured decoding
(``attnkit.decode``: the step replayed from a CUDA graph over a fixed-capacity copy of the prefill's
cache): ``untouched_captured`` (an empty recipe) and ``pine_captured``.

    python scripts/bench_pine.py [--rounds 3] [--reps 3] [--segments 2 20] [--json out.json]
    python scripts/bench_pine.py --tiny --rounds 1 --reps 1   # 2-layer model, 256/512 tokens, runs on CPU
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_overhead import LLAMA3_8B, turn  # noqa: E402

import attnkit  # noqa: E402
from attnkit import compat  # noqa: E402
from attnkit.compat import cache_argument  # noqa: E402
from attnkit.decode import Replay, graph_copy, graph_step  # noqa: E402
from attnkit.methods import Pine  # noqa: E402

TINY = dict(
    LLAMA3_8B,
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=2,
    num_attention_heads=8,
    num_key_value_heads=2,
    vocab_size=1024,
)
CONFIGS = ("untouched", "pine", "eager_anchor", "untouched_captured", "pine_captured")
CASES = ((4096, 2), (8192, 20))
"""(tokens, segments) of each case; ``--tiny`` runs 256 and 512 tokens instead."""
TINY_TOKENS = (256, 512)
PREFIX = SUFFIX = 64
DECODE_BLOCK = 20
METRICS = ("prefill_ms", "decode_ms", "peak_gb", "extra_gb")


@dataclass
class Case:
    name: str
    tokens: int
    prefix: int
    segments: list[int]
    """Each segment's length, in prompt order."""
    suffix: int

    def segment_ids(self, device: str) -> torch.Tensor:
        """long [1, tokens]: 0 in the prefix and suffix, 1..k over the segments."""
        parts = [torch.zeros(self.prefix, dtype=torch.long)]
        parts += [torch.full((n,), i, dtype=torch.long) for i, n in enumerate(self.segments, start=1)]
        parts.append(torch.zeros(self.suffix, dtype=torch.long))
        return torch.cat(parts)[None].to(device)


def make_case(tokens: int, count: int) -> Case:
    """``count`` segments of equal length between the prefix and suffix, the remainder spread over the first ones."""
    each, extra = divmod(tokens - PREFIX - SUFFIX, count)
    name = f"{tokens // 1024}k" if tokens % 1024 == 0 else str(tokens)
    return Case(f"{name}_{count}seg", tokens, PREFIX, [each + (i < extra) for i in range(count)], SUFFIX)


def build_model(shape: dict, device: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**shape, attn_implementation="sdpa")
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    return model


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_fn(fn: Callable[[], Any], reps: int, device: str, reset: Callable[[], None] | None = None) -> float:
    """Median milliseconds of ``fn`` over ``reps`` runs (CUDA events; perf_counter on CPU); ``reset``
    runs before each, untimed."""
    times = []
    for _ in range(reps):
        if reset:
            reset()
        synchronize(device)
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


@contextmanager
def configured(model, name: str, segment_ids: torch.Tensor) -> Iterator[Any]:
    """The model as configuration ``name`` runs it; yields the attnkit handle (None without attnkit)."""
    if name == "untouched_captured":
        with attnkit.apply(model, []) as handle:
            yield handle
    elif name.startswith("pine"):
        pine = Pine()
        with attnkit.apply(model, [pine]) as handle, pine.segments(segment_ids):
            yield handle
    elif name == "eager_anchor":
        compat.set_attn_implementation(model, model.config, "eager")
        try:
            yield None
        finally:
            compat.set_attn_implementation(model, model.config, "sdpa")
    else:
        yield None


def prefill_peak(model, ids: torch.Tensor, device: str) -> tuple[float, float]:
    """(peak GB, peak GB above what was allocated before) of one prefill; zeros on CPU. Warms it up too."""
    if device != "cuda":
        model(input_ids=ids, use_cache=False, logits_to_keep=1)
        return 0.0, 0.0
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    model(input_ids=ids, use_cache=False, logits_to_keep=1)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    return peak / 1e9, (peak - before) / 1e9


def decoder(model, ids: torch.Tensor, captured: bool = False) -> tuple[Callable[[], None], Callable[[], None]]:
    """(``DECODE_BLOCK`` decode steps after a prefill of ``ids``, the rewind to the prefill: the
    cache cropped back to the prompt; attnkit cuts what it keeps beside the cache alike).
    ``captured``: the steps replayed from one CUDA graph, as ``attnkit.captured_decoding`` runs them."""
    from transformers import DynamicCache

    cache = DynamicCache()
    out = model(input_ids=ids, **cache_argument(model, cache), use_cache=True, logits_to_keep=1)
    token = out.logits[:, -1:].argmax(-1)
    if captured:
        return replayed(model, cache, token)
    length = cache.get_seq_length()
    with_cache = cache_argument(model, cache)

    def steps() -> None:
        for _ in range(DECODE_BLOCK):
            model(input_ids=token, **with_cache, use_cache=True)

    def rewind() -> None:
        grown = cache.get_seq_length() - length
        if grown:  # negative: tokens to remove (5.24 refuses a positive length; 5.17 took both)
            cache.crop(-grown)

    return steps, rewind


def replayed(model, cache, token: torch.Tensor) -> tuple[Callable[[], None], Callable[[], None]]:
    """``DECODE_BLOCK`` replays of one captured decode step over a copy of ``cache`` with room for
    them (the warm-up and capture included), and the rewind to the prompt."""
    handle = attnkit.handle.active_handle(model)
    graphed = graph_copy(handle, cache, DECODE_BLOCK + 4, None)
    forward, _ = graph_step(model, graphed)
    replay = Replay(forward, graphed, handle)
    if handle.unreplayable:
        raise RuntimeError(f"not replayable: {handle.unreplayable}")

    def steps() -> None:
        for _ in range(DECODE_BLOCK):
            replay(token[:, 0])

    return steps, lambda: replay.rewind(DECODE_BLOCK)


def measure(model, name: str, ids: torch.Tensor, segment_ids: torch.Tensor, reps: int, device: str) -> dict:
    """Prefill ms, decode ms per step and prefill peak memory of configuration ``name``; {'oom': True} if it does not fit."""
    try:
        with torch.no_grad(), configured(model, name, segment_ids) as handle:
            peak, extra = prefill_peak(model, ids, device)
            prefill_ms = time_fn(lambda: model(input_ids=ids, use_cache=False, logits_to_keep=1), reps, device)
            steps, rewind = decoder(model, ids, captured=name.endswith("captured"))
            steps()  # warm-up
            decode_ms = time_fn(steps, reps, device, reset=rewind) / DECODE_BLOCK
            stats = handle.stats(total=True)["pine"] if name.startswith("pine") else None
        if stats is not None:
            assert stats.get("segments", 0) > 0 and stats.get("reordered_queries", 0) > 0, f"pine did not fire: {stats}"
        return {"prefill_ms": prefill_ms, "decode_ms": decode_ms, "peak_gb": peak, "extra_gb": extra, "stats": stats}
    except torch.OutOfMemoryError:
        return {"oom": True}
    finally:
        if device == "cuda":
            torch.cuda.empty_cache()


def run_case(model, case: Case, shape: dict, args, device: str) -> dict[str, list[dict]]:
    """Every configuration's result in every round, interleaved, the order rotated one place each round."""
    gen = torch.Generator(device=device).manual_seed(1)
    ids = torch.randint(10, shape["vocab_size"], (1, case.tokens), device=device, generator=gen)
    segment_ids = case.segment_ids(device)
    configs = [name for name in CONFIGS if device == "cuda" or not name.endswith("captured")]  # graphs: CUDA only
    configs = [name for name in configs if name == "untouched" or not args.configs or name in args.configs]
    per: dict[str, list[dict]] = {name: [] for name in configs}
    for r in range(args.rounds):
        started = time.perf_counter()
        for name in turn(configs, r):
            if per[name] and per[name][-1].get("oom"):
                continue
            per[name].append(measure(model, name, ids, segment_ids, args.reps, device))
            result = per[name][-1]
            cell = "OOM" if result.get("oom") else f"prefill {result['prefill_ms']:.1f} ms"
            print(f"  {case.name} round {r + 1}/{args.rounds} {name}: {cell}", flush=True)
        print(f"{case.name}: round {r + 1}/{args.rounds} done in {time.perf_counter() - started:.1f} s", flush=True)
    return per


def summarize(per: dict[str, list[dict]]) -> dict:
    """Medians over rounds, ratios against the untouched model, and its round-to-round spread."""
    medians = {}
    for name, runs in per.items():
        if not runs or any(x.get("oom") for x in runs):
            medians[name] = None
            continue
        medians[name] = {m: statistics.median(x[m] for x in runs) for m in METRICS}
    base = medians["untouched"]
    ratio = {
        name: {m: (v[m] / base[m] if base[m] else None) for m in METRICS} if v else None for name, v in medians.items()
    }
    spread = {
        m: (max(vals) - min(vals)) / statistics.median(vals) if statistics.median(vals) else 0.0
        for m in ("prefill_ms", "decode_ms")
        for vals in [[x[m] for x in per["untouched"]]]
    }
    return {"median": medians, "ratio": ratio, "untouched_spread": spread}


def print_table(case: Case, summary: dict) -> None:
    print(
        f"\n{case.name}: {case.tokens} tokens = prefix {case.prefix} + segments {case.segments} + suffix {case.suffix}"
    )
    header = ["prefill ms", "decode ms/step", "peak GB", "peak above start GB"]
    print(f"{'config':<20}" + "".join(f"{h:>26}" for h in header))
    for name in summary["median"]:
        med, ratio = summary["median"][name], summary["ratio"][name]
        if med is None:
            print(f"{name:<20}{'OOM':>26}")
            continue
        cells = "".join(
            f"{med[m]:>16.2f} {ratio[m]:>7.3f}x" if ratio[m] is not None else f"{med[m]:>16.2f} {'-':>8}"
            for m in METRICS
        )
        print(f"{name:<20}{cells}")
    spread = {k: round(v, 4) for k, v in summary["untouched_spread"].items()}
    print("untouched round-to-round spread (max-min)/median:", spread)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--configs", nargs="+", choices=CONFIGS, help="a subset (untouched is always run)")
    parser.add_argument("--tiny", action="store_true", help="2-layer small Llama, 256 and 512 tokens (CPU smoke test)")
    parser.add_argument(
        "--segments", type=int, nargs="+", choices=[count for _, count in CASES], help="only these cases"
    )
    args = parser.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    shape = TINY if args.tiny else LLAMA3_8B
    tokens = TINY_TOKENS if args.tiny else [n for n, _ in CASES]
    cases = [make_case(n, count) for n, (_, count) in zip(tokens, CASES) if count in (args.segments or [count])]
    model = build_model(shape, device)
    result: dict = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "torch": torch.__version__,
        "transformers": compat.version(),
        "tiny": args.tiny,
        "model": shape,
        "decode_block": DECODE_BLOCK,
        "rounds_run": args.rounds,
        "reps": args.reps,
        "cases": {},
    }
    for case in cases:
        per = run_case(model, case, shape, args, device)
        result["cases"][case.name] = {"shape": asdict(case), "rounds": per, **summarize(per)}
        if args.json:
            args.json.write_text(json.dumps(result, indent=1))
    print(f"\ndevice: {result['device']}  torch {result['torch']}  transformers {result['transformers']}")
    for case in cases:
        print_table(case, result["cases"][case.name])


if __name__ == "__main__":
    main()
