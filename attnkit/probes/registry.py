"""The profilers by name: each one's config class and, imported only when it runs, its code.

Reading the registry imports neither torch nor transformers (the configs are torch-free and the
profiler modules are named by path), so ``attnkit profile --help`` builds every command at once.
A profiler module defines ``profile(model, tokenizer, config, [data,] *, model_id, output, progress)``
and, when it reads files named in its config before the model loads, ``read(config) -> data``.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import import_module
from types import ModuleType

from attnkit.probes.configs import (
    ActHeadsConfig,
    ConflictHeadsConfig,
    KVGatesConfig,
    PH3SweepConfig,
    ProfilerConfig,
    RazorHeadsConfig,
    RetrievalHeadsConfig,
    SinkDimsConfig,
)


@dataclass(frozen=True)
class Profiler:
    """A profiler: its command-line name, its config, and the module that runs it."""

    name: str
    config: type[ProfilerConfig]
    module: str
    reads: bool = False
    """Whether the module reads its inputs with ``read(config)`` before the model is needed."""

    def code(self) -> ModuleType:
        """The profiler's module (imports torch)."""
        return import_module(self.module)


PROFILERS: dict[str, Profiler] = {
    p.name: p
    for p in (
        Profiler("act-heads", ActHeadsConfig, "attnkit.probes.act_heads"),
        Profiler("sink-dims", SinkDimsConfig, "attnkit.probes.sink_dims", reads=True),
        Profiler("conflict-heads", ConflictHeadsConfig, "attnkit.probes.conflict_heads"),
        Profiler("ph3-sweep", PH3SweepConfig, "attnkit.probes.ph3_sweep"),
        Profiler("razor-heads", RazorHeadsConfig, "attnkit.probes.razor_heads"),
        Profiler("retrieval-heads", RetrievalHeadsConfig, "attnkit.probes.retrieval_heads", reads=True),
        Profiler("kv-gates", KVGatesConfig, "attnkit.probes.kv_gates", reads=True),
    )
}
