"""Few-shot classification data from BIG-bench for attnkit's `choice` task (ACT evidence runs).

Writes into <out>/data/ (default .cache/attnkit-data/ under the repository root; `.cache/` is
git-ignored, so the files are never committed: BIG-bench task files carry third-party data):

    multiemo_train.jsonl  multiemo_test.jsonl   multiemo/all_sentence_en, positive vs negative,
                                                4-shot, label words " positive" / " negative"
    intent_train.jsonl    intent_test.jsonl     intent_recognition (SNIPS, 7 intents), 7-shot
                                                (one demonstration per intent, shuffled)
    conflict_profile.jsonl conflict_validation.jsonl conflict_test.jsonl
                                                contextual_parametric_knowledge_conflicts (PH3):
                                                disjoint random splits of 200 / 200 / 400 items
                                                whose context has at most 60 words, in the
                                                conflict schema {question, context, context_answer,
                                                memory_answer}
    manifest.json                               source, seed, template, counts, label balance,
                                                prompt lengths in SmolLM2 tokens

Each line is {"prompt", "choices", "answer", "label"}; `train` is for head selection, `test` for
evaluation, and the demonstrations come from a pool that shares no text with either. Both splits
interleave the labels, so a `limit:` prefix stays balanced. The same seed gives byte-identical files.

The bigbench 1.0.0 sdist (358 MB) is downloaded once from PyPI into $ATTNKIT_CACHE/data (default
~/.cache/attnkit/data); the two task files are extracted from it once.

    python scripts/prepare_bigbench.py [--out DIR] [--seed 0] [--check 100]

`--check N` also scores the first N test items of each set with the default model (SmolLM2-135M)
and prints accuracy and time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from attnkit.data import (  # noqa: E402
    BIGBENCH_VERSION,
    bigbench_examples,
    bigbench_tasks,
    fewshot_items,
    label_counts,
    make_splits,
    write_jsonl,
)

INTENTS = [  # as they appear in the data (target_scores keys, in their order)
    "add_to_playlist",
    "book_restaurant",
    "get_weather",
    "play_music",
    "search_screening_event",
    "search_creative_work",
    "rate_book",
]

DATASETS: dict[str, dict[str, Any]] = {
    "multiemo": {
        "task": "multiemo/all_sentence_en",
        "strip_prefix": "",
        "labels": {"positive": "positive", "negative": "negative"},
        "shots": 4,
        "n_train": 200,
        "n_test": 400,
        "min_pool_per_label": 20,
        # Examples longer than this are left out (about 2% of positive/negative sentences), so no
        # text is cut and a 4-shot prompt stays well under 400 tokens.
        "max_words": 60,
        "template": {"input_prefix": "Review: ", "output_prefix": "Sentiment:", "separator": "\n\n", "instruction": ""},
    },
    "intent": {
        "task": "intent_recognition",
        "strip_prefix": "Utterance: ",
        "labels": {name: name for name in INTENTS},
        "shots": 7,
        "n_train": 200,
        "n_test": 300,
        # 80 rate_book rows are the bottleneck: 10 per intent stay in the demonstration pool.
        "min_pool_per_label": 10,
        "max_words": 60,
        "template": {"input_prefix": "Utterance: ", "output_prefix": "Intent:", "separator": "\n\n", "instruction": ""},
    },
}


def build(name: str, spec: dict[str, Any], task: dict[str, Any], seed: int) -> tuple[dict[str, list[dict]], dict]:
    examples = bigbench_examples(task, strip_prefix=spec["strip_prefix"])
    wanted = set(spec["labels"])
    short = [e for e in examples if len(e.text.split()) <= spec["max_words"]]
    too_long = sum(1 for e in examples if e.label in wanted) - sum(1 for e in short if e.label in wanted)
    splits = make_splits(
        short,
        labels=list(spec["labels"]),
        n_train=spec["n_train"],
        n_test=spec["n_test"],
        seed=seed,
        min_pool_per_label=spec["min_pool_per_label"],
    )
    common = dict(pool=splits.pool, labels=spec["labels"], shots=spec["shots"], **spec["template"])
    # Different seeds for the two splits so train item i and test item i do not share demonstrations.
    items = {
        "train": fewshot_items(splits.train, seed=seed * 1000 + 1, **common),
        "test": fewshot_items(splits.test, seed=seed * 1000 + 2, **common),
    }
    info = {
        "source": f"bigbench {BIGBENCH_VERSION} sdist (PyPI), task {spec['task']}",
        "rows_in_task": len(examples),
        "rows_with_labels": sum(1 for e in examples if e.label in wanted),
        "dropped_over_max_words": too_long,
        **{k: spec[k] for k in ("labels", "shots", "max_words", "min_pool_per_label", "template")},
        "choices": items["test"][0]["choices"] if items["test"] else [],
        "splits": splits.info,
    }
    return items, info


CONFLICT = {
    "task": "contextual_parametric_knowledge_conflicts",
    "max_context_words": 60,
    "splits": {"profile": 200, "validation": 200, "test": 400},
}


def build_conflict(task: dict[str, Any], seed: int) -> tuple[dict[str, list[dict]], dict]:
    """Disjoint seeded splits of the knowledge-conflict items with short contexts (CPU budget)."""
    import random

    from attnkit.tasks.conflict import bigbench_conflict_rows

    rows, skipped = bigbench_conflict_rows(task)
    short = [r for r in rows if len(r["context"].split()) <= CONFLICT["max_context_words"]]
    random.Random(seed).shuffle(short)
    items, start = {}, 0
    for split, n in CONFLICT["splits"].items():
        items[split] = short[start : start + n]
        start += n
    info = {
        "source": f"bigbench {BIGBENCH_VERSION} sdist (PyPI), task {CONFLICT['task']}",
        "rows_in_task": len(task.get("examples", [])),
        "rows_not_in_question_context_shape": skipped,
        "rows_with_short_context": len(short),
        "max_context_words": CONFLICT["max_context_words"],
        "seed": seed,
    }
    return items, info


def token_stats(tok: Any, rows: list[dict]) -> dict[str, float]:
    lengths = [len(tok(r["prompt"])["input_ids"]) for r in rows]
    return {"mean": round(statistics.fmean(lengths), 1), "median": statistics.median(lengths), "max": max(lengths)}


def label_word_tokens(tok: Any, prompt_end: str, choices: list[str]) -> dict[str, list[str]]:
    """How each choice tokenizes as a continuation of a prompt ending in ``prompt_end``."""
    base = tok(prompt_end)["input_ids"]
    out = {}
    for c in choices:
        ids = tok(prompt_end + c)["input_ids"]
        if ids[: len(base)] != base:
            out[c] = ["<merges with the prompt>"]
        else:
            out[c] = tok.convert_ids_to_tokens(ids[len(base) :])
    return out


def check(paths: dict[str, Path], n: int) -> dict[str, dict]:
    from attnkit.models import load_model
    from attnkit.recipe.tasks import ChoiceTask
    from attnkit.tasks import run_choice

    t0 = time.perf_counter()
    model, tok = load_model()
    load_s = time.perf_counter() - t0
    out = {}
    for name, path in paths.items():
        t = time.perf_counter()
        result = run_choice(model, tok, ChoiceTask(data=str(path), limit=n, batch_size=8), progress=False)
        m = result.metrics
        out[name] = {**m, "seconds": round(time.perf_counter() - t, 1)}
        lo, hi = m["accuracy_ci95"]
        print(f"check {name}: accuracy {m['accuracy']:.3f} (95% CI {lo:.3f}-{hi:.3f}) on n={m['n']} test items, "
              f"{out[name]['seconds']:.1f} s")  # fmt: skip
    print(f"(model load {load_s:.1f} s)")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / ".cache" / "attnkit-data",
                    help="output folder; files go to OUT/data/ (default: <repo>/.cache/attnkit-data)")  # fmt: skip
    ap.add_argument(
        "--cache",
        type=Path,
        default=None,
        help="attnkit cache root for the sdist (default: $ATTNKIT_CACHE or ~/.cache/attnkit)",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--only", choices=sorted([*DATASETS, "conflict"]), action="append", help="build only this set (repeatable)"
    )
    ap.add_argument("--no-tokens", action="store_true", help="skip the tokenizer (no token lengths in the manifest)")
    ap.add_argument(
        "--check", type=int, default=0, metavar="N", help="score the first N test items of each set with SmolLM2"
    )
    args = ap.parse_args(argv)

    names = args.only or [*DATASETS, "conflict"]
    out = args.out / "data"
    t0 = time.perf_counter()
    paths = [DATASETS[n]["task"] if n in DATASETS else CONFLICT["task"] for n in names]
    tasks = bigbench_tasks(paths, cache=args.cache)  # one pass over the archive
    print(f"task files ready in {time.perf_counter() - t0:.1f} s")

    tok = None
    if not args.no_tokens:
        from transformers import AutoTokenizer

        from attnkit.catalog import DEFAULT_MODEL
        from attnkit.models import prepare_embedded

        tok = AutoTokenizer.from_pretrained(prepare_embedded(DEFAULT_MODEL))

    manifest_path = out / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    written: dict[str, Path] = {}
    for name in names:
        if name == "conflict":
            items, info = build_conflict(tasks[CONFLICT["task"]], args.seed)
            info["files"] = {}
            for split, rows in items.items():
                path = out / f"conflict_{split}.jsonl"
                write_jsonl(path, rows)
                entry = {"path": path.name, "n": len(rows)}
                if tok is not None:
                    entry["prompt_tokens"] = token_stats(
                        tok, [{"prompt": f"Context: {r['context']}\nQuestion: {r['question']}\nAnswer:"} for r in rows]
                    )
                info["files"][split] = entry
                print(f"  {path}: {len(rows)} items {entry.get('prompt_tokens', '')}")
            manifest[name] = info
            continue
        spec = DATASETS[name]
        items, info = build(name, spec, tasks[spec["task"]], args.seed)
        info["files"] = {}
        print(f"\n{name}: {info['source']}; {info['rows_with_labels']} rows with the wanted labels, "
              f"{info['dropped_over_max_words']} over {spec['max_words']} words left out, "
              f"{info['splits']['duplicates_dropped']} duplicate/ambiguous rows dropped")  # fmt: skip
        for split, rows in items.items():
            path = out / f"{name}_{split}.jsonl"
            write_jsonl(path, rows)
            written[f"{name}_{split}"] = path
            entry: dict[str, Any] = {"path": path.name, "n": len(rows), "labels": label_counts(rows)}
            if tok is not None:
                entry["prompt_tokens"] = token_stats(tok, rows)
            info["files"][split] = entry
            tokens = entry.get("prompt_tokens")
            tok_txt = (
                f"; prompt tokens mean {tokens['mean']} / median {tokens['median']} / max {tokens['max']}"
                if tokens
                else ""
            )
            print(f"  {path}: {len(rows)} items, labels {entry['labels']}{tok_txt}")
        print(f"  demonstration pool: {sum(info['splits']['pool'].values())} examples {info['splits']['pool']}")
        if tok is not None:
            info["choice_tokens"] = label_word_tokens(tok, spec["template"]["output_prefix"], info["choices"])
            print(f"  choice tokens: {info['choice_tokens']}")
        manifest[name] = info
    if args.check:
        results = check({k: v for k, v in written.items() if k.endswith("_test")}, args.check)
        for key, res in results.items():
            manifest[key.rsplit("_", 1)[0]]["check"] = {"model": "smollm2-135m-instruct", **res}
    manifest_path.write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    print(f"\nwrote {manifest_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
