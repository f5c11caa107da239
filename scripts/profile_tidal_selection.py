"""Where does a captured TidalDecode step's selection time go? Each part of
``attnkit.methods.tidal.select_captured`` timed alone on one layer's tensors (Llama-3-8B shape:
32 query / 8 KV heads of 128, bf16), over a cache of ``--context`` tokens at ``--batch``, beside one
decode-kernel read of the whole cache (what a full layer costs) and one gathered read. Each part
is captured in a CUDA graph and replayed, as inside a captured decode step.

    python scripts/profile_tidal_selection.py [--context 131072] [--batch 4] [--budget 2048]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from attnkit.engine.graphs import GraphCache, GraphLayer, graph_inputs  # noqa: E402
from attnkit.engine.plan import AttentionCall  # noqa: E402
from attnkit.kernels import decode_attention  # noqa: E402
from attnkit.methods.tidal import select_captured  # noqa: E402


def timed(fn, reps: int = 20) -> float:
    """Median milliseconds of ``fn`` captured in a CUDA graph and replayed (as in a captured decode
    step: no host launch overhead), CUDA events, after a warm-up call."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def whole_step(context: int, batch: int, budget: int) -> None:
    """The kernels of one whole decode step on the GPU, untouched and with TidalDecode, through the
    captured step's computation run eagerly (the same kernels a replay runs), by CUDA time."""
    from torch.profiler import ProfilerActivity, profile

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_tidal import FULL, buffers, build_model

    import attnkit
    from attnkit.decode import graph_step
    from attnkit.methods import TidalDecode

    model = build_model(FULL, "cuda")
    held = buffers(FULL, batch, context + 16, "cuda")
    for name, methods in (("untouched", []), ("tidaldecode", [TidalDecode(budget=budget)])):
        inputs = graph_inputs(batch, context, None, "cuda")
        graphed = GraphCache([GraphLayer(k, v, context, context, inputs) for k, v in held], inputs)
        forward, _ = graph_step(model, graphed)
        with attnkit.apply(model, methods), torch.no_grad():
            forward()
            inputs.advance(-1)
            graphed.move(-1)
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                forward()
                torch.cuda.synchronize()
        kernels: dict[str, list[float]] = {}
        for event in prof.events():
            if event.device_type.name == "CUDA":
                kernels.setdefault(event.name[:70], []).append(event.device_time / 1e3)
        total = sum(sum(t) for t in kernels.values())
        count = sum(len(t) for t in kernels.values())
        print(f"{name}: {count} kernels, {total:.2f} ms of GPU time in one step")
        for kernel, times in sorted(kernels.items(), key=lambda kv: -sum(kv[1]))[:12]:
            print(f"  {sum(times):7.3f} ms  {len(times):4d}x  {kernel}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=131072)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--budget", type=int, default=2048)
    parser.add_argument("--step", action="store_true", help="profile one whole decode step (builds the model)")
    args = parser.parse_args()
    if args.step:
        whole_step(args.context, args.batch, args.budget)
        return
    b, heads, kv, d, n = args.batch, 32, 8, 128, args.context
    gen = torch.Generator(device="cuda").manual_seed(0)
    keys = torch.randn(b, kv, n + 16, d, device="cuda", dtype=torch.bfloat16, generator=gen)
    values = torch.randn_like(keys)
    query = torch.randn(b, heads, 1, d, device="cuda", dtype=torch.bfloat16, generator=gen)
    inputs = graph_inputs(b, n - 1, None, "cuda")
    layer = GraphLayer(keys, values, n - 1, n - 1, inputs)
    state = SimpleNamespace(graph=GraphCache([layer], inputs))
    call = AttentionCall(None, 0, query, keys, values, None, state, scaling=d**-0.5)
    folded = query.reshape(b, kv, heads // kv, d)
    logits = call.logits(folded, keys)
    parts = {
        "whole selection (select_captured)": lambda: select_captured(call, args.budget, 0, "query_head"),
        "whole selection, kv_head_union": lambda: select_captured(call, args.budget, 0, "kv_head_union"),
        "whole selection, kv_head_sum": lambda: select_captured(call, args.budget, 0, "kv_head_sum"),
        "logits q.K over the cache": lambda: call.logits(folded, keys),
        "masked_fill of the logits": lambda: logits.masked_fill(logits > 1e9, float("-inf")),
        "topk(budget - 1)": lambda: logits.topk(args.budget - 1, dim=-1),
        "decode kernel, whole cache": lambda: decode_attention(query, keys, values, layer.filled(), d**-0.5),
    }
    index = select_captured(call, args.budget, 0, "query_head")
    parts["decode kernel, gathered budget"] = lambda: decode_attention(
        query, keys, values, layer.filled(), d**-0.5, index=index
    )
    print(f"context {n}, batch {b}, budget {args.budget} (one layer, ms)")
    for name, fn in parts.items():
        print(f"  {name:<36} {timed(fn):8.3f}")


if __name__ == "__main__":
    main()
