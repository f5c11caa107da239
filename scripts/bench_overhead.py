"""What does routing attention through attnkit cost? Untouched vs identity recipe vs head_mask.

Llama-3-8B shape, random bf16 weights, sdpa, one GPU. Prefill at 4K and 16K tokens (last-position
logits only) and decode steps at a 4K context (timed in blocks of 50, reported per step). The three configurations are timed in
interleaved rounds in one process, so drift hits them alike; each number is the median over rounds
of the median over repetitions (CUDA events). Ratios are against the untouched model of the same run.

    python scripts/bench_overhead.py [--rounds 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import attnkit  # noqa: E402
from attnkit.compat import cache_argument  # noqa: E402
from attnkit.methods import HeadMask  # noqa: E402

LLAMA3_8B = dict(
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    vocab_size=128256,
    max_position_embeddings=32768,
    rope_theta=500000.0,
    rms_norm_eps=1e-5,
)
CONFIGS = {
    "untouched": None,
    "identity": [],
    "head_mask_4": [HeadMask(heads={8: [0, 1], 24: [2, 3]}, scale=0.0)],
}


def build_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**LLAMA3_8B, attn_implementation="sdpa")
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    return model


def turn(names, r: int) -> list:
    """Round ``r``'s order of ``names``: rotated one place each round, so that every configuration
    takes every place equally often. (Alternating forward and reversed left the middle one always
    right after another configuration, while the ends ran twice in a row at round boundaries.)"""
    names = list(names)
    shift = r % len(names)
    return names[shift:] + names[:shift]


def time_fn(fn, reps: int) -> float:
    """Median milliseconds of ``fn`` over ``reps`` runs, CUDA events."""
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def prefill(model, ids):
    return lambda: model(input_ids=ids, use_cache=False, logits_to_keep=1)


DECODE_BLOCK = 50


def decode_steps(model, context: int):
    """``DECODE_BLOCK`` decode steps, each against a ``context``-token cache (cropped back after each)."""
    from transformers import DynamicCache

    ids = torch.randint(0, LLAMA3_8B["vocab_size"], (1, context), device="cuda")
    cache = DynamicCache()
    model(input_ids=ids, **cache_argument(model, cache), use_cache=True, logits_to_keep=1)
    token = ids[:, -1:]

    with_cache = cache_argument(model, cache)

    def steps():
        for _ in range(DECODE_BLOCK):
            model(input_ids=token, **with_cache, use_cache=True)
            cache.crop(-1)

    return steps


def measure(model, name, methods, workloads, reps):
    handle = None if methods is None else attnkit.apply(model, methods)
    try:
        with torch.no_grad():
            out = {}
            for label, make, n in workloads:
                fn = make()
                fn()  # warm-up
                torch.cuda.synchronize()
                out[label] = time_fn(fn, reps) / (n or 1)
            stats = handle.stats(total=True) if handle else {}
    finally:
        if handle:
            handle.remove()
    if name == "head_mask_4":
        assert stats["head_mask"]["head_outputs_scaled"] > 0, "head_mask did not fire"
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    model = build_model()
    gen = torch.Generator(device="cuda").manual_seed(1)
    ids = {n: torch.randint(0, LLAMA3_8B["vocab_size"], (1, n), device="cuda", generator=gen) for n in (4096, 16384)}
    workloads = [
        ("prefill_4k", lambda: prefill(model, ids[4096]), None),
        ("prefill_16k", lambda: prefill(model, ids[16384]), None),
        ("decode_4k", lambda: decode_steps(model, 4096), DECODE_BLOCK),
    ]
    rounds: dict[str, dict[str, list[float]]] = {name: {} for name in CONFIGS}
    for r in range(args.rounds):
        for name in turn(CONFIGS, r):
            for label, ms in measure(model, name, CONFIGS[name], workloads, args.reps).items():
                rounds[name].setdefault(label, []).append(ms)
        print(f"round {r + 1}/{args.rounds} done", flush=True)

    medians = {name: {k: statistics.median(v) for k, v in per.items()} for name, per in rounds.items()}
    result = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "rounds": rounds,
        "median_ms": medians,
        "ratio": {name: {k: medians[name][k] / medians["untouched"][k] for k in medians[name]} for name in CONFIGS},
        "peak_memory_gb": torch.cuda.max_memory_allocated() / 1e9,
    }
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    print(f"device: {result['device']}  torch {result['torch']}  transformers {result['transformers']}")
    print(f"{'config':<14}" + "".join(f"{k:>22}" for k in medians["untouched"]))
    for name in CONFIGS:
        cells = "".join(f"{medians[name][k]:>12.2f} ms {result['ratio'][name][k]:>6.3f}x" for k in medians["untouched"])
        print(f"{name:<14}{cells}")
    spread = {k: (max(v) - min(v)) / statistics.median(v) for k, v in rounds["untouched"].items()}
    print("untouched round-to-round spread (max-min)/median:", {k: round(v, 4) for k, v in spread.items()})


if __name__ == "__main__":
    main()
