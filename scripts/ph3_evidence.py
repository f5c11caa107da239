"""PH3 evidence: untouched vs ``ph3 steer=memory`` vs ``ph3 steer=context`` vs random-head controls.

Runs the conflict task on a held-out test split with the model loaded once:

- ``untouched``            the model as it is (with context), and ``closed_book`` (without context);
- ``ph3_memory``           ph3 steer: memory, k from the artifact's validation sweep (k: auto);
- ``ph3_context``          ph3 steer: context, likewise;
- ``random_memory_s<N>``   as many random heads pruned as ph3_memory (seeded; heads ph3 prunes excluded);
- ``random_context_s<N>``  the same for ph3_context.

Every condition reports context / memory (/ other) rates with 95% Wilson intervals for log-likelihood
choice and, where asked, greedy generation; each is compared with ``untouched`` item by item (paired
difference with a 95% CI and McNemar's exact p). Writes a JSON summary and prints a Markdown table.

    python scripts/ph3_evidence.py --heads heads/conflict-smollm2.json \\
        --data .cache/attnkit-data/data/conflict_test.jsonl --limit 300 --out docs/ph3-evidence-smollm2.json
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import attnkit  # noqa: E402
from attnkit.heads import ModelShape, load_artifact  # noqa: E402
from attnkit.methods import PH3, HeadMask  # noqa: E402
from attnkit.models import load_model  # noqa: E402
from attnkit.recipe.methods import ph3_heads  # noqa: E402
from attnkit.recipe.tasks import ConflictTask  # noqa: E402
from attnkit.tasks.choice import paired_comparison  # noqa: E402
from attnkit.tasks.conflict import run_conflict  # noqa: E402


def random_heads(shape: ModelShape, k: int, exclude: set[tuple[int, int]], seed: int) -> list[list[int]]:
    """``k`` heads drawn uniformly (seeded) from the model's heads not in ``exclude``."""
    pool = [(lay, h) for lay in range(shape.num_layers) for h in range(shape.num_heads) if (lay, h) not in exclude]
    return [list(pair) for pair in sorted(random.Random(seed).sample(pool, k))]


