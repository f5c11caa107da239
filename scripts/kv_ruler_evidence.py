"""KV compression on RULER's synthetic tasks: SmolLM2-135M, full cache against snapkv, razor and streaming.

The ruler task's evidence run (docs/kv-evidence.md, "RULER"). One process, the model loaded
once; lengths outer and configurations inner, so that every configuration has its numbers at the
short lengths before the long ones start. One JSON per (configuration, length) goes to ``--out``
(a rerun skips finished ones); ``--summary`` prints the tables from what is there.

    nice -n 10 python scripts/kv_ruler_evidence.py --out /tmp/kv-ruler --samples 1 --max-new-tokens 48
    python scripts/kv_ruler_evidence.py --out /tmp/kv-ruler --summary
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from attnkit.methods import Razor, SnapKV, Streaming  # noqa: E402
from attnkit.models import load_model  # noqa: E402
from attnkit.recipe.tasks import RULER_FAMILIES, RulerTask  # noqa: E402
from attnkit.tasks.ruler import run_ruler  # noqa: E402
from scripts.kv_evidence import GATED, kv_gates_top, measured  # noqa: E402


def configurations() -> dict:
    """The issue's set: full cache, snapkv 20% with the paper's kernel 7 and with 31, razor on the 22
    top kv-gates heads (the best razor of the needle evidence), streaming 20%."""
    return {
        "full": None,
        "snapkv_20": [SnapKV(budget=0.2)],
        "snapkv_20_k31": [SnapKV(budget=0.2, kernel=31)],
        "razor_kv_gates_22": [Razor(heads=kv_gates_top(22), compensation="none", **GATED)],
        "streaming_20": [Streaming(budget=0.2)],
    }


def run_one(model, tokenizer, task: RulerTask, name: str, methods, path: Path) -> None:
    result, _, fields = measured(model, methods, lambda: run_ruler(model, tokenizer, task, progress=False))
    row = {"config": name, "length": task.lengths[0], **fields}
    path.write_text(json.dumps(row, indent=1))
    print(f"{name} @{task.lengths[0]}: average {result.metrics['average']:.1f}, {row['seconds']} s", flush=True)


def pooled(scores: list[float], seed: int = 0, draws: int = 10000) -> tuple[float, float, float]:
    """Mean of per-prompt scores with a 95% percentile bootstrap interval (prompts resampled)."""
    rng = random.Random(seed)
    means = sorted(sum(rng.choices(scores, k=len(scores))) / len(scores) for _ in range(draws))
    return sum(scores) / len(scores), means[int(0.025 * draws)], means[int(0.975 * draws) - 1]


def summary_tables(out: Path) -> None:
    """Markdown: average per configuration x length, the mean over every prompt with a 95%
    bootstrap interval, then per task for each configuration."""
    runs = [json.loads(p.read_text()) for p in sorted(out.glob("*@*.json"))]
    configs = list(
        dict.fromkeys(r["config"] for r in sorted(runs, key=lambda r: list(configurations()).index(r["config"])))
    )
    lengths = sorted({r["length"] for r in runs})
    got = {(r["config"], r["length"]): r for r in runs}
    print(
        "| configuration | "
        + " | ".join(map(str, lengths))
        + " | all prompts (95% CI) | minus full, paired (95% CI) | KV kept |"
    )
    print("|---" * (len(lengths) + 4) + "|")
    for c in configs:
        cells = [f"{got[c, n]['metrics']['average']:.1f}" if (c, n) in got else "-" for n in lengths]
        kept = [got[c, n]["kv_fraction"] for n in lengths if (c, n) in got]
        scores = [row["score"] for n in lengths if (c, n) in got for row in got[c, n]["rows"]]
        mean, low, high = pooled(scores)
        shared = [n for n in lengths if (c, n) in got and ("full", n) in got]
        diffs = [
            mine["score"] - base["score"]
            for n in shared
            for mine, base in zip(got[c, n]["rows"], got["full", n]["rows"])
        ]
        d, d_low, d_high = pooled(diffs) if diffs else (0.0, 0.0, 0.0)
        print(
            f"| {c} | " + " | ".join(cells) + f" | {mean:.1f} ({low:.1f} to {high:.1f}) | "
            f"{d:+.1f} ({d_low:+.1f} to {d_high:+.1f}) | {sum(kept) / len(kept):.3f} |"
        )
    for n in lengths:
        print(f"\nper task at {n} tokens:\n")
        present = [c for c in configs if (c, n) in got]
        print("| task | " + " | ".join(present) + " |")
        print("|---" * (len(present) + 1) + "|")
        for family in RULER_FAMILIES:
            print(
                f"| {family} | "
                + " | ".join(f"{got[c, n]['metrics'].get(family, float('nan')):.0f}" for c in present)
                + " |"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/kv-ruler"))
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8000])
    parser.add_argument("--samples", type=int, default=1)
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default: RULER's per task")
    parser.add_argument("--only", nargs="*")
    parser.add_argument("--summary", action="store_true", help="only print the tables of what is in --out")
    args = parser.parse_args()
    if args.summary:
        summary_tables(args.out)
        return
    args.out.mkdir(parents=True, exist_ok=True)
    model, tokenizer = load_model("smollm2-135m-instruct")
    for length in args.lengths:
        task = RulerTask(lengths=[length], samples=args.samples, max_new_tokens=args.max_new_tokens)
        for name, methods in configurations().items():
            path = args.out / f"{name}@{length}.json"
            if (args.only and name not in args.only) or path.exists():
                continue
            run_one(model, tokenizer, task, name, methods, path)
    summary_tables(args.out)


if __name__ == "__main__":
    main()
