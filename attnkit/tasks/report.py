"""Report files of a recipe run (JSON, JSONL rows, the resolved recipe, Markdown) and a text summary."""

from __future__ import annotations

import json
from typing import Any

EXAMPLES = 3
"""How many prompt/completion pairs report.md shows for a generate task."""


def rows_file(run: str) -> str:
    """The JSONL file holding a run's rows: ``outputs.jsonl`` for attnkit, ``baseline_outputs.jsonl``."""
    return "outputs.jsonl" if run == "attnkit" else f"{run}_outputs.jsonl"


def fmt(value: Any) -> str:
    """A metric value for a table: floats to 4 significant digits, lists (intervals) bracketed."""
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return "[" + ", ".join(fmt(v) for v in value) + "]"
    return str(value)


def memory_label(memory: dict[str, Any]) -> str:
    return "peak CUDA memory (MiB)" if memory["measure"] == "cuda_max_memory_allocated" else "peak process RSS (MiB)"


def metric_table(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Run names and one row per metric (then seconds and peak memory), runs side by side."""
    runs = report["runs"]
    names = list(runs)
    keys = list(dict.fromkeys(k for run in runs.values() for k in run["metrics"]))
    table = [[key] + [fmt(runs[n]["metrics"].get(key, "")) for n in names] for key in keys]
    table.append(["seconds"] + [fmt(runs[n]["seconds"]) for n in names])
    memory = runs[names[0]]["memory"]
    table.append([memory_label(memory)] + [fmt(runs[n]["memory"]["peak_bytes"] / 2**20) for n in names])
    return names, table


def describe_methods(report: dict[str, Any]) -> list[str]:
    """``head_mask(heads={"14": [0, 3]}, scale=0.0)`` for each method of the resolved recipe."""
    out = []
    for config in report["recipe"]["methods"]:
        params = ", ".join(f"{k}={json.dumps(v)}" for k, v in config.items() if k != "method")
        out.append(f"{config['method']}({params})")
    return out


def describe_stats(stats: dict[str, Any]) -> str:
    """Counters on one line; per-layer tables (dicts) are left to :func:`kv_table`."""
    phases = ", ".join(f"{phase} {n}" for phase, n in stats.get("phases", {}).items())
    items = [
        f"{k}={fmt(v)}" + (f" ({phases})" if k == "calls" and phases else "")
        for k, v in stats.items()
        if not isinstance(v, dict)
    ]
    if stats.get("kv_bytes_before"):
        items.append(f"kv_kept={stats['kv_bytes_after'] / stats['kv_bytes_before']:.3f}")
    return ", ".join(items)


def kv_table(method_stats: dict[str, dict[str, Any]]) -> list[str]:
    """Markdown: KV bytes before and after compression per layer, measured from the cache tensors."""
    lines: list[str] = []
    for label, stats in method_stats.items():
        per_layer = stats.get("kv_bytes")
        if not isinstance(per_layer, dict):
            continue
        lines += ["", f"## KV cache of `{label}` (bytes summed over the run's prefills)", "",
                  "| layer | before | after | kept |", "|---|---|---|---|"]  # fmt: skip
        for layer, (before, after) in sorted(per_layer.items(), key=lambda kv: int(kv[0])):
            lines.append(f"| {layer} | {before} | {after} | {after / before if before else 1:.3f} |")
    return lines


def describe_comparison(comparison: dict[str, Any] | None) -> str | None:
    """One line: the paired accuracy (or ``metric``) difference, its CI, discordant pairs and McNemar's p."""
    if not comparison:
        return None
    low, high = comparison["difference_ci95"]
    return (
        f"attnkit - baseline {comparison.get('metric', 'accuracy')}: {comparison['accuracy_difference']:+.4f} "
        f"(95% CI {low:+.4f} to {high:+.4f}, "
        f"paired, n={comparison['n']}); items gained {comparison['gained']}, lost {comparison['lost']}; "
        f"McNemar exact p={comparison['mcnemar_p']:.3g}"
    )


def score_table(metrics: dict[str, Any]) -> list[str]:
    """Markdown: one row per task and the average, one column per length and overall (RULER's 0-100)."""
    families = [k for k in metrics if k not in ("n",) and "@" not in k]
    lengths = list(dict.fromkeys(k.split("@", 1)[1] for k in metrics if k.startswith("average@")))
    lines = ["| task | " + " | ".join(lengths) + " | all |", "|---" * (len(lengths) + 2) + "|"]
    ordered = [f for f in families if f != "average"] + ["average"]
    for family in ordered:
        scores = [metrics.get(f"{family}@{n}", float("nan")) for n in lengths]
        name = "**average**" if family == "average" else family
        lines.append(f"| {name} | " + " | ".join(f"{c:.1f}" for c in scores) + f" | {metrics[family]:.1f} |")
    return lines


def ruler_tables(report: dict[str, Any]) -> list[str]:
    """Markdown: each run's RULER scores, one row per task and the average, one column per length."""
    lines: list[str] = []
    for name, run in report["runs"].items():
        lines += ["", f"## RULER scores: {name} (0-100, string_match_all)", "", *score_table(run["metrics"])]
    return lines


def render_markdown(report: dict[str, Any], rows: dict[str, list[dict[str, Any]]]) -> str:
    """A short readable report: what ran, metrics side by side, method counters, a few examples."""
    names, table = metric_table(report)
    lines = [
        f"# attnkit report: {report['name']}",
        "",
        f"- model: `{report['model']}`",
        f"- task: {report['task']}",
        f"- methods: {', '.join(f'`{m}`' for m in describe_methods(report)) or 'none'}",
        f"- written {report['timestamp']} with attnkit {report['versions']['attnkit']}, "
        f"torch {report['versions']['torch']}, transformers {report['versions']['transformers']}",
        "",
        "## Metrics",
        "",
        "| metric | " + " | ".join(names) + " |",
        "|---" * (len(names) + 1) + "|",
        *("| " + " | ".join(row) + " |" for row in table),
        "",
        *([describe_comparison(report.get("comparison")), ""] if report.get("comparison") else []),
        "## Method stats (totals over the attnkit run)",
        "",
        *(f"- `{label}`: {describe_stats(s)}" for label, s in report["runs"]["attnkit"]["method_stats"].items()),
        *kv_table(report["runs"]["attnkit"]["method_stats"]),
    ]
    if report["task"] == "ruler":
        lines += ruler_tables(report)
    figures = [(name, f) for name, run in report["runs"].items() for f in run.get("files", []) if f.endswith(".png")]
    if figures:
        lines += ["", "## Figures", ""]
        lines += [f"![{name}: {f}]({f})" for name, f in figures]
    if report["task"] == "generate":
        lines += ["", f"## First {EXAMPLES} completions", ""]
        for i, row in enumerate(rows["attnkit"][:EXAMPLES]):
            lines += [f"**Prompt:** {row['prompt']}", ""]
            lines += [f"- {name}: {rows[name][i]['completion'].strip()!r}" for name in names]
            lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def summarize(report: dict[str, Any]) -> str:
    """A few plain-text lines for the terminal: model, methods, the metric table, where files went."""
    names, table = metric_table(report)
    width = max(len(row[0]) for row in table)
    columns = [max(len(name), *(len(row[i + 1]) for row in table)) for i, name in enumerate(names)]
    header = "  ".join([" " * width, *(name.rjust(w) for name, w in zip(names, columns))])
    body = ["  ".join([row[0].ljust(width), *(cell.rjust(w) for cell, w in zip(row[1:], columns))]) for row in table]
    stats = report["runs"]["attnkit"]["method_stats"]
    extra = [f for n in names for f in report["runs"][n].get("files", [])]
    files = ", ".join(["report.json", *(rows_file(n) for n in names), "recipe.yaml", *extra])
    return "\n".join(
        [
            f"recipe {report['name']!r}: {report['task']} on {report['model']}",
            f"methods: {', '.join(describe_methods(report)) or 'none'}",
            header,
            *body,
            *([describe_comparison(report.get("comparison"))] if report.get("comparison") else []),
            *(f"{label}: {describe_stats(s)}" for label, s in stats.items()),
            f"report: {report['output_dir']}/report.md (and {files})",
        ]
    )
