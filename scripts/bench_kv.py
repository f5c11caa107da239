"""What does KV compression buy on a GPU? Full cache vs snapkv vs razor, one run, one process.

Llama-3-8B shape, random bf16 weights, 32K-token prompts, 256 decoded tokens. For each
configuration (the untouched model's full cache, ``snapkv`` budget 2048, ``razor`` with 15% of
the KV heads as retrieval heads, at the paper's buffer max(4000, N/5) and at max(4000, N/8); and
the untouched model again with sdpa's cuDNN backend left out, a second baseline for step time):

- KV bytes after prefill, measured from the cache tensors (and attnkit's own per-layer count);
- batch-1 prefill time and batch-1 decode step time (medians), against the untouched model of
  the same run. Configurations take turns (round-robin, a few steps each) so that drifts of the
  host, which swing a launch-bound step by +-30% over minutes, fall on every configuration alike;
  each configuration has its own model object sharing one set of weights, so every attnkit
  handle stays applied the whole run;
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
import contextlib
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

from bench_overhead import LLAMA3_8B  # noqa: E402

import attnkit  # noqa: E402
from attnkit.compat import cache_argument  # noqa: E402
from attnkit.engine.kvcache import cache_bytes, sdpa_without_cudnn  # noqa: E402
from attnkit.methods import Razor, SnapKV  # noqa: E402

TINY = dict(
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=2,
    vocab_size=1000,
    max_position_embeddings=4096,
    rope_theta=500000.0,
    rms_norm_eps=1e-5,
)


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
        "full_no_cudnn": None,
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


def twin(model, shape: dict):
    """A second model object over the same weight tensors (its own config, so its own attnkit plan)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        other = LlamaForCausalLM(LlamaConfig(**shape, attn_implementation="sdpa"))
    other.load_state_dict(model.state_dict(), assign=True)
    modules = dict(other.named_modules())
    for name, buffer in model.named_buffers():  # non-persistent buffers (rotary inv_freq, original_inv_freq)
        owner, _, attr = name.rpartition(".")
        setattr(modules[owner], attr, buffer)
    return other.eval()


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
    out = model(input_ids=ids, **cache_argument(model, cache), use_cache=True, logits_to_keep=1)
    return cache, out.logits[:, -1].argmax(-1, keepdim=True)


def decode(model, cache, token, steps: int, device: str) -> list[float]:
    """Greedy decode ``steps`` tokens from ``cache``; the time of each step in ms."""
    times, with_cache = [], cache_argument(model, cache)
    for _ in range(steps):
        ms, out = timed(lambda: model(input_ids=token, **with_cache, use_cache=True), device)  # noqa: B023 (called at once)
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


def sdpa_backends(name: str):
    """sdpa's backends for a configuration: ``*_no_cudnn`` leaves out cuDNN attention, which on an
    H100/H200 builds a new plan whenever the key length changes (every decode step)."""
    return sdpa_without_cudnn() if name.endswith("_no_cudnn") else contextlib.nullcontext()


def latency(models: dict, ids, args, device: str) -> dict:
    """Batch-1 prefill and decode-step times, the configurations taking turns."""
    rows = {name: {"prefill_ms": [], "decode_step_ms": []} for name in models}
    caches = {}
    for rep in range(args.reps):
        for name, (model, handle) in models.items():
            caches.pop(name, None)
            if device == "cuda":
                torch.cuda.empty_cache()
            with torch.no_grad(), sdpa_backends(name):
                ms, caches[name] = timed(lambda: prefill(model, ids), device)  # noqa: B023 (called at once)
            rows[name]["prefill_ms"].append(ms)
            if rep == 0:
                rows[name]["kv_bytes"] = cache_bytes(caches[name][0])
                stats = next(iter(handle.stats().values())) if handle else {}
                rows[name]["attnkit_kv_bytes"] = [stats.get("kv_bytes_before"), stats.get("kv_bytes_after")]
    for _ in range(args.rounds):
        for name, (model, _handle) in models.items():
            cache, token = caches[name]
            with torch.no_grad(), sdpa_backends(name):
                times = decode(model, cache, token, args.round_steps + 1, device)
            rows[name]["decode_step_ms"] += times[1:]  # the first step after a switch warms caches
    for name, row in rows.items():
        row["prefill_runs_ms"], row["decode_runs_ms"] = row["prefill_ms"], row["decode_step_ms"]
        row["prefill_ms"] = statistics.median(row["prefill_runs_ms"])
        row["decode_step_ms"] = statistics.median(row["decode_runs_ms"])
        log(f"{name}: prefill {row['prefill_ms']:.1f} ms, step {row['decode_step_ms']:.2f} ms")
    return rows


