"""What does ACT cost at prefill? Untouched sdpa vs ACT's fast path vs its eager path.

Llama-3-8B shape, random bf16 weights, one GPU; ACT on 20% of the heads of layers 2-29 (a fixed
random choice per layer). Prefill at 8K and 32K tokens, last-position logits. Each configuration is
timed in interleaved rounds in one process (CUDA events; the cell is the median over rounds of the
median over repetitions) and its peak memory measured from a reset. Ratios are against the
untouched model of the same run. The eager path (the reference's approach: the attention matrix of
every touched layer materialised) and eager-everywhere are reported as measured, or as OOM.

    python scripts/bench_act.py [--rounds 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_overhead import LLAMA3_8B, build_model, time_fn, turn  # noqa: E402

import attnkit  # noqa: E402
from attnkit.methods import ACT  # noqa: E402


def head_set(fraction: float = 0.2, seed: int = 0) -> dict[int, list[int]]:
    rng = random.Random(seed)
    per_layer = round(fraction * LLAMA3_8B["num_attention_heads"])
    return {layer: sorted(rng.sample(range(LLAMA3_8B["num_attention_heads"]), per_layer)) for layer in range(2, 30)}


def run_config(model, ids, methods, reps: int, fused: bool = True) -> dict:
    """Median ms and peak GB of a prefill under ``methods`` (None = untouched); 'OOM' if it does not fit."""
    from attnkit import kernels

    available = kernels.available
    if not fused:
        kernels.available = lambda query: False
    handle = None if methods is None else attnkit.apply(model, methods)
    try:
        with torch.no_grad():
            fn = lambda: model(input_ids=ids, use_cache=False, logits_to_keep=1).logits  # noqa: E731
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            logits = fn()
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() / 1e9
            ms = time_fn(fn, reps)
            stats = handle.stats() if handle else {}
        return {"ms": ms, "peak_gb": peak, "stats": stats, "logits": logits[0, -1].float().cpu()}
    except torch.OutOfMemoryError:
        return {"ms": None, "peak_gb": None, "oom": True}
    finally:
        kernels.available = available
        if handle:
            handle.remove()
        torch.cuda.empty_cache()


def check_float32(tokens: int = 2048) -> dict:
    """Correctness on the GPU where rounding cannot hide a bug: a 4-layer float32 model in the same
    shape, ACT with forced sinks on 20% of the heads of layers 1-2, fused kernels vs torch vs eager."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from attnkit import kernels

    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(
            LlamaConfig(**{**LLAMA3_8B, "num_hidden_layers": 4}, attn_implementation="sdpa")
        ).eval()
    ids = torch.randint(0, LLAMA3_8B["vocab_size"], (2, tokens), device="cuda")
    mask = torch.ones_like(ids)
    mask[1, :100] = 0  # left padding in the second row
    heads = {layer: h for layer, h in head_set().items() if layer in (2, 3)}
    out = {}
    available = kernels.available
    for name, path, fused in [("fused", "fast", True), ("torch", "fast", False), ("eager", "eager", True)]:
        kernels.available = available if fused else (lambda query: False)
        with torch.no_grad(), attnkit.apply(model, [ACT(heads=heads, path=path, alpha=2.0)]) as handle:
            out[name] = model(input_ids=ids, attention_mask=mask).logits[:, -64:].float()
            out[name + "_sinks"] = handle.stats()["act"]["sinks_found"]
        kernels.available = available
    untouched = model(input_ids=ids, attention_mask=mask).logits[:, -64:].float()
    result = {
        "sinks": {k: out[k + "_sinks"] for k in ("fused", "torch", "eager")},
        "fused_vs_eager": (out["fused"] - out["eager"]).abs().max().item(),
        "torch_vs_eager": (out["torch"] - out["eager"]).abs().max().item(),
        "act_vs_untouched": (out["eager"] - untouched).abs().max().item(),
    }
    del model
    torch.cuda.empty_cache()
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    check = check_float32()
    print("float32 correctness check:", check, flush=True)
    model = build_model()
    heads = head_set()
    configs = {
        "untouched": None,
        "act_fast": [ACT(heads=heads, path="fast")],
        "act_fast_torch": [ACT(heads=heads, path="fast")],  # fused kernels switched off
        "act_fast_forced_sinks": [ACT(heads=heads, path="fast", alpha=2.0)],  # random weights find no 0.1 sinks
        "act_eager": [ACT(heads=heads, path="eager")],
    }
    gen = torch.Generator(device="cuda").manual_seed(1)
    results: dict = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "heads": sum(map(len, heads.values())),
        "float32_check": check,
        "lengths": {},
    }
    for n in args.lengths:
        ids = torch.randint(0, LLAMA3_8B["vocab_size"], (1, n), device="cuda", generator=gen)
        per: dict = {name: [] for name in configs}
        for r in range(args.rounds):
            for name in turn(configs, r):
                if per[name] and per[name][-1].get("oom"):
                    continue
                per[name].append(run_config(model, ids, configs[name], args.reps, fused=name != "act_fast_torch"))
            print(f"{n} tokens: round {r + 1}/{args.rounds}", flush=True)
        model.set_attn_implementation("eager")
        per["eager_everywhere_act"] = [run_config(model, ids, [ACT(heads=heads, path="eager")], 1)]
        model.set_attn_implementation("sdpa")
        summary = {}
        base = statistics.median(x["ms"] for x in per["untouched"])
        base_mem = max(x["peak_gb"] for x in per["untouched"])
        for name, runs in per.items():
            if any(x.get("oom") for x in runs):
                summary[name] = {"oom": True}
                continue
            ms = statistics.median(x["ms"] for x in runs)
            mem = max(x["peak_gb"] for x in runs)
            summary[name] = {
                "ms": ms,
                "time_ratio": ms / base,
                "peak_gb": mem,
                "memory_ratio": mem / base_mem,
                "stats": runs[-1].get("stats", {}),
            }
        # correctness on the GPU, bf16: the fast paths against the eager path (when it fits) and each other
        last = {name: runs[-1]["logits"] for name, runs in per.items() if not runs[-1].get("oom")}
        checks = {}
        for a, b in [
            ("act_fast", "act_eager"),
            ("act_fast", "act_fast_torch"),
            ("act_fast", "untouched"),
            ("act_fast_forced_sinks", "untouched"),
        ]:
            if a in last and b in last:
                checks[f"{a} vs {b}"] = (last[a] - last[b]).abs().max().item()
        summary["max_abs_logit_diff"] = checks
        for runs in per.values():
            for run in runs:
                run.pop("logits", None)
        results["lengths"][n] = {"summary": summary, "rounds": per}
        print(f"  {n:>6} logit checks: {summary['max_abs_logit_diff']}")
        for name, row in summary.items():
            if name == "max_abs_logit_diff":
                continue
            if row.get("oom"):
                print(f"  {n:>6} {name:<22} OOM")
            else:
                print(
                    f"  {n:>6} {name:<22} {row['ms']:9.1f} ms {row['time_ratio']:6.3f}x  "
                    f"peak {row['peak_gb']:6.2f} GB {row['memory_ratio']:6.3f}x  {row['stats']}"
                )
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
