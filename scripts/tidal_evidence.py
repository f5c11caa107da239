"""TidalDecode on real models (CPU): needle and passkey grids, full attention vs ``tidaldecode`` budgets.

The prompts, the greedy decoding and the scores are the ``needle`` / ``passkey`` tasks' own (the cells
are built by ``run_needle`` / ``run_passkey``). TidalDecode leaves the prefill untouched, so each
prompt is prefilled once with full attention, and every configuration then decodes greedily from its
own copy of that cache, with its handle applied: the same replies as one ``attnkit run`` per
configuration, at a fraction of the prefill cost on a 2-core CPU. Each finished (cell,
configuration) is appended to ``OUT/progress.jsonl``, so an interrupted run resumes; at the end the
metrics per configuration go to ``OUT/summary.json`` and a heatmap per configuration to
``OUT/<task>_<config>.png``.

    python scripts/tidal_evidence.py --model smollm2-135m-instruct --task needle \\
        --lengths 1024 2048 4096 8000 --depths 0 0.33 0.67 1 --out docs/tidal-evidence/smollm2-needle
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import attnkit  # noqa: E402
from attnkit.methods import TidalDecode  # noqa: E402
from attnkit.models import load_model  # noqa: E402
from attnkit.plots import needle_heatmap  # noqa: E402
from attnkit.recipe.tasks import NeedleTask, PasskeyTask  # noqa: E402
from attnkit.tasks import needle  # noqa: E402
from attnkit.tasks.generate import eos_ids  # noqa: E402


def grid_cells(model, tokenizer, task) -> list:
    """The task's own cells (prompts, expected answers, scorers), as its runner builds them."""
    run = needle.run_needle if task.kind == "needle" else needle.run_passkey
    with mock.patch.object(needle, "run_cells", lambda _m, _t, _task, cells, _metric, _progress: cells):
        return run(model, tokenizer, task, progress=False)


def greedy(model, cache, first: int, steps: int, stop: list[int]) -> list[int]:
    """Greedy tokens after a prefill whose next token is ``first``, decoding one token per call."""
    tokens = [first]
    while len(tokens) < steps and tokens[-1] not in stop:
        out = model(input_ids=torch.tensor([[tokens[-1]]]), past_key_values=cache, use_cache=True)
        tokens.append(int(out.logits[0, -1].argmax()))
    return tokens


def reply(tokenizer, tokens: list[int], stop: list[int]) -> tuple[str, int]:
    """The reply text (up to the first stop token) and its token count, as the tasks count them."""
    n = next((i + 1 for i, token in enumerate(tokens) if token in stop), len(tokens))
    return tokenizer.decode(tokens[:n], skip_special_tokens=True), n


def run_cell(model, tokenizer, cell, configs: dict, steps: int, stop: list[int], done: set) -> list[dict]:
    """One prefill, then each configuration's greedy decode from a copy of its cache."""
    ids = torch.tensor([cell.prompt.input_ids])
    began = time.perf_counter()
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    prefill_s = time.perf_counter() - began
    first = int(out.logits[0, -1].argmax())
    rows = []
    for name, methods in configs.items():
        if (cell.prompt.length, cell.prompt.depth, name) in done:
            continue
        began = time.perf_counter()
        handle = attnkit.apply(model, methods) if methods else None
        try:
            with torch.no_grad():
                tokens = greedy(model, copy.deepcopy(out.past_key_values), first, steps, stop)
            stats = handle.stats(total=True)["tidaldecode"] if handle else {}
        finally:
            if handle:
                handle.remove()
        text, n = reply(tokenizer, tokens, stop)
        rows.append(
            {
                "config": name,
                "length": cell.prompt.length,
                "depth": cell.prompt.depth,
                "prompt_tokens": len(cell.prompt.input_ids),
                "actual_depth": round(cell.prompt.actual_depth, 4),
                "needle_span": list(cell.prompt.needle_span),
                "expected": cell.expected,
                "output": text,
                "n_new_tokens": n,
                **cell.score(text),
                "selections": stats.get("selections", 0),
                "read_fraction": stats.get("read_fraction"),
                "prefill_s": round(prefill_s, 2),
                "decode_s": round(time.perf_counter() - began, 2),
            }
        )
    return rows


def summarize(rows: list[dict], task_kind: str, metric: str, out: Path) -> dict:
    """Metrics per configuration (overall, per length and per depth) and a heatmap each."""
    summary = {}
    for name in dict.fromkeys(r["config"] for r in rows):
        mine = [r for r in rows if r["config"] == name]
        entry = {"n": len(mine)}
        for key in ("exact_match", "recall"):
            if key in mine[0]:
                entry[key] = sum(float(r[key]) for r in mine) / len(mine)
                for group in ("length", "depth"):
                    for value in sorted({r[group] for r in mine}):
                        picked = [float(r[key]) for r in mine if r[group] == value]
                        entry[f"{key}@{group}={value}"] = sum(picked) / len(picked)
        fractions = [r["read_fraction"] for r in mine if r["read_fraction"] is not None]
        entry["mean_read_fraction"] = sum(fractions) / len(fractions) if fractions else 1.0
        summary[name] = entry
        title = f"{task_kind} ({name}): {metric} per cell, mean {entry[metric]:.3f}"
        needle_heatmap(mine, out / f"{task_kind}_{name}.png", metric=metric, title=title)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--task", choices=["needle", "passkey"], default="needle")
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8000])
    parser.add_argument("--depths", type=float, nargs="+", default=[0.0, 0.33, 0.67, 1.0])
    parser.add_argument("--budgets", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--selection", default="query_head")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    model, tokenizer = load_model(args.model)
    cls = NeedleTask if args.task == "needle" else PasskeyTask
    task = cls(lengths=args.lengths, depths=args.depths, max_new_tokens=args.max_new_tokens)
    metric = "recall" if args.task == "needle" else "exact_match"
    configs = {"full": None}
    configs.update({f"tidal_{b}": [TidalDecode(budget=b, selection=args.selection)] for b in args.budgets})
    progress = args.out / "progress.jsonl"
    rows = [json.loads(line) for line in progress.read_text().splitlines()] if progress.exists() else []
    done = {(r["length"], r["depth"], r["config"]) for r in rows}
    stop = eos_ids(model, tokenizer)
    for cell in grid_cells(model, tokenizer, task):
        if all((cell.prompt.length, cell.prompt.depth, name) in done for name in configs):
            continue
        new = run_cell(model, tokenizer, cell, configs, args.max_new_tokens, stop, done)
        with progress.open("a") as f:
            for row in new:
                f.write(json.dumps(row) + "\n")
                print(
                    f"{row['config']:>10} len {row['length']:>6} depth {row['depth']:.2f}: {metric} "
                    f"{float(row[metric]):.2f} prefill {row['prefill_s']} s decode {row['decode_s']} s "
                    f"{row['output'][:60]!r}",
                    flush=True,
                )
        rows.extend(new)
    summary = summarize(rows, args.task, metric, args.out)
    meta = {"model": args.model, "task": args.task, "lengths": args.lengths, "depths": args.depths,
            "selection": args.selection, "max_new_tokens": args.max_new_tokens}  # fmt: skip
    (args.out / "summary.json").write_text(json.dumps({"setup": meta, "metrics": summary}, indent=1))
    full = summary["full"][metric]
    for name, entry in summary.items():
        print(f"{name}: {metric} {entry[metric]:.3f} ({entry[metric] / full if full else float('nan'):.2f} of full)")


if __name__ == "__main__":
    main()
