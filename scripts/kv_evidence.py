"""KV compression on a real model: SmolLM2-135M on the needle grid, full cache vs compressed.

One process, the model loaded once: the untouched model (full cache), then each method on the
same prompts. Per configuration: needle recall and exact match (overall and per length), the KV
bytes attnkit kept against the full cache (measured from the cache tensors), and a heatmap.
Results go to ``--out`` (one JSON per configuration, so a rerun skips finished ones) and a
summary table to stdout.

    python scripts/kv_evidence.py --out docs/kv-evidence
    python scripts/kv_evidence.py --out DIR --only full snapkv_20 --needle ... --question ... --answer ...

The second form checks a setting on a different needle (a held-out check for what the grid chose).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import attnkit  # noqa: E402
from attnkit.methods import Razor, SnapKV, Streaming  # noqa: E402
from attnkit.models import load_model  # noqa: E402
from attnkit.recipe.tasks import NeedleTask  # noqa: E402
from attnkit.tasks.needle import run_needle  # noqa: E402

RAZOR = dict(sink=4, local=128, ratio=8.0)
KV_GATES = "heads/kv-gates-smollm2.json"  # attnkit profile kv-gates -o heads/kv-gates-smollm2.json
GATED = dict(sink=4, local=64, ratio=16.0)  # the layout the gates were trained for


def razor_heads_at(induction_ratio: float, echo_ratio: float = 0.01) -> dict[int, list[int]]:
    """The razor-heads artifact's heads re-selected from its stored scores at a larger induction share."""
    import numpy as np

    from attnkit.probes.razor_heads import top_union

    params = json.loads(Path("heads/razor-smollm2.json").read_text())["parameters"]
    heads, _ = top_union(np.array(params["induction_kv"]), np.array(params["echo_kv"]), induction_ratio, echo_ratio)
    return heads


def kv_gates_top(count: int) -> dict[int, list[int]]:
    """The ``count`` KV heads with the largest trained gates in the kv-gates artifact (SmolLM2: every layer gated)."""
    from attnkit.probes.kv_gates import top_gates

    return top_gates(json.loads(Path(KV_GATES).read_text())["scores"], count)


def kv_gates_configurations() -> dict:
    """Razor with the kv-gates artifact's heads (once it exists), in the layout they were trained for."""
    if not Path(KV_GATES).exists():
        return {}
    return {
        "razor_kv_gates": [Razor(heads=KV_GATES, compensation="none", **GATED)],
        "razor_kv_gates_weighted": [Razor(heads=KV_GATES, **GATED)],
        "razor_kv_gates_14": [Razor(heads=kv_gates_top(14), compensation="none", **GATED)],
        "razor_kv_gates_22": [Razor(heads=kv_gates_top(22), compensation="none", **GATED)],
        "razor_kv_gates_22_weighted": [Razor(heads=kv_gates_top(22), **GATED)],
    }


def configurations() -> dict:
    return {
        "full": None,
        "snapkv_20": [SnapKV(budget=0.2)],
        "razor_razor_heads": [Razor(heads="heads/razor-smollm2.json", **RAZOR)],
        "streaming_20": [Streaming(budget=0.2)],
        "snapkv_10": [SnapKV(budget=0.1)],
        "razor_retrieval_heads": [Razor(heads="heads/retrieval-smollm2.json", **RAZOR)],
        "snapkv_20_max": [SnapKV(budget=0.2, reduction="max")],
        "snapkv_10_max": [SnapKV(budget=0.1, reduction="max")],
        "snapkv_20_k31": [SnapKV(budget=0.2, kernel=31)],
        "snapkv_20_w64": [SnapKV(budget=0.2, window=64)],
        "snapkv_10_k31": [SnapKV(budget=0.1, kernel=31)],
        "razor_razor_heads_22": [Razor(heads=razor_heads_at(0.22), sink=4, local=64, ratio=16.0)],
        "razor_razor_heads_plain": [Razor(heads="heads/razor-smollm2.json", compensation="plain", **RAZOR)],
        "razor_razor_heads_none": [Razor(heads="heads/razor-smollm2.json", compensation="none", **RAZOR)],
        **kv_gates_configurations(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/kv-evidence"))
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8000])
    parser.add_argument("--only", nargs="*")
    parser.add_argument("--needle", help="a different needle (with --question and --answer), as a held-out check")
    parser.add_argument("--question")
    parser.add_argument("--answer")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    model, tokenizer = load_model("smollm2-135m-instruct")
    custom = dict(needle=args.needle, question=args.question, answer=args.answer) if args.needle else {}
    task = NeedleTask(lengths=args.lengths, max_new_tokens=24, **custom)
    for name, methods in configurations().items():
        if args.only and name not in args.only:
            continue
        path = args.out / f"{name}.json"
        if path.exists():
            continue
        result, stats, row = measured(model, methods, lambda: run_needle(model, tokenizer, task, progress=False))
        result.write_files(args.out, name)
        row = {
            "config": name,
            **row,
            "kv_bytes_before": stats.get("kv_bytes_before"),
            "kv_bytes_after": stats.get("kv_bytes_after"),
            "stats": {k: v for k, v in stats.items() if k != "kv_bytes"},
        }
        path.write_text(json.dumps(row, indent=1))
        print(
            f"{name}: recall {result.metrics['recall']:.3f}, exact {result.metrics['exact_match']:.3f}, "
            f"kv {row['kv_fraction']:.3f}, {row['seconds']} s",
            flush=True,
        )
    summary(args.out)


def measured(model, methods, run) -> tuple:
    """``run()`` with ``methods`` applied (None: the untouched model), then removed: its result, the
    first method's stats summed over the run, and the report fields every evidence row shares."""
    began = time.time()
    handle = attnkit.apply(model, methods) if methods else None
    try:
        result = run()
        stats = handle.stats(total=True)[methods[0].name] if handle else {}
    finally:
        if handle:
            handle.remove()
    before, after = stats.get("kv_bytes_before"), stats.get("kv_bytes_after")
    row = {
        "methods": [repr(m) for m in methods or []],
        "metrics": result.metrics,
        "kv_fraction": after / before if before else 1.0,
        "seconds": round(time.time() - began, 1),
        "rows": result.rows,
    }
    return result, stats, row


def summary(out: Path) -> None:
    rows = {p.stem: json.loads(p.read_text()) for p in sorted(out.glob("*.json"))}
    full = rows.get("full")
    print("| config | recall | exact match | recall vs full | KV bytes kept | seconds |")
    print("|---|---|---|---|---|---|")
    for name, row in rows.items():
        m = row["metrics"]
        rel = m["recall"] / full["metrics"]["recall"] if full and full["metrics"]["recall"] else float("nan")
        print(
            f"| {name} | {m['recall']:.3f} | {m['exact_match']:.3f} | {rel:.3f} | {row['kv_fraction']:.3f} | {row['seconds']} |"
        )


if __name__ == "__main__":
    main()
