"""``attnkit profile sink-dims``: find a model's sink dimensions for VAR's massive-activation detector.

VAR calls a token a sink at layer ``l`` when ``phi(x) = max_{d in dims} |x_d / rms(x)| > tau`` on
the layer's input hidden state ``x`` (``attnkit.sinks.massive_activation``). The dims are model
constants; the reference code hard-codes them for LLaMA-2, and the ``Bostoncake/VisAttnSink`` fork
finds them for a new model: rank dims by activation on high-attention tokens over ~30 samples,
keep the dims that are consistent across layers, and check precision/recall at ``tau = 20``.
This module does that, with each choice spelled out:

1. **Attention-defined sinks, per (layer, token).** Each text runs alone (no padding) with eager
   attention maps. A token is a sink *of layer l* when its causal column mean
   (:func:`attnkit.sinks.causal_column_mean`, ACT's statistic) exceeds ``threshold`` (0.1) in at
   least ``head_fraction`` (half) of layer l's heads. Labels are per layer because the detector
   is: VAR checks ``phi`` on layer l's input to pick the sinks of layer l's attention, and a token
   can be a sink in some layers only (in SmolLM2 a mid-sentence " the" is a sink in every head of
   layers 3-10 and in none after). Only layers ``first_layer`` (2) to ``L - 1`` are used, as in
   VAR. Tokens seen by fewer than ``min_queries`` (5) queries are left out (their column mean is a
   handful of values, e.g. the last token's is its attention to itself); the first token is
   always kept.
2. **Ranking.** For every sink (layer, token), each of the ``per_token_top`` (3) largest
   ``|x_d / rms(x)|`` dims gets a hit if it is *massive*: it holds at least ``min_share`` (5%) of
   the token's squared norm, i.e. ``|x_d / rms(x)| >= sqrt(min_share * hidden_size)``. (Without that
   bar, the runners-up next to one dominant dim are small dims that win by default.) A dim's *score* is the share of sink (layer, token)s it is a hit on; its *layer
   fraction* is the share of layers in which it is a hit on at least half of that layer's sinks.
   Dims are ranked by score; the chosen ``dims`` are the best ``top`` (4) with a layer fraction of
   at least ``min_layer_fraction`` (0.5) -- fewer when fewer dims are consistent.
3. **Validation** at the (layer, token) level: precision and recall of ``phi(x) > tau`` against the
   attention-defined sinks, for the chosen dims together and for each ranked dim alone; once
   more without the first token (the later, "hidden" sinks ACT and VAR care about); and a sweep
   of ``tau`` giving the value that maximises F1. Note ``|x_d / rms(x)| <= sqrt(hidden_size)``
   always (24 for SmolLM2-135M, 64 for LLaMA-2-7B), so ``tau = 20`` cannot fire on models
   narrower than 400.

    from attnkit.probes.configs import SinkDimsConfig
    from attnkit.probes.sink_dims import load_sink_dims, profile
    result = profile(model, tokenizer, SinkDimsConfig())     # texts: None, the builtin texts
    print(result.summary())
    result.save("heads/sink-dims-smollm2.json")              # + result.plot("....png")
    artifact = load_sink_dims("heads/sink-dims-smollm2.json", model.config)
    SinkRedistribute(sink_dims=artifact.dims, tau=artifact.recommended_tau, ...)
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

import attnkit
from attnkit.files import write_atomic
from attnkit.heads import config_fingerprint, text_config
from attnkit.plots import new_figure, save_figure, ticks
from attnkit.probes.attention_maps import eager_attention
from attnkit.probes.configs import ProfileError, SinkDimsConfig
from attnkit.probes.run import ProfileRun, digest
from attnkit.sinks import causal_column_mean

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "BUILTIN_TEXTS",
    "DimScore",
    "Metrics",
    "SinkDimsArtifact",
    "SinkDimsError",
    "SinkDimsResult",
    "Texts",
    "load_sink_dims",
    "profile",
    "read",
    "read_texts",
]

METHOD = "sink-dims"
#: Largest |x_d / rms| values kept per (layer, token). ``phi`` computed from them is exact whenever
#: it exceeds ``sqrt(hidden / KEEP)`` (at most that many squares of size > D / KEEP fit in D).
KEEP = 64
#: Ranked dims written to the artifact (scores, single-dim precision/recall, heatmap columns).
RANKED = 16
#: Step of the tau sweep.
TAU_STEP = 0.25
#: F1 at ``tau`` within this of the best F1 counts as "tau works for this model".
TAU_SLACK = 0.02

BUILTIN_TEXTS: tuple[str, ...] = (
    "The cat sat on the windowsill all afternoon, watching the sparrows argue over a crust of bread.",
    "In 1905, Albert Einstein published four papers that changed physics. The first explained the "
    "photoelectric effect, and the second gave a theory of Brownian motion.",
    "To make a simple tomato sauce, warm olive oil in a pan, add a sliced clove of garlic, and cook it "
    "until it just turns golden. Pour in a tin of crushed tomatoes, season with salt, and let it simmer "
    "for twenty minutes.",
    "Q: What is the capital of Australia?\nA: Canberra, not Sydney, although many people guess Sydney.",
    "The meeting has been moved to Thursday at 3 pm. Please bring the quarterly figures and the draft "
    "of the new hiring plan.",
    "Photosynthesis converts light energy into chemical energy. Plants take in carbon dioxide and "
    "water, and with the help of sunlight they produce glucose and release oxygen.",
    "She opened the letter slowly. It was from her grandmother, written in the careful, looping hand "
    "she remembered from birthday cards, and it began with an apology.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))  # prints 5",
    "The river rose overnight, and by morning the lower fields were under water. Farmers moved their "
    "cattle to the hills while volunteers filled sandbags along the main road.",
    "Dear customer, thank you for your order. Your package will arrive within three to five working "
    "days. If you have any questions, reply to this email.",
    "A prime number is a natural number greater than 1 that has no divisors other than 1 and itself. "
    "The first few primes are 2, 3, 5, 7, 11 and 13.",
    "It was the last train of the night, and the carriage was empty except for a man in a grey coat "
    "who was reading a newspaper upside down.",
    "Mix the flour and the sugar. Add two eggs, one at a time. Stir in the melted butter. Bake at 180 "
    "degrees for 25 minutes.",
    "The Roman Empire reached its greatest extent under Trajan in 117 AD, stretching from Britain in "
    "the north-west to Mesopotamia in the east.",
    '"Are you coming?" he asked.\n"In a minute," she said, without looking up from her book.',
    "Regular exercise improves sleep, lowers blood pressure and reduces the risk of heart disease. "
    "Even a brisk twenty-minute walk each day makes a measurable difference.",
    "The committee reviewed all twelve proposals and selected three for funding. Each of the chosen "
    "projects will receive a grant for two years.",
    "Water boils at 100 degrees Celsius at sea level, but at the top of a high mountain it boils at a "
    "lower temperature because the air pressure is lower.",
    "Shopping list: milk, eggs, bread, apples, coffee, and a new sponge for the kitchen.",
    "The old lighthouse keeper climbed the spiral stairs every evening to light the lamp, even after "
    "the ships had stopped coming.",
    "Machine learning models learn patterns from data. A model trained on too little data may "
    "memorise its examples instead of learning rules that generalise.",
    "Turn left at the bakery, walk two blocks, and the museum is on your right, just past the fountain.",
    "The orchestra tuned their instruments as the lights dimmed. A hush fell over the hall, and the "
    "conductor raised his baton.",
    "Volcanoes form where magma from deep inside the Earth reaches the surface. Some erupt "
    "explosively, while others release slow rivers of lava.",
    "I am writing to apply for the position of assistant librarian. I have three years of experience "
    "cataloguing books and running reading groups for children.",
    "The score was tied at the end of regular time, so the match went to penalties. The young "
    "goalkeeper saved two of them, and the crowd erupted.",
    "Honey never spoils. Archaeologists have found pots of honey in ancient Egyptian tombs that were "
    "still perfectly edible after thousands of years.",
    "Step 1: unplug the router. Step 2: wait thirty seconds. Step 3: plug it back in and wait for the "
    "lights to turn green.",
    "The forest was quiet after the snowfall. Only the soft crunch of boots and the distant call of a "
    "crow broke the silence.",
    "Why is the sky blue? Sunlight is scattered by the molecules in the air, and blue light, having a "
    "shorter wavelength, is scattered much more than red light.",
)


class SinkDimsError(ProfileError):
    """A sink-dims artifact or input that cannot be used; the message says why and what to do."""


class DimScore(BaseModel):
    """One ranked dim: how often it is massive on sinks, and how well it detects them alone."""

    model_config = ConfigDict(extra="forbid")
    dim: int
    score: float = Field(
        description="share of sink (layer, token)s on which the dim is a hit: among the per_token_top largest |x_d/rms| and massive"
    )
    layer_fraction: float = Field(
        description="share of layers where it is a hit on at least half of that layer's sinks"
    )
    consistent: bool
    sink_mean: float = Field(description="mean |x_d/rms| on sink (layer, token)s")
    ordinary_mean: float = Field(description="mean |x_d/rms| on the other (layer, token)s")
    precision: float = Field(description="of phi > tau with this dim alone")
    recall: float
    f1: float


class Metrics(BaseModel):
    """Precision/recall of ``massive_activation(h, dims) > tau`` against attention-defined sinks."""

    model_config = ConfigDict(extra="forbid")
    tau: float
    precision: float
    recall: float
    f1: float
    true_positives: int
    false_positives: int
    false_negatives: int


class SinkDimsArtifact(BaseModel):
    """Sink dims with provenance, written by ``attnkit profile sink-dims`` (not a head list)."""

    model_config = ConfigDict(extra="forbid")
    attnkit_version: str
    model_id: str
    config_fingerprint: str
    method: Literal["sink-dims"] = METHOD
    parameters: dict[str, Any] = Field(default_factory=dict)
    data: str = ""
    samples: int = 0
    seed: int | None = None
    hidden_size: int
    layers: list[int] = Field(description="layers whose input hidden states were used")
    dims: list[int] = Field(description="the chosen sink dims")
    tau: float
    validation: Metrics = Field(description="chosen dims at tau, every (layer, token)")
    validation_later: Metrics = Field(description="chosen dims at tau, tokens after the first")
    best: Metrics = Field(description="chosen dims at the tau that maximises F1")
    tau_ok: bool = Field(description=f"F1 at tau is within {TAU_SLACK} of the best F1")
    ranked: list[DimScore]
    sink_instances: int = Field(description="(layer, token)s that are attention sinks")
    first_token_instances: int = Field(description="of those, on the first token")
    ordinary_instances: int
    sink_tokens: list[tuple[str, int]] = Field(
        default_factory=list, description="most frequent later sink tokens, (layer, token) counts"
    )
    tau_sweep: list[tuple[float, float, float, float]] = Field(
        default_factory=list, description="(tau, precision, recall, f1)"
    )
    sink_mean: list[list[float]] = Field(
        default_factory=list, description="layers x ranked dims: mean |x_d/rms| on sinks"
    )
    ordinary_mean: list[list[float]] = Field(default_factory=list, description="layers x ranked dims, other tokens")
    seconds: float = 0.0
    notes: list[str] = Field(default_factory=list)

    @property
    def precision(self) -> float:
        return self.validation.precision

    @property
    def recall(self) -> float:
        return self.validation.recall

    @property
    def recommended_tau(self) -> float:
        """``tau`` when it works for this model, else the F1-maximising one."""
        return self.tau if self.tau_ok else self.best.tau

    def save(self, path: str | Path) -> Path:
        """Write the artifact as JSON, atomically."""
        return write_atomic(path, self.model_dump_json(indent=1) + "\n")


def load_sink_dims(path: str | Path, model_config: Any, *, allow_foreign: bool = False) -> SinkDimsArtifact:
    """Read a sink-dims artifact and check it was made for this model (``model_config``: a config or
    a model). ``allow_foreign`` turns a mismatch into a warning; dims beyond the hidden size are
    always refused."""
    path = Path(path)
    if not path.is_file():
        raise SinkDimsError(f"sink-dims artifact {str(path)!r} not found; run `attnkit profile sink-dims` to make one")
    try:
        artifact = SinkDimsArtifact.model_validate_json(path.read_text())
    except ValueError as err:
        raise SinkDimsError(f"{path} is not a sink-dims artifact: {err}") from err
    config = text_config(getattr(model_config, "config", model_config))
    fingerprint = config_fingerprint(config)
    model_id = str(getattr(config, "_name_or_path", "") or "")
    hidden = getattr(config, "hidden_size", None)
    if artifact.config_fingerprint != fingerprint or (hidden is not None and artifact.hidden_size != hidden):
        message = (
            f"artifact {path} was made for {artifact.model_id!r} (fingerprint {artifact.config_fingerprint}), "
            f"not this model {model_id!r} (fingerprint {fingerprint}); profile this model, "
            "or pass allow_foreign=True to use it anyway"
        )
        if not allow_foreign:
            raise SinkDimsError(message)
        warnings.warn(message, stacklevel=2)
    bad = [d for d in artifact.dims if hidden is not None and not 0 <= d < hidden]
    if bad:
        raise SinkDimsError(f"artifact {path}: dims {bad} do not exist in this model (hidden size {hidden})")
    return artifact


def read_texts(path: str | Path) -> list[str]:
    """The non-blank lines of a text file, one text each (a literal ``\\n`` stays as written)."""
    path = Path(path)
    if not path.is_file():
        raise SinkDimsError(f"texts file {str(path)!r} not found; pass a text file with one text per line")
    texts = [line.rstrip("\r\n") for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not texts:
        raise SinkDimsError(f"texts file {path} has no non-blank lines; write one text per line")
    return texts


# ----------------------------------------------------------------------------- the result


@dataclass(repr=False, eq=False)
class SinkDimsResult:
    """What a sink-dims run found (:func:`profile`): the artifact, plus the full per-layer arrays.

    ``hit_rate``, ``sink_mean`` and ``ordinary_mean`` are [len(layers), hidden] (float64):
    the share of a layer's sinks on which a dim is a hit, and mean |x_d/rms| on sinks / others.
    """

    artifact: SinkDimsArtifact
    hit_rate: np.ndarray
    sink_mean: np.ndarray
    ordinary_mean: np.ndarray

    @property
    def dims(self) -> list[int]:
        return self.artifact.dims

    @property
    def tau(self) -> float:
        return self.artifact.tau

    @property
    def precision(self) -> float:
        return self.artifact.precision

    @property
    def recall(self) -> float:
        return self.artifact.recall

    def save(self, path: str | Path) -> Path:
        """Write the JSON artifact (read it back with :func:`load_sink_dims`)."""
        return self.artifact.save(path)

    def plot(self, path: str | Path | None = None) -> Figure:
        """Layers x ranked dims heatmaps (sinks, other tokens) and P/R/F1 against tau; a PNG at ``path``."""
        return plot_sink_dims(self.artifact, path)

    def summary(self) -> str:
        return summarize(self.artifact)

    def __repr__(self) -> str:
        return self.summary()


def _metrics(tau: float, pred: np.ndarray, label: np.ndarray) -> Metrics:
    tp = int((pred & label).sum())
    fp = int((pred & ~label).sum())
    fn = int((~pred & label).sum())
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return Metrics(
        tau=round(float(tau), 4),
        precision=round(precision, 4),
        recall=round(recall, 4),
        f1=round(f1, 4),
        true_positives=tp,
        false_positives=fp,
        false_negatives=fn,
    )


def _phi(values: np.ndarray, indices: np.ndarray, dims: Sequence[int]) -> np.ndarray:
    """``max_{d in dims} |x_d/rms|`` from the kept top values (0 where no dim is among them)."""
    if not len(dims):
        return np.zeros(len(values), dtype=np.float32)
    return np.where(np.isin(indices, list(dims)), values, 0.0).max(1)


def _sweep(
    phi: np.ndarray, label: np.ndarray, low: float, high: float
) -> tuple[list[tuple[float, float, float, float]], float]:
    """(tau, precision, recall, f1) on a grid from ``low`` to ``high``; and the F1-maximising tau
    (the middle of the first plateau of best F1)."""
    start = math.ceil(low / TAU_STEP) * TAU_STEP
    grid = np.arange(start, high + 1e-9, TAU_STEP)
    if grid.size == 0:
        grid = np.array([start])
    pos = np.sort(phi[label])
    neg = np.sort(phi[~label])
    tp = len(pos) - np.searchsorted(pos, grid, side="right")
    fp = len(neg) - np.searchsorted(neg, grid, side="right")
    precision = np.where(tp + fp > 0, tp / np.maximum(tp + fp, 1), 0.0)
    recall = tp / max(len(pos), 1)
    f1 = np.where(precision + recall > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-12), 0.0)
    best = int(np.argmax(f1))
    end = best
    while end + 1 < len(grid) and f1[end + 1] >= f1[best] - 1e-12:
        end += 1
    tau = float(grid[(best + end) // 2])
    rows = [
        (round(float(t), 4), round(float(p), 4), round(float(r), 4), round(float(f), 4))
        for t, p, r, f in zip(grid, precision, recall, f1, strict=True)
    ]
    return rows, tau


@dataclass(frozen=True)
class Texts:
    """The texts a run reads and where they came from: ``source`` is a file, or None for the
    builtin texts (``builtin``) or the caller's."""

    items: tuple[str, ...] = BUILTIN_TEXTS
    source: str | None = None
    builtin: bool = True

    def used(self, samples: int | None) -> list[str]:
        """The first ``samples`` texts (all for None) that are not blank."""
        return [t for t in self.items[:samples] if t and t.strip()]

    def describe(self, samples: int | None) -> str:
        """The artifact's ``data`` line."""
        if self.source is not None:
            first = len(self.items) if samples is None else min(samples, len(self.items))
            return f"{self.source}: first {first} of {len(self.items)} non-blank lines"
        if self.builtin:
            return (
                f"builtin: attnkit.probes.sink_dims.BUILTIN_TEXTS (first {len(self.used(samples))} of "
                f"{len(BUILTIN_TEXTS)} English texts)"
            )
        return f"{len(self.used(samples))} texts passed by the caller"