def throughput(model, name: str, ids, args, device: str) -> dict:
    """Capacity within the memory cap, then decode tokens/s at that batch."""
    row: dict = {}
    with torch.no_grad(), sdpa_backends(name):
        best = capacity(model, ids, args, device)
        row["capacity"] = best
        times = None
        while best and times is None:  # probes decode a few steps; the full run may need a smaller batch
            try:
                cache, token = batch_cache(model, ids, best)
                if device == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                log(f"{name}: throughput run at batch {best}")
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
        cache = token = None  # noqa: F841
    if device == "cuda":
        torch.cuda.empty_cache()
    log(f"{name}: {row}")
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="CPU smoke run: tiny model, short prompt")
    parser.add_argument("--prompt", type=int, default=32768)
    parser.add_argument("--decode", type=int, default=256)
    parser.add_argument("--snap-budget", type=int, default=2048)
    parser.add_argument("--razor-fraction", type=float, default=0.15)
    parser.add_argument("--razor-local", type=int, default=4000)
    parser.add_argument(
        "--memory-gib", type=float, default=80.0, help="cap on the process's GPU memory (an H100 80GB: all of it)"
    )
    parser.add_argument("--max-batch", type=int, default=512)
    parser.add_argument("--probe-steps", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=8, help="turns each configuration takes at batch-1 decoding")
    parser.add_argument("--round-steps", type=int, default=8, help="decode steps timed per turn")
    parser.add_argument("--reps", type=int, default=3, help="batch-1 prefills per configuration (taking turns)")
    parser.add_argument("--no-capacity", dest="capacity", action="store_false")
    parser.add_argument("--only", nargs="*", help="configurations to run (default: all)")
    parser.add_argument("--capacity-for", nargs="*", help="configurations whose capacity is searched (default: all)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.tiny:
        shape, device = TINY, "cpu"
        args.prompt, args.decode, args.snap_budget, args.razor_local = 512, 8, 64, 32
        args.max_batch, args.rounds, args.round_steps, args.reps, args.probe_steps = 4, 2, 3, 2, 2
    else:
        shape, device = LLAMA3_8B, "cuda"
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.memory_gib * 2**30 / total))
    model = build(shape, device)
    ids = torch.randint(0, shape["vocab_size"], (1, args.prompt), device=device, generator=None)
    configs = {name: m for name, m in configurations(shape, args).items() if not args.only or name in args.only}
    models = {}
    for name, methods in configs.items():
        instance = model if methods is None else twin(model, shape)
        models[name] = (instance, attnkit.apply(instance, methods) if methods else None)
    with torch.no_grad():
        for instance, _handle in models.values():  # warm-up: kernels, allocator
            prefill(instance, ids)
    results = latency(models, ids, args, device)
    if args.capacity:
        for name, (instance, _handle) in models.items():
            if not args.capacity_for or name in args.capacity_for:
                results[name].update(throughput(instance, name, ids, args, device))
    for _instance, handle in models.values():
        if handle:
            handle.remove()
    base = results.get("full")
    if base:
        for row in results.values():
            row["kv_fraction"] = row["kv_bytes"] / base["kv_bytes"]
            row["prefill_ratio"] = row["prefill_ms"] / base["prefill_ms"]
            row["decode_step_ratio"] = row["decode_step_ms"] / base["decode_step_ms"]
            if "full_no_cudnn" in results:
                row["decode_step_ratio_no_cudnn"] = row["decode_step_ms"] / results["full_no_cudnn"]["decode_step_ms"]
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
