"""Where does a PINE prefill and decode step spend its time? torch.profiler on the Llama-3-8B shape
(32 layers, bf16, sdpa), batch 1, the 8K-token 20-segment case of ``bench_pine.py``: the top ops by
CUDA time and by CPU time, and the op count, for one prefill and for 5 decode steps.
``--captured``: instead, the captured decode step's computation (``attnkit.decode``'s step over the
fixed-capacity copy of the cache, run without the graph), with the untouched model's same step
beside it, and the GPU time per step of each: what the graph replays, kernel by kernel.

``--host``: the eager decode step's host side, for the untouched model and for PINE: the wall time
of blocks of steps (after a warm-up over the same lengths), then cProfile over one block: the
functions that take the host's time (where an eager step that waits on its host spends it).

``--prefill-diff``: every op's GPU time in the untouched model's prefill and in PINE's, the largest
gaps first (where PINE's extra prefill time goes, kernel by kernel).

    python scripts/profile_pine.py [--tokens 8192 --segments 20] [--captured | --prefill-diff | --host]
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import pstats
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_pine import DECODE_BLOCK, LLAMA3_8B, build_model, decoder, make_case  # noqa: E402

import attnkit  # noqa: E402
from attnkit.compat import cache_argument  # noqa: E402
from attnkit.decode import graph_copy, graph_step  # noqa: E402
from attnkit.methods import Pine  # noqa: E402


def report(prof, title: str) -> None:
    events = prof.key_averages()
    print(f"\n== {title}: {sum(e.count for e in events)} ops", flush=True)
    print(events.table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=60), flush=True)
    print(events.table(sort_by="cpu_time_total", row_limit=15, max_name_column_width=60), flush=True)


def prefill_times(model, ids: torch.Tensor, methods: list) -> dict[str, tuple[float, int]]:
    """GPU microseconds and calls of every op (and kernel) of one prefill, after two warm-ups."""
    with torch.no_grad(), attnkit.apply(model, methods):
        for _ in range(2):
            model(input_ids=ids, use_cache=False, logits_to_keep=1)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            model(input_ids=ids, use_cache=False, logits_to_keep=1)
            torch.cuda.synchronize()
    return {e.key: (e.self_device_time_total, e.count) for e in prof.key_averages() if e.self_device_time_total > 0}


def show_diff(base: dict, other: dict, name: str) -> None:
    """Each op's GPU time in both prefills, the largest gaps first, and the totals."""
    total_base = sum(t for t, _ in base.values()) / 1e3
    total_other = sum(t for t, _ in other.values()) / 1e3
    print(f"\n== prefill {name}: GPU time untouched {total_base:.1f} ms, pine {total_other:.1f} ms", flush=True)
    rows = sorted(set(base) | set(other), key=lambda k: other.get(k, (0, 0))[0] - base.get(k, (0, 0))[0], reverse=True)
    print(f"{'ms untouched':>13} {'calls':>6} {'ms pine':>9} {'calls':>6} {'gap ms':>8}  op", flush=True)
    for key in rows[:45]:
        (b, bn), (o, on) = base.get(key, (0, 0)), other.get(key, (0, 0))
        print(f"{b / 1e3:13.2f} {bn:6d} {o / 1e3:9.2f} {on:6d} {(o - b) / 1e3:8.2f}  {key[:90]}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--segments", type=int, default=20)
    parser.add_argument("--captured", action="store_true", help="the captured step's computation, PINE and untouched")
    parser.add_argument(
        "--prefill-diff", action="store_true", help="GPU time per op of the untouched and the PINE prefill, and the gap"
    )
    parser.add_argument("--host", action="store_true", help="cProfile of eager decode steps, untouched and PINE")
    args = parser.parse_args()
    case = make_case(args.tokens, args.segments)
    model = build_model(LLAMA3_8B, "cuda")
    ids = torch.randint(10, LLAMA3_8B["vocab_size"], (1, case.tokens), device="cuda", generator=None)
    if args.captured:
        for methods in ([], [Pine()]):
            captured_step(model, ids, methods, case)
        return
    if args.host:
        for methods in ([], [Pine()]):
            host_profile(model, ids, methods, case)
        return
    if args.prefill_diff:
        untouched = prefill_times(model, ids, [])
        pine = Pine()
        with pine.segments(case.segment_ids("cuda")):
            mine = prefill_times(model, ids, [pine])
        show_diff(untouched, mine, case.name)
        return
    pine = Pine()
    from transformers import DynamicCache

    with torch.no_grad(), attnkit.apply(model, [pine]), pine.segments(case.segment_ids("cuda")):
        for _ in range(2):  # warm-up
            model(input_ids=ids, use_cache=False, logits_to_keep=1)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            model(input_ids=ids, use_cache=False, logits_to_keep=1)
            torch.cuda.synchronize()
        report(prof, f"prefill {case.name}")
        cache = DynamicCache()
        out = model(input_ids=ids, **cache_argument(model, cache), use_cache=True, logits_to_keep=1)
        token = out.logits[:, -1:].argmax(-1)
        for _ in range(3):
            model(input_ids=token, **cache_argument(model, cache), use_cache=True)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                model(input_ids=token, **cache_argument(model, cache), use_cache=True)
            torch.cuda.synchronize()
        report(prof, "5 decode steps")