def read(config: SinkDimsConfig) -> Texts:
    """The texts the config names: its ``texts`` file, or the builtin texts."""
    if config.texts is None:
        return Texts()
    return Texts(tuple(read_texts(config.texts)), str(config.texts), builtin=False)


@torch.no_grad()
def profile(
    model: Any,
    tokenizer: Any,
    config: SinkDimsConfig,
    data: Texts | None = None,
    *,
    model_id: str = "",
    output: Path | None = None,
    progress: bool = True,
) -> SinkDimsResult:
    """Find the sink dims of ``model`` on ``data`` (default: the texts the config names); see the
    module doc. The artifact is written to ``output`` when given.

    Each text runs alone, unpadded and cut to ``max_tokens``, with eager attention (switched for the
    call and restored), and is one unit of progress. ``model_id`` labels the artifact (default: the
    config's ``_name_or_path``).
    """
    data = data or read(config)
    texts = data.used(config.samples)
    if not texts:
        raise SinkDimsError("no texts; pass at least one non-empty text (or no data: the config's texts)")
    cfg = text_config(model.config)
    hidden, num_layers = int(cfg.hidden_size), int(cfg.num_hidden_layers)
    layers = list(range(min(config.first_layer, num_layers - 1), num_layers))
    keep = min(KEEP, hidden)
    if config.per_token_top > keep:
        raise SinkDimsError(f"per_token_top {config.per_token_top} is more than the {keep} values kept per token")
    model_id = model_id or str(getattr(cfg, "_name_or_path", "") or type(model).__name__)
    with eager_attention(model, "profiling sink dims"):
        run = ProfileRun(
            "sink-dims", model, config, model_id=model_id, output=output, progress=progress, data=digest(texts)
        )
        units = run.each(
            "texts",
            {f"text {i}": text for i, text in enumerate(texts)},
            lambda text: text_statistics(model, tokenizer, text, config, layers, keep),
        )
    stats = Statistics.of([unit for unit in units.values() if unit["tokens"]], len(layers), hidden)
    hits = stats.hits(config)
    findings = choose_dims(stats, hits, config, keep)
    artifact = SinkDimsArtifact(
        attnkit_version=attnkit.__version__,
        model_id=model_id,
        config_fingerprint=config_fingerprint(cfg),
        parameters={**findings.pop("parameters"), "dtype": str(next(model.parameters()).dtype).replace("torch.", "")},
        data=data.describe(config.samples),
        samples=len(texts),
        seed=None,  # deterministic: the first N texts, greedy forward passes
        hidden_size=hidden,
        layers=layers,
        seconds=run.seconds(),
        **findings,
    )
    run.save(artifact)
    return SinkDimsResult(artifact, mean_per_layer(hits, stats.sink_count), stats.sink_mean(), stats.ordinary_mean())