def compare(base: list[dict], rows: list[dict], key: str, outcome: str) -> dict[str, Any]:
    """Paired difference of the rate of ``outcome`` (by ``key``) against the untouched rows."""
    flag = lambda rs: [{"correct": r[key] == outcome} for r in rs]  # noqa: E731
    return paired_comparison(flag(base), flag(rows))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--heads", required=True, help="conflict-heads artifact with a ph3-sweep choice")
    ap.add_argument("--data", required=True, help="test split (conflict JSONL)")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--limit", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--control-seeds", default="0", help="seeds of the random-head controls, comma-separated")
    ap.add_argument(
        "--generate",
        default="untouched,closed_book,ph3_memory,ph3_context,random_memory_s0,random_context_s0",
        help="conditions that also get greedy generation (comma-separated; 'all' or 'none')",
    )
    ap.add_argument("--out", type=Path, required=True, help="JSON summary")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    model, tokenizer = load_model(args.model)
    shape = ModelShape.from_config(model.config, args.model)
    artifact = load_artifact(args.heads, shape)
    seeds = [int(s) for s in args.control_seeds.split(",") if s.strip()]
    conditions: dict[str, tuple[list[Any], bool]] = {"untouched": ([], True), "closed_book": ([], False)}
    chosen: dict[str, Any] = {}
    for steer in ("memory", "context"):
        heads, k, source = ph3_heads(artifact, steer, "auto", args.heads)
        chosen[steer] = {"k": k, "k_source": source, "heads": [list(h) for h in heads]}
        conditions[f"ph3_{steer}"] = ([PH3(heads=args.heads, steer=steer, k="auto")], True)
        for seed in seeds:
            picked = random_heads(shape, k, set(heads), seed)
            chosen[f"random_{steer}_s{seed}"] = {"k": k, "seed": seed, "heads": picked}
            conditions[f"random_{steer}_s{seed}"] = ([HeadMask(heads=picked, scale=0.0)], True)
    generate = (
        set(conditions)
        if args.generate == "all"
        else set()
        if args.generate == "none"
        else set(args.generate.split(","))
    )

    results: dict[str, Any] = {}
    rows: dict[str, list[dict]] = {}
    for name, (methods, with_context) in conditions.items():
        task = ConflictTask(
            data=args.data,
            limit=args.limit,
            batch_size=args.batch_size,
            with_context=with_context,
            scoring="both" if name in generate else "loglik",
        )
        start = time.perf_counter()
        with attnkit.apply(model, methods) as handle:
            result = run_conflict(model, tokenizer, task, progress=False)
            stats = handle.stats(total=True)
        results[name] = {
            "metrics": result.metrics,
            "seconds": round(time.perf_counter() - start, 1),
            "method_stats": stats,
        }
        rows[name] = result.rows
        m = result.metrics
        print(
            f"{name}: context {m['context_rate']:.4f} memory {m['memory_rate']:.4f}"
            + (
                f" | gen context {m['generate_context_rate']:.4f} memory {m['generate_memory_rate']:.4f} "
                f"other {m['generate_other_rate']:.4f}"
                if "generate_context_rate" in m
                else ""
            )
            + f" ({results[name]['seconds']} s)",
            flush=True,
        )
    base = rows["untouched"]
    for name in conditions:
        if name in ("untouched", "closed_book"):
            continue
        comparisons = {"loglik_context": compare(base, rows[name], "loglik_choice", "context")}
        if "generate_choice" in rows[name][0] and "generate_choice" in base[0]:
            for outcome in ("context", "memory"):
                comparisons[f"generate_{outcome}"] = compare(base, rows[name], "generate_choice", outcome)
        results[name]["vs_untouched"] = comparisons
    summary = {
        "model": args.model,
        "heads": args.heads,
        "data": args.data,
        "limit": args.limit,
        "sweep": artifact.parameters.get("sweep"),
        "chosen": chosen,
        "results": results,
        "seconds_total": round(time.perf_counter() - t0, 1),
        "versions": {"attnkit": attnkit.__version__},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=1) + "\n")
    rows_path = ROOT / "runs" / "ph3-evidence" / "rows.json"
    rows_path.parent.mkdir(parents=True, exist_ok=True)
    rows_path.write_text(json.dumps(rows))
    print(table(summary))
    print(f"wrote {args.out} (rows: {rows_path}), {summary['seconds_total']} s")
    return 0


def fmt_rate(m: dict[str, Any], key: str) -> str:
    if key not in m:
        return "-"
    low, high = m[f"{key}_ci95"]
    return f"{m[key]:.3f} [{low:.3f}, {high:.3f}]"


def table(summary: dict[str, Any]) -> str:
    """Markdown: one row per condition, rates with 95% Wilson intervals, paired differences."""
    lines = [
        "| condition | k | loglik context rate | loglik memory rate | gen context | gen memory | gen other | "
        "Δ loglik context (paired 95% CI, McNemar p) |",
        "|---" * 8 + "|",
    ]
    for name, res in summary["results"].items():
        m = res["metrics"]
        k = (
            summary["chosen"].get(name.replace("ph3_", ""), summary["chosen"].get(name, {})).get("k", "")
            if name not in ("untouched", "closed_book")
            else ""
        )
        diff = res.get("vs_untouched", {}).get("loglik_context")
        d = (
            (
                f"{diff['accuracy_difference']:+.3f} [{diff['difference_ci95'][0]:+.3f}, {diff['difference_ci95'][1]:+.3f}], "
                f"p={diff['mcnemar_p']:.2g}"
            )
            if diff
            else ""
        )
        lines.append(
            f"| {name} | {k} | {fmt_rate(m, 'context_rate')} | {fmt_rate(m, 'memory_rate')} | "
            f"{fmt_rate(m, 'generate_context_rate')} | {fmt_rate(m, 'generate_memory_rate')} | "
            f"{fmt_rate(m, 'generate_other_rate')} | {d} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
