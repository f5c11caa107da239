"""What does KV compression buy on a GPU? Full cache vs snapkv vs razor, one run, one process.

Llama-3-8B shape, random bf16 weights, 32K-token prompts, 256 decoded tokens. For each
configuration (the untouched model's full cache, ``snapkv`` budget 2048, ``razor`` with 15% of
the KV heads as retrieval heads, at the paper's buffer max(4000, N/5) and at max(4000, N/8)):

- KV bytes after prefill, measured from the cache tensors (and attnkit's own per-layer count);
- batch-1 prefill time and batch-1 decode step time (CUDA events, medians), against the untouched
  model of the same run;
- capacity: the largest batch of 32K-token sequences whose cache fits and decodes 256 tokens with
  the process capped at 80 GB (an H100's memory; `torch.cuda.set_per_process_memory_fraction`);
- throughput: decode tokens/s summed over the batch, at that largest batch, 256 steps.

Sequences are prefilled one at a time (batch 1, a 32K prefill does not need a batch) and the
batch's cache is made by repeating the compressed single-sequence cache along the batch dimension
(``cache.batch_repeat_interleave``): the bytes held and the decode work are those of a batch of
distinct sequences, without paying for hundreds of identical 32K prefills. Random weights have
no real retrieval heads, so razor's heads are a seeded random 15% of the KV heads: only their
count matters for memory and speed.

    python scripts/bench_kv.py [--json out.json]          # on the GPU
    python scripts/bench_kv.py --tiny                      # a CPU smoke run of the whole script
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # the cache grows by torch.cat

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import attnkit  # noqa: E402
from attnkit.kvcache import cache_bytes  # noqa: E402
from attnkit.methods import Razor, SnapKV  # noqa: E402
from bench_overhead import LLAMA3_8B  # noqa: E402

TINY = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
            vocab_size=1000, max_position_embeddings=4096, rope_theta=500000.0, rms_norm_eps=1e-5)


def retrieval_heads(shape: dict, fraction: float, seed: int = 0) -> dict[int, list[int]]:
    """A seeded random ``fraction`` of all KV heads, as {layer: [kv heads]}."""
    layers, kv = shape["num_hidden_layers"], shape["num_key_value_heads"]
    pairs = [(layer, head) for layer in range(layers) for head in range(kv)]
    chosen = random.Random(seed).sample(pairs, round(fraction * len(pairs)))
    out: dict[int, list[int]] = {}
    for layer, head in sorted(chosen):
        out.setdefault(layer, []).append(head)
    return out


def configurations(shape: dict, args) -> dict:
    heads = retrieval_heads(shape, args.razor_fraction)
    return {
        "full": None,
        "snapkv": [SnapKV(budget=args.snap_budget)],
        "razor_C5": [Razor(heads=heads, local=args.razor_local, ratio=5.0)],
        "razor_C8": [Razor(heads=heads, local=args.razor_local, ratio=8.0)],
    }


def build(shape: dict, device: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(LlamaConfig(**shape, attn_implementation="sdpa"))
    return model.to(torch.bfloat16).eval()


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: str) -> tuple[float, object]:
    """(milliseconds, result) of one call."""
    sync(device)
    start = time.perf_counter()
    result = fn()
    sync(device)
    return (time.perf_counter() - start) * 1e3, result


def prefill(model, ids):
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    return cache, out.logits[:, -1].argmax(-1, keepdim=True)


def decode(model, cache, token, steps: int, device: str) -> list[float]:
    """Greedy decode ``steps`` tokens from ``cache``; the time of each step in ms."""
    times = []
    for _ in range(steps):
        ms, out = timed(lambda: model(input_ids=token, past_key_values=cache, use_cache=True), device)
        token = out.logits[:, -1:].argmax(-1)
        times.append(ms)
    return times


def batch_cache(model, ids, batch: int):
    """The cache of ``batch`` 32K sequences: one prefill, repeated along the batch."""
    cache, token = prefill(model, ids)
    if batch > 1:
        cache.batch_repeat_interleave(batch)
        token = token.repeat_interleave(batch, dim=0)
    return cache, token


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def fits(model, ids, batch: int, steps: int, device: str) -> bool:
    log(f"probe batch {batch}")
    try:
        cache, token = batch_cache(model, ids, batch)
        decode(model, cache, token, steps, device)
        return True
    except torch.OutOfMemoryError:
        return False
    finally:
        cache = token = None  # noqa: F841
        if device == "cuda":
            torch.cuda.empty_cache()


def capacity(model, ids, args, device: str) -> int:
    """Largest batch that fits and decodes (doubling, then bisection; probes decode 16 steps)."""
    low, high = 0, 1
    while high <= args.max_batch and fits(model, ids, high, args.probe_steps, device):
        low, high = high, high * 2
    high = min(high, args.max_batch + 1)
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if fits(model, ids, mid, args.probe_steps, device) else (low, mid)
    return low


def measure(model, name: str, methods, ids, args, device: str) -> dict:
    handle = None if methods is None else attnkit.apply(model, methods)
    try:
        with torch.no_grad():
            prefill_ms = []
            for _ in range(args.reps):
                if device == "cuda":
                    torch.cuda.empty_cache()
                ms, (cache, token) = timed(lambda: prefill(model, ids), device)
                prefill_ms.append(ms)
            kv_bytes = cache_bytes(cache)
            stats = handle.stats()[methods[0].name] if handle else {}
            step_ms = decode(model, cache, token, args.timing_steps, device)[2:]
            cache = token = None
            row = {
                "prefill_ms": statistics.median(prefill_ms),
                "decode_step_ms": statistics.median(step_ms),
                "kv_bytes": kv_bytes,
                "attnkit_kv_bytes": [stats.get("kv_bytes_before"), stats.get("kv_bytes_after")],
            }
            log(f"{name}: {row}")
            if args.capacity and (not args.capacity_for or name in args.capacity_for):
                best = capacity(model, ids, args, device)
                row["capacity"] = best
                times = None
                while best and times is None:  # probes decode 16 steps; the full run may need a smaller batch
                    try:
                        cache, token = batch_cache(model, ids, best)
                        if device == "cuda":
                            torch.cuda.reset_peak_memory_stats()
                        log(f"throughput run at batch {best}")
                        times = decode(model, cache, token, args.decode, device)
                    except torch.OutOfMemoryError:
                        cache = token = None
                        torch.cuda.empty_cache()
                        row.setdefault("probe_capacity", best)
                        best -= max(1, best // 16)
                row["capacity"] = best
                if times:
                    row["throughput_tok_s"] = best * len(times) / (sum(times) / 1e3)
                    row["batch_step_ms"] = statistics.median(times)
                    if device == "cuda":
                        row["peak_gb_at_capacity"] = torch.cuda.max_memory_allocated() / 1e9
                    cache = token = None
            print(name, json.dumps(row), flush=True)
            return row
    finally:
        if handle:
            handle.remove()
        if device == "cuda":
            torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="CPU smoke run: tiny model, short prompt")
    parser.add_argument("--prompt", type=int, default=32768)
    parser.add_argument("--decode", type=int, default=256)
    parser.add_argument("--snap-budget", type=int, default=2048)
    parser.add_argument("--razor-fraction", type=float, default=0.15)
    parser.add_argument("--razor-local", type=int, default=4000)
    parser.add_argument("--memory-gib", type=float, default=80.0, help="cap on the process's GPU memory (an H100 80GB: all of it)")
    parser.add_argument("--max-batch", type=int, default=512)
    parser.add_argument("--probe-steps", type=int, default=16)
    parser.add_argument("--timing-steps", type=int, default=34)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--no-capacity", dest="capacity", action="store_false")
    parser.add_argument("--only", nargs="*", help="configurations to run (default: all)")
    parser.add_argument("--capacity-for", nargs="*", help="configurations whose capacity is searched (default: all)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.tiny:
        shape, device = TINY, "cpu"
        args.prompt, args.decode, args.snap_budget, args.razor_local = 512, 8, 64, 32
        args.max_batch, args.timing_steps, args.reps, args.probe_steps = 4, 6, 1, 2
    else:
        shape, device = LLAMA3_8B, "cuda"
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.memory_gib * 2**30 / total))
    model = build(shape, device)
    ids = torch.randint(0, shape["vocab_size"], (1, args.prompt), device=device, generator=None)
    configs = configurations(shape, args)
    with torch.no_grad():
        prefill(model, ids)  # warm-up: kernels, allocator
    results = {}
    for name, methods in configs.items():
        if args.only and name not in args.only:
            continue
        results[name] = measure(model, name, methods, ids, args, device)
    base = results.get("full")
    if base:
        for name, row in results.items():
            row["kv_fraction"] = row["kv_bytes"] / base["kv_bytes"]
            row["prefill_ratio"] = row["prefill_ms"] / base["prefill_ms"]
            row["decode_step_ratio"] = row["decode_step_ms"] / base["decode_step_ms"]
            if base.get("capacity") and row.get("capacity") is not None:
                row["capacity_ratio"] = row["capacity"] / base["capacity"]
                row["throughput_ratio"] = row["throughput_tok_s"] / base["throughput_tok_s"]
    meta = {
        "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "args": {k: str(v) for k, v in vars(args).items()},
        "retrieval_kv_heads": sum(map(len, retrieval_heads(shape, args.razor_fraction).values())),
    }
    print(json.dumps({"meta": meta, "results": results}, indent=1))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"meta": meta, "results": results}, indent=1))


if __name__ == "__main__":
    main()