def text_statistics(
    model: Any, tokenizer: Any, text: str, config: SinkDimsConfig, layers: list[int], keep: int
) -> dict[str, Any]:
    """One text's sinks per (layer, token), the largest ``keep`` values of |x_d / rms(x)| of each
    eligible token and the per-layer sums of |x_d / rms(x)| on sinks and on other tokens."""
    device = getattr(model, "device", None) or next(model.parameters()).device
    ids = tokenizer(text, return_tensors="pt")["input_ids"][:, : config.max_tokens].to(device)
    if ids.numel() == 0:
        return {"tokens": 0}
    kwargs: dict[str, Any] = {"output_attentions": True, "output_hidden_states": True, "use_cache": False}
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        kwargs["logits_to_keep"] = 1
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
    if not out.attentions or any(a is None for a in out.attentions) or not out.hidden_states:
        raise RuntimeError(f"{type(model).__name__} returned no attention maps or hidden states")
    count = ids.shape[1]
    # [layers, tokens]: share of each layer's heads in which the token is a sink
    share = torch.stack(
        [(causal_column_mean(out.attentions[layer].float())[0] > config.threshold).float().mean(0) for layer in layers]
    )
    label = share >= config.head_fraction - 1e-9
    positions = torch.arange(count, device=ids.device)
    eligible = ((count - positions) >= config.min_queries) | (positions == 0)
    x = torch.stack([out.hidden_states[layer][0] for layer in layers]).float()  # [layers, tokens, hidden]
    z = (x / x.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()).abs()
    is_sink = (label & eligible).float()
    is_ordinary = (~label & eligible).float()
    top_values, top_indices = z[:, eligible].topk(keep, dim=-1)  # [layers, eligible, keep]
    kept = positions[eligible]
    sink_tokens: Counter[str] = Counter()
    token_ids = ids[0].tolist()
    for position, layers_as_sink in zip(kept.tolist(), label[:, eligible].sum(0).tolist(), strict=True):
        if position > 0 and layers_as_sink:
            sink_tokens[tokenizer.decode([token_ids[position]])] += int(layers_as_sink)
    nl = len(layers)
    return {
        "tokens": count,
        "sink_tokens": list(sink_tokens.items()),
        "sink_sum": torch.einsum("lt,ltd->ld", is_sink, z).double().cpu(),
        "ordinary_sum": torch.einsum("lt,ltd->ld", is_ordinary, z).double().cpu(),
        "sink_count": is_sink.sum(1).double().cpu(),
        "ordinary_count": is_ordinary.sum(1).double().cpu(),
        "values": top_values.reshape(-1, keep).cpu().float(),
        "indices": top_indices.reshape(-1, keep).cpu().int(),
        "labels": label[:, eligible].reshape(-1).cpu(),
        "layer_of": torch.arange(nl).repeat_interleave(len(kept)),
        "position_of": kept.cpu().repeat(nl),
    }