def captured_step(model, ids: torch.Tensor, methods: list, case) -> None:
    """Profile 5 runs of the captured decode step's computation (no graph) with ``methods`` applied."""
    from transformers import DynamicCache

    name = "pine" if methods else "untouched"
    with torch.no_grad(), attnkit.apply(model, methods) as handle:
        segments = methods[0].segments(case.segment_ids(ids.device)) if methods else contextlib.nullcontext()
        with segments:
            cache = DynamicCache()
            model(input_ids=ids, **cache_argument(model, cache), use_cache=True, logits_to_keep=1)
            graphed = graph_copy(handle, cache, 16, None)
            forward, _ = graph_step(model, graphed)
            for _ in range(3):
                forward()
            sync(ids.device)
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for _ in range(5):
                    forward()
                sync(ids.device)
    kernels = [e for e in prof.events() if e.device_type.name == "CUDA"]
    busy = sum(e.device_time for e in kernels) / 1e3 / 5
    print(f"\n== captured step's computation, {name}: {len(kernels) / 5:.0f} kernels, {busy:.2f} ms GPU per step")
    report(prof, f"captured step, {name}")


def host_profile(model, ids: torch.Tensor, methods: list, case, rounds: int = 3) -> None:
    """The wall time of ``DECODE_BLOCK`` eager decode steps (after a warm-up over the same lengths,
    so Triton compiles nothing in them), then cProfile of one more block: the top functions."""
    name = "pine" if methods else "untouched"
    with torch.no_grad(), attnkit.apply(model, methods):
        segments = methods[0].segments(case.segment_ids(ids.device)) if methods else contextlib.nullcontext()
        with segments:
            steps, rewind = decoder(model, ids)
            walls = []
            for _ in range(rounds + 1):  # the first: warm-up
                start = time.perf_counter()
                steps()
                sync(ids.device)
                walls.append((time.perf_counter() - start) * 1e3 / DECODE_BLOCK)
                rewind()
            profiler = cProfile.Profile()
            profiler.enable()
            steps()
            sync(ids.device)
            profiler.disable()
            rewind()
    print(f"\n== eager decode step, {name}: ms a step by block {' '.join(f'{w:.2f}' for w in walls[1:])}", flush=True)
    stats = pstats.Stats(profiler)
    calls, seconds = stats.total_calls / DECODE_BLOCK, stats.total_tt / DECODE_BLOCK
    print(f"cProfile: {calls:.0f} calls, {seconds * 1e3:.2f} ms a step", flush=True)
    stats.sort_stats("tottime").print_stats(35)
    stats.sort_stats("cumulative").print_stats(50)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


if __name__ == "__main__":
    main()
