"""Sink inspection: which tokens soak up attention, in which layers and heads.

    from attnkit.sink_report import sink_stats
    report = sink_stats(model, tokenizer, "The cat sat on the mat.")
    print(report.table())          # sink tokens: position, text, heads, scores
    report.column_mean             # [layers, heads, tokens], the causal column mean
    report.to_json("sinks.json")

The statistic is ACT's causal column mean (:func:`attnkit.sinks.causal_column_mean`): the mean
attention a token receives from the queries that can see it. A token is a sink in a head when that
mean exceeds ``threshold`` (0.1, as in ACT's released code). The initial token is counted
separately: it is a sink in most heads of most models, and ACT and VAR leave it alone.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.colors import Normalize, PowerNorm
from matplotlib.figure import Figure

from attnkit.engine import attention
from attnkit.engine.attach import set_text_attention
from attnkit.files import write_atomic
from attnkit.heads import text_config
from attnkit.plots import (
    MAX_LABELLED_TOKENS,
    draw_head_map,
    draw_token_map,
    new_figure,
    save_figure,
)
from attnkit.sinks import causal_column_mean, select_sinks

__all__ = ["SinkReport", "SinkToken", "sink_stats"]

STATISTIC = "causal column mean: s_j = sum_i A_ij / #{i >= j} (ACT)"


@dataclass(frozen=True)
class SinkToken:
    """A token that is a sink in at least one (layer, head)."""

    position: int
    token: str
    heads: int  # in how many (layer, head) pairs its column mean exceeds the threshold
    max_score: float  # its largest column mean over all (layer, head) pairs
    mean_score: float  # its column mean averaged over all (layer, head) pairs


@dataclass(frozen=True, repr=False, eq=False)
class SinkReport:
    """Sink statistics of one text. ``column_mean`` is [layers, heads, tokens] (float32).

    The sink counts and the sink-token list are derived from ``column_mean`` and ``threshold``
    (frozen, so they cannot go stale).
    """

    tokens: list[str]
    token_ids: list[int]
    column_mean: np.ndarray
    threshold: float
    model: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "column_mean", np.asarray(self.column_mean, dtype=np.float32))
        if self.column_mean.ndim != 3 or self.column_mean.shape[2] != len(self.tokens):
            raise ValueError(
                f"column_mean must be [layers, heads, {len(self.tokens)} tokens], got {self.column_mean.shape}"
            )

    # ------------------------------------------------------------------ derived statistics

    @property
    def num_layers(self) -> int:
        return self.column_mean.shape[0]

    @property
    def num_heads(self) -> int:
        return self.column_mean.shape[1]

    @cached_property
    def sink_mask(self) -> np.ndarray:
        """bool [layers, heads, tokens]: column mean above the threshold (initial token included)."""
        return select_sinks(torch.from_numpy(self.column_mean), self.threshold, skip_first=False).numpy()

    @property
    def sink_counts(self) -> np.ndarray:
        """int [layers, heads]: sinks per head, the initial token included."""
        return self.sink_mask.sum(-1)

    @property
    def initial_sink(self) -> np.ndarray:
        """bool [layers, heads]: the initial token is a sink in that head."""
        return self.sink_mask[..., 0]

    @property
    def later_sink_counts(self) -> np.ndarray:
        """int [layers, heads]: sinks per head other than the initial token."""
        return self.sink_mask[..., 1:].sum(-1)

    @property
    def later_max(self) -> np.ndarray:
        """float [layers, heads]: the largest column mean of a non-initial token (0 for one token)."""
        later = self.column_mean[..., 1:]
        return later.max(-1) if later.shape[-1] else np.zeros(self.column_mean.shape[:2], np.float32)

    @cached_property
    def sinks(self) -> list[SinkToken]:
        """Every token that is a sink in at least one head, in position order."""
        heads = self.sink_mask.sum((0, 1))
        return [
            SinkToken(
                position=int(j),
                token=self.tokens[j],
                heads=int(heads[j]),
                max_score=float(self.column_mean[..., j].max()),
                mean_score=float(self.column_mean[..., j].mean()),
            )
            for j in np.flatnonzero(heads)
        ]

    # ------------------------------------------------------------------ display

    def summary(self) -> str:
        total = self.num_layers * self.num_heads
        later = self.later_sink_counts
        name = f" of {self.model}" if self.model else ""
        return (
            f"Sinks{name}: {len(self.tokens)} tokens, {self.num_layers} layers x {self.num_heads} heads = {total} heads, "
            f"threshold {self.threshold:g} on the causal column mean.\n"
            f"Initial token {self.tokens[0] if self.tokens else '-'!r} is a sink in "
            f"{int(self.initial_sink.sum())}/{total} heads (mean score {self._initial_mean():.3f}); "
            f"{int((later > 0).sum())}/{total} heads have a later sink ({int(later.sum())} in all)."
        )

    def table(self) -> str:
        """The sink tokens as a plain-text table, after a summary line."""
        total = self.num_layers * self.num_heads
        rows = [("pos", "token", "sink in heads", "max", "mean", "queries")]
        for s in self.sinks:
            rows.append(
                (
                    str(s.position),
                    repr(s.token),
                    f"{s.heads}/{total} ({100 * s.heads / total:.0f}%)",
                    f"{s.max_score:.3f}",
                    f"{s.mean_score:.3f}",
                    str(len(self.tokens) - s.position),
                )
            )
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        right = {0, 3, 4, 5}
        lines = [
            "  ".join(
                cell.rjust(w) if i in right else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths))
            ).rstrip()
            for row in rows
        ]
        if len(rows) == 1:
            lines.append("(no token exceeds the threshold in any head)")
        notes = (
            "max/mean: column mean over all heads; queries: how many queries see the token "
            "(few queries, e.g. near the end of a short text, make a noisy score)"
        )
        return self.summary() + "\n" + "\n".join(lines) + "\n" + notes

    def __repr__(self) -> str:
        return self.table()

    def _initial_mean(self) -> float:
        return float(self.column_mean[..., 0].mean()) if self.tokens else 0.0

    # ------------------------------------------------------------------ JSON

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "statistic": STATISTIC,
            "threshold": self.threshold,
            "num_layers": self.num_layers,
            "num_heads": self.num_heads,
            "tokens": self.tokens,
            "token_ids": self.token_ids,
            "sinks": [vars(s) for s in self.sinks],
            "initial_sink": self.initial_sink.tolist(),
            "sink_counts": self.sink_counts.tolist(),
            "later_sink_counts": self.later_sink_counts.tolist(),
            # float32 values written in their shortest exact form: loading gives the same array back
            "column_mean": self.column_mean.astype(str).astype(np.float64).tolist(),
            "meta": self.meta,
        }

    def to_json(self, path: str | Path | None = None) -> str:
        """The report as JSON (written to ``path`` when given). :meth:`from_json` reads it back."""
        text = json.dumps(self.to_dict())
        if path is not None:
            write_atomic(path, text + "\n")
        return text

    @classmethod
    def from_json(cls, source: str | Path) -> SinkReport:
        """Read a report from a JSON string or a file path. Derived fields are recomputed."""
        text = str(source)
        data = json.loads(Path(source).read_text() if not text.lstrip().startswith("{") else text)
        return cls(
            tokens=data["tokens"],
            token_ids=data["token_ids"],
            column_mean=np.array(data["column_mean"], dtype=np.float32).reshape(
                data["num_layers"], data["num_heads"], len(data["tokens"])
            ),
            threshold=data["threshold"],
            model=data.get("model", ""),
            meta=data.get("meta", {}),
        )


@torch.no_grad()
def sink_stats(model: Any, tokenizer: Any, text: str, *, threshold: float = 0.1, name: str | None = None) -> SinkReport:
    """Run ``model`` once on ``text`` (no padding) with eager attention maps; return its sinks.

    The model's attention implementation is switched to eager for that call if needed and always
    restored. ``name`` labels the report (default: the config's ``_name_or_path``).

    Memory: all attention maps are held at once (layers x heads x tokens^2 floats), so keep texts
    to a few thousand tokens. Sliding-window layers: the statistic divides by every later query,
    also those outside the window, so their scores come out low for keys far from the end.
    """
    if not text:
        raise ValueError("text is empty; pass at least one token of text")
    config = text_config(model.config)
    original = attention.untouched_implementation(config, "inspecting sinks")
    ids = tokenizer(text, return_tensors="pt")["input_ids"].to(model.device)
    if ids.numel() == 0:
        raise ValueError(f"the tokenizer turned {text!r} into no tokens; pass some text it can encode")
    kwargs: dict[str, Any] = {"output_attentions": True, "use_cache": False}
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        kwargs["logits_to_keep"] = 1  # full-vocabulary logits are not needed
    if original != "eager":
        set_text_attention(model, "eager")
    try:
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
    finally:
        if original != "eager":
            set_text_attention(model, original)
    attentions = out.attentions
    if not attentions or any(a is None for a in attentions):
        raise RuntimeError(f"{type(model).__name__} returned no attention maps with output_attentions=True")
    # each layer: [1, heads, T, T] -> [heads, T]; float32 whatever the model dtype
    column_mean = torch.stack([causal_column_mean(a.float())[0] for a in attentions]).cpu().numpy()
    token_ids = ids[0].tolist()
    return SinkReport(
        tokens=[tokenizer.decode([i]) for i in token_ids],
        token_ids=token_ids,
        column_mean=column_mean,
        threshold=threshold,
        model=name or str(getattr(config, "_name_or_path", "") or type(model).__name__),
        meta={"text": text, "attn_implementation": original, "dtype": str(next(model.parameters()).dtype)},
    )


def sink_heatmap(report: SinkReport, path: str | Path | None = None) -> Figure:
    """The sink overview of a :class:`SinkReport`, three panels side by side:

    (a) the initial token's column mean per head; (b) the largest column mean of any later token
    per head, with the number of later sinks written in the cells; (c) layers x tokens, the column
    mean averaged over heads. Color scales run 0-1; (c) uses a square-root scale so that small
    column means stay visible next to the initial token's.
    """
    layers, heads, count = report.column_mean.shape
    head_width = max(2.4, 0.28 * heads + 1.6)
    token_width = min(12.0, max(4.0, 0.3 * min(count, MAX_LABELLED_TOKENS) + 2.0))
    fig = new_figure(2 * head_width + token_width, max(4.5, 0.2 * layers + 2.6))
    grid = fig.add_gridspec(1, 3, width_ratios=[head_width, head_width, token_width])
    unit = Normalize(0.0, 1.0)
    initial = report.tokens[0] if report.tokens else ""
    draw_head_map(
        fig.add_subplot(grid[0]),
        report.column_mean[..., 0],
        f"(a) initial token {initial!r}:\ncolumn mean per head",
        cbar_label="column mean",
        norm=unit,
        mark=report.threshold,
    )
    draw_head_map(
        fig.add_subplot(grid[1]),
        report.later_max,
        "(b) later tokens: max column mean\nper head (cells: # later sinks)",
        cbar_label="max column mean, tokens 1..T-1",
        annotate=report.later_sink_counts,
        norm=unit,
        mark=report.threshold,
    )
    draw_token_map(
        fig.add_subplot(grid[2]),
        report.column_mean.mean(1),
        report.tokens,
        "(c) column mean per token, averaged over heads",
        cbar_label="column mean (sqrt scale)",
        norm=PowerNorm(0.5, 0.0, 1.0),
    )
    name = f"{report.model}: " if report.model else ""
    fig.suptitle(
        f"{name}attention sinks (causal column mean > {report.threshold:g}, red line on the colorbars)",
        fontsize=11,
    )
    return save_figure(fig, path)