@dataclass
class Statistics:
    """The texts' statistics together: per-layer sums over sinks and other tokens, and one row per
    eligible (layer, token) with its top values, their dims, its label, layer and position."""

    sink_sum: np.ndarray
    ordinary_sum: np.ndarray
    sink_count: np.ndarray
    ordinary_count: np.ndarray
    values: np.ndarray
    indices: np.ndarray
    labels: np.ndarray
    layer_of: np.ndarray
    position_of: np.ndarray
    sink_tokens: Counter[str]

    @classmethod
    def of(cls, units: list[dict[str, Any]], layers: int, hidden: int) -> Statistics:
        if not units:
            raise SinkDimsError("the tokenizer turned every text into no tokens; pass texts it can encode")
        sums = {name: np.zeros((layers, hidden)) for name in ("sink_sum", "ordinary_sum")}
        counts = {name: np.zeros(layers) for name in ("sink_count", "ordinary_count")}
        sink_tokens: Counter[str] = Counter()
        for unit in units:
            for name, total in (*sums.items(), *counts.items()):
                total += unit[name].numpy()
            sink_tokens.update(dict(unit["sink_tokens"]))
        rows = {
            name: np.concatenate([unit[name].numpy() for unit in units])
            for name in ("values", "indices", "labels", "layer_of", "position_of")
        }
        rows["labels"] = rows["labels"].astype(bool)
        return cls(**sums, **counts, **rows, sink_tokens=sink_tokens)

    def hits(self, config: SinkDimsConfig) -> np.ndarray:
        """[layers, hidden]: how many of each layer's sinks a dim is a hit on (among the sink's
        ``per_token_top`` largest values, and massive)."""
        hits = np.zeros_like(self.sink_sum)
        sink_rows = np.flatnonzero(self.labels)
        top = config.per_token_top
        if sink_rows.size:
            massive = self.values[sink_rows, :top] ** 2 >= config.min_share * self.sink_sum.shape[1]
            rows = np.repeat(self.layer_of[sink_rows], top).reshape(-1, top)
            np.add.at(hits, (rows[massive], self.indices[sink_rows, :top][massive]), 1)
        return hits

    def sink_mean(self) -> np.ndarray:
        return mean_per_layer(self.sink_sum, self.sink_count)

    def ordinary_mean(self) -> np.ndarray:
        return mean_per_layer(self.ordinary_sum, self.ordinary_count)


def mean_per_layer(total: np.ndarray, count: np.ndarray) -> np.ndarray:
    """``total`` [layers, hidden] per unit of ``count`` [layers] (0 where the count is 0)."""
    return np.divide(total, count[:, None], out=np.zeros_like(total), where=count[:, None] > 0)


def choose_dims(stats: Statistics, hits: np.ndarray, config: SinkDimsConfig, keep: int) -> dict[str, Any]:
    """Rank the dims by their ``hits``, choose the consistent best ``top`` and validate them against
    the sinks: the artifact's fields other than its provenance."""
    hit_rate = mean_per_layer(hits, stats.sink_count)
    hidden = hits.shape[1]
    layers_with_sinks = int((stats.sink_count > 0).sum())
    score = hits.sum(0) / max(stats.sink_count.sum(), 1)
    layer_fraction = (hit_rate >= 0.5).sum(0) / max(layers_with_sinks, 1)
    order = np.lexsort((-layer_fraction, -score))  # by score, then layer fraction
    order = [int(d) for d in order if score[d] > 0] or [int(order[0])]
    consistent = [d for d in order if layer_fraction[d] >= config.min_layer_fraction]
    notes: list[str] = []
    dims = consistent[: config.top]
    if not stats.labels.any():
        notes.append("no attention sinks found: no (layer, token) passes the column-mean test; dims are not meaningful")
    if not dims:
        dims = order[:1]
        notes.append(
            f"no dim is a hit on most sinks in at least {config.min_layer_fraction:.0%} of the layers; "
            f"kept the best-scored dim {dims[0]} alone"
        )
    elif len(consistent) < config.top:
        notes.append(f"only {len(consistent)} dim(s) consistent across layers (asked for up to {config.top})")
    tau = config.tau
    ceiling = math.sqrt(hidden)
    floor = math.sqrt(hidden / keep) if keep < hidden else 0.0
    if tau >= ceiling:
        notes.append(
            f"tau {tau:g} >= sqrt(hidden_size) = {ceiling:.2f}, the largest value |x_d/rms(x)| can take: "
            "nothing can pass it; use the best tau"
        )
    label = stats.labels
    phi = _phi(stats.values, stats.indices, dims)
    later = stats.position_of > 0
    validation = _metrics(tau, phi > tau, label)
    sweep, best_tau = _sweep(phi, label, floor, ceiling)
    best = _metrics(best_tau, phi > best_tau, label)
    ranked = []
    for d in order[: max(RANKED, config.top)]:
        alone = _metrics(tau, _phi(stats.values, stats.indices, [d]) > tau, label)
        ranked.append(
            DimScore(
                dim=d,
                score=round(float(score[d]), 4),
                layer_fraction=round(float(layer_fraction[d]), 4),
                consistent=bool(layer_fraction[d] >= config.min_layer_fraction),
                sink_mean=round(float(stats.sink_sum[:, d].sum() / max(stats.sink_count.sum(), 1)), 3),
                ordinary_mean=round(float(stats.ordinary_sum[:, d].sum() / max(stats.ordinary_count.sum(), 1)), 3),
                precision=alone.precision,
                recall=alone.recall,
                f1=alone.f1,
            )
        )
    shown = [r.dim for r in ranked]
    parameters = {
        **config.model_dump(exclude={"texts", "samples"}),
        "statistic": "phi = max_{d in dims} |x_d / rms(x)| on each layer's input hidden state (VAR)",
        "sinks": f"(layer, token) with causal column mean > {config.threshold:g} in >= {config.head_fraction:g} of the layer's heads",
    }
    return dict(
        parameters=parameters,
        dims=dims,
        tau=tau,
        validation=validation,
        validation_later=_metrics(tau, phi[later] > tau, label[later]),
        best=best,
        tau_ok=validation.f1 >= best.f1 - TAU_SLACK,
        ranked=ranked,
        sink_instances=int(label.sum()),
        first_token_instances=int((label & ~later).sum()),
        ordinary_instances=int((~label).sum()),
        sink_tokens=stats.sink_tokens.most_common(10),
        tau_sweep=sweep,
        sink_mean=np.round(stats.sink_mean()[:, shown], 3).tolist(),
        ordinary_mean=np.round(stats.ordinary_mean()[:, shown], 3).tolist(),
        notes=notes,
    )


# ----------------------------------------------------------------------------- display


def _fmt(m: Metrics) -> str:
    if not (m.true_positives or m.false_positives or m.false_negatives):
        return "no attention sinks and no detections"
    return (
        f"precision {m.precision:.3f}, recall {m.recall:.3f}, F1 {m.f1:.3f} "
        f"(tp {m.true_positives}, fp {m.false_positives}, fn {m.false_negatives})"
    )


def summarize(a: SinkDimsArtifact) -> str:
    """A readable multi-line summary of an artifact."""
    first, last = a.layers[0], a.layers[-1]
    lines = [
        f"Sink dims of {a.model_id}: {a.samples} texts, layers {first}-{last} (inputs), hidden size {a.hidden_size}, "
        f"{a.seconds:.1f} s.",
        f"Attention sinks: {a.sink_instances} (layer, token)s, {a.first_token_instances} on the first token; "
        f"{a.ordinary_instances} others.",
    ]
    if a.sink_tokens:
        lines.append("Later sinks most often on: " + ", ".join(f"{t!r} {n}" for t, n in a.sink_tokens[:6]))
    lines.append("")
    rows = [("dim", "score", "layers", "sink |x/rms|", "other |x/rms|", f"alone@{a.tau:g} P", "R", "")]
    for r in a.ranked[:8]:
        rows.append(
            (
                str(r.dim),
                f"{r.score:.3f}",
                f"{r.layer_fraction:.2f}",
                f"{r.sink_mean:.2f}",
                f"{r.ordinary_mean:.2f}",
                f"{r.precision:.3f}",
                f"{r.recall:.3f}",
                "chosen" if r.dim in a.dims else ("" if r.consistent else "-"),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines += ["  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    lines.append(
        "(score: share of sinks on which the dim is among the largest and massive; layers: share of layers where it "
        "is on most sinks; '-': not consistent across layers; |x/rms|: means; P, R: phi > tau with the dim alone)"
    )
    lines.append("")
    lines.append(f"Chosen dims {a.dims}, tau {a.tau:g}: {_fmt(a.validation)}")
    lines.append(f"  later tokens only: {_fmt(a.validation_later)}")
    lines.append(f"  best tau {a.best.tau:g}: {_fmt(a.best)}")
    if a.tau_ok:
        lines.append(f"  tau {a.tau:g} works for this model (F1 within {TAU_SLACK} of the best).")
    else:
        lines.append(f"  tau {a.tau:g} does not work well for this model; use tau {a.best.tau:g}.")
    lines.append(f"  (|x_d/rms| is at most sqrt({a.hidden_size}) = {math.sqrt(a.hidden_size):.2f})")
    lines += [f"note: {n}" for n in a.notes]
    return "\n".join(lines)


def plot_sink_dims(a: SinkDimsArtifact, path: str | Path | None = None) -> Figure:
    """(a) mean |x_d/rms| on sinks, layers x ranked dims (chosen dims starred); (b) the same on the
    other tokens, same color scale; (c) precision, recall and F1 of the chosen dims against tau."""
    from matplotlib.colors import Normalize

    sink = np.asarray(a.sink_mean, dtype=float)
    other = np.asarray(a.ordinary_mean, dtype=float)
    dims = [r.dim for r in a.ranked]
    labels = [f"{d}*" if d in a.dims else str(d) for d in dims]
    width = max(3.5, 0.3 * len(dims) + 1.8)
    fig = new_figure(2 * width + 4.5, max(4.0, 0.16 * len(a.layers) + 2.4))
    grid = fig.add_gridspec(1, 3, width_ratios=[width, width, 4.5])
    norm = Normalize(0.0, max(float(sink.max(initial=0)), float(other.max(initial=0)), 1e-6))
    for k, (values, title) in enumerate(((sink, "(a) sink tokens"), (other, "(b) other tokens"))):
        ax = fig.add_subplot(grid[k])
        image = ax.imshow(values, aspect="auto", interpolation="nearest", cmap="magma", norm=norm)
        ax.set_title(f"{title}: mean |x_d / rms(x)|", fontsize=10)
        ax.set_xticks(np.arange(len(dims)))
        ax.set_xticklabels(labels, rotation=90, fontsize=7)
        ax.set_xlabel("dim (ranked; * chosen)")
        rows = ticks(len(a.layers))
        ax.set_yticks(rows)
        ax.set_yticklabels([str(a.layers[i]) for i in rows], fontsize=7)
        ax.set_ylabel("layer (input hidden state)")
        cbar = fig.colorbar(image, ax=ax, pad=0.03, aspect=40)
        cbar.ax.tick_params(labelsize=7)
    ax = fig.add_subplot(grid[2])
    if a.tau_sweep:
        sweep = np.asarray(a.tau_sweep, dtype=float)
        for column, name in ((1, "precision"), (2, "recall"), (3, "F1")):
            ax.plot(sweep[:, 0], sweep[:, column], label=name)
    ax.axvline(a.tau, color="red", linewidth=1, linestyle="--", label=f"tau {a.tau:g}")
    ax.axvline(a.best.tau, color="black", linewidth=1, linestyle=":", label=f"best {a.best.tau:g}")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("tau")
    ax.set_title(f"(c) dims {a.dims}: phi > tau vs attention sinks", fontsize=10)
    ax.legend(fontsize=7)
    ax.tick_params(labelsize=7)
    fig.suptitle(f"{a.model_id}: sink dims ({a.samples} texts)", fontsize=11)
    return save_figure(fig, path)
