"""What every profiler shares: configs and registry, the command built from a config, resumable
progress; and, per profiler, an interrupted run that resumes to the artifact of an uninterrupted
one without recomputing its finished units."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from pydantic import BaseModel
from typer.testing import CliRunner

from attnkit.probes import act_heads, conflict_heads, kv_gates, ph3_sweep, razor_heads, retrieval_heads, sink_dims
from attnkit.probes.configs import (
    ActHeadsConfig,
    ConflictHeadsConfig,
    KVGatesConfig,
    PH3SweepConfig,
    ProfileError,
    RazorHeadsConfig,
    RetrievalHeadsConfig,
    make_config,
)
from attnkit.probes.progress import Progress
from attnkit.probes.registry import PROFILERS
from tests.factory import tiny_model
from tests.test_kv_profilers import HAY, NEEDLES
from tests.test_ph3 import MERGES, conflict_rows, write
from tests.test_tasks import char_tokenizer

ROOT = Path(__file__).resolve().parent.parent


pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- configs and the CLI


def test_configs_and_registry_import_neither_torch_nor_transformers():
    script = (
        "import sys, attnkit.probes.registry; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


@pytest.mark.parametrize("name", sorted(PROFILERS))
def test_every_config_field_is_a_described_option_with_the_config_default(name):
    from attnkit.cli import profile
    from tests.test_cli import typer_params

    profiler = PROFILERS[name]
    assert profiler.config.model_config["frozen"] and profiler.config.model_config["extra"] == "forbid"
    callback = next(c.callback for c in profile.app.registered_commands if c.name == name)
    params = {p.name: p for p in typer_params(callback)}
    for field_name, field in profiler.config.model_fields.items():
        option = params[field_name]
        assert field.description and option.help == field.description
        default = field.default if not isinstance(field.default, list) else ",".join(map(str, field.default))
        assert option.required if field.is_required() else option.default == default, field_name
    assert callable(profiler.code().profile) and hasattr(profiler.code(), "read") == profiler.reads


def test_help_shows_the_choices_of_a_literal_field():
    from attnkit.cli import app

    result = CliRunner().invoke(app, ["profile", "retrieval-heads", "--help"], terminal_width=200)
    assert result.exit_code == 0 and "[query|kv]" in result.output


def test_config_errors_name_the_setting_and_the_choices():
    with pytest.raises(ProfileError, match="level 'layer': use query or kv"):
        make_config(RetrievalHeadsConfig, level="layer")
    with pytest.raises(ProfileError, match="--depths 'a,b': write lengths like 1000,2000"):
        make_config(RetrievalHeadsConfig, option=True, depths="a,b")
    assert RetrievalHeadsConfig(depths="3", lengths="100,200").depths == [0.0, 0.5, 1.0]
    assert KVGatesConfig(ratio=0).ratio is None  # 0 on the command line: always `local`


# ----------------------------------------------------------------------------- progress


def test_progress_keeps_tensors_resumes_and_starts_afresh_for_another_setup(tmp_path):
    """(Another setup's progress is set aside, not deleted: tests/test_robustness.py.)"""
    path = tmp_path / "x.progress.jsonl"
    first = Progress(path, {"a": 1})
    first.record("layer 0", {"score": 0.5, "hidden": torch.arange(3.0)})
    first.record("layer 1", {"score": 0.25, "hidden": torch.ones(2)})
    first.forget("layer 0")
    assert sorted(p.name for p in (tmp_path / "x.progress").iterdir()) == ["layer_1.pt"]
    with path.open("a") as f:
        f.write('{"key": "layer 2", "sco')  # a line cut short by a kill
    again = Progress(path, {"a": 1})
    assert list(again.done) == ["layer 0", "layer 1"] and "hidden" not in again.done["layer 0"]
    assert again.done["layer 1"]["score"] == 0.25 and torch.equal(again.done["layer 1"]["hidden"], torch.ones(2))
    other = Progress(path, {"a": 2})
    other.record("layer 0", {"score": 1.0})
    assert other.done["layer 0"]["score"] == 1.0 and not (tmp_path / "x.progress").exists()
    assert [json.loads(line) for line in path.read_text().splitlines()] == [
        {"setup": {"a": 2}},
        {"score": 1.0, "key": "layer 0"},
    ]


# ----------------------------------------------------------------------------- interrupted runs


class Interrupted(Exception):
    """Raised in place of recording a unit: the run stops as if killed just before writing it."""


@contextmanager
def interrupted_after(monkeypatch: pytest.MonkeyPatch, units: int):
    """Inside the block a run stops when it would record its ``units + 1``-th unit."""
    original = Progress.record
    count = [0]

    def record(self: Progress, key: str, values: dict[str, Any]) -> None:
        if count[0] == units:
            raise Interrupted(key)
        original(self, key, values)
        count[0] += 1

    monkeypatch.setattr(Progress, "record", record)
    with pytest.raises(Interrupted):
        yield
    monkeypatch.setattr(Progress, "record", original)


def counting(monkeypatch: pytest.MonkeyPatch, module: Any, name: str) -> list[int]:
    """Count calls of ``module.name`` from now on."""
    original = getattr(module, name)
    calls = [0]

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return calls


def comparable(value: Any) -> Any:
    """An artifact (or a sweep) without what only says how long this run took or what it reused."""
    if isinstance(value, BaseModel):
        value = value.model_dump()
    if isinstance(value, dict):
        return {
            k: comparable(v)
            for k, v in value.items()
            if not (isinstance(k, str) and ("seconds" in k or k == "resumed_items"))
        }
    if isinstance(value, list):
        return [comparable(v) for v in value]
    return value


def resumes(monkeypatch, tmp_path, run, after: int, *units: tuple[Any, str]) -> tuple[Any, list[int]]:
    """``run(output)`` uninterrupted, then stopped after ``after`` units and run again: the two
    artifacts agree. Returns the resumed one and how often it called each of ``units`` (module, name)."""
    whole = run(tmp_path / "whole" / "artifact.json")
    output = tmp_path / "resumed" / "artifact.json"
    with interrupted_after(monkeypatch, after):
        run(output)
    calls = [counting(monkeypatch, *unit) for unit in units]
    resumed = run(output)
    assert comparable(resumed) == comparable(whole)
    return resumed, [c[0] for c in calls]


def test_act_heads_resume(monkeypatch, tmp_path):
    model = tiny_model("llama-gqa", num_hidden_layers=5)
    items = [{"prompt": f"Text {i}: {'ab' * (i % 5)} so", "choices": [" x", " y"], "answer": i % 2} for i in range(12)]
    data = write(tmp_path / "dev.jsonl", items)

    def run(output):
        return act_heads.profile(
            model,
            char_tokenizer(),
            ActHeadsConfig(data=data, limit=12, threshold=0.05, batch_size=5),
            model_id="tiny",
            output=output,
            progress=False,
        )

    # 2 whole layers, then 2 x 4 single heads; stopped after both layers and 2 heads
    _, (candidates,) = resumes(monkeypatch, tmp_path, run, 4, (act_heads, "apply"))
    assert candidates == 6


def test_sink_dims_resume(monkeypatch, tmp_path):
    model = tiny_model("qwen2-gqa", num_hidden_layers=4)
    config = sink_dims.SinkDimsConfig(samples=6, tau=5.0)

    def run(output):
        return sink_dims.profile(
            model, char_tokenizer(), config, model_id="tiny", output=output, progress=False
        ).artifact

    _, (texts,) = resumes(monkeypatch, tmp_path, run, 3, (sink_dims, "text_statistics"))
    assert texts == 3


def test_conflict_heads_resume(monkeypatch, tmp_path):
    model = tiny_model("llama-gqa")
    data = write(tmp_path / "conflict.jsonl", conflict_rows(12, relations=True))

    def run(output):
        return conflict_heads.profile(
            model,
            char_tokenizer(merges=MERGES),
            ConflictHeadsConfig(data=data, batch_size=5),
            model_id="tiny",
            output=output,
            progress=False,
        )

    resumed, (items,) = resumes(monkeypatch, tmp_path, run, 6, (conflict_heads, "frozen_logit_diffs"))
    assert resumed.parameters["resumed_items"] == 6 and items == resumed.parameters["items_used"] - 6


def test_ph3_sweep_resume(monkeypatch, tmp_path):
    model = tiny_model("llama-gqa")
    tokenizer = char_tokenizer(merges=MERGES)
    data = write(tmp_path / "conflict.jsonl", conflict_rows(12, relations=True))
    heads = tmp_path / "conflict.json"
    conflict_heads.profile(
        model, tokenizer, ConflictHeadsConfig(data=data), model_id="tiny", output=heads, progress=False
    )

    def run(output):
        output.parent.mkdir(parents=True, exist_ok=True)
        if not output.exists():
            shutil.copy(heads, output)
        return ph3_sweep.profile(model, tokenizer, PH3SweepConfig(heads=output, data=data, ks=(1, 2)), progress=False)

    # untouched, then k = 1, 2 for each direction; stopped after the untouched run and one k
    sweep, (runs,) = resumes(monkeypatch, tmp_path, run, 2, (ph3_sweep, "evaluate"))
    assert runs == 3 and set(sweep["chosen"]) == {"context", "memory"}


@pytest.mark.parametrize("arch", ["llama-gqa", "gemma3-gqa"])
def test_razor_heads_resume(monkeypatch, tmp_path, arch):
    """Llama-family decoders resume from the hidden state after the last finished layer (and keep
    only that one); others run the whole model again but score only the unfinished layers."""
    model = tiny_model(arch)

    def run(output):
        return razor_heads.profile(
            model,
            char_tokenizer(),
            RazorHeadsConfig(block=16, repeats=3),
            model_id="tiny",
            output=output,
            progress=False,
        )

    _, (scored, first_layer) = resumes(
        monkeypatch, tmp_path, run, 1, (razor_heads, "echo_induction"), (model.model.layers[0], "forward")
    )
    assert scored == 2  # layers 1 and 2
    assert first_layer == (0 if arch == "llama-gqa" else 1)  # resumed at layer 1, or the whole model again
    assert not list((tmp_path / "resumed" / "artifact.progress").glob("*.pt"))  # a finished run needs no state


def test_retrieval_heads_resume(monkeypatch, tmp_path):
    model = tiny_model("llama-gqa")

    def run(output):
        return retrieval_heads.profile(
            model,
            char_tokenizer(),
            RetrievalHeadsConfig(
                lengths=[100, 150], depths=[0.0, 1.0], max_new_tokens=5, chat=False, min_recall=None, threshold=0.0
            ),
            retrieval_heads.NeedleData(HAY, tuple(NEEDLES)),
            model_id="tiny",
            output=output,
            progress=False,
        )

    _, (prompts,) = resumes(monkeypatch, tmp_path, run, 2, (retrieval_heads, "sample_scores"))
    assert prompts == 2


def kv_gates_run(model):
    def run(output):
        return kv_gates.profile(
            model,
            char_tokenizer(),
            KVGatesConfig(
                lengths=[100],
                depths=[0.2, 0.8],
                sink=2,
                local=8,
                ratio=None,
                fraction=0.25,
                steps=5,
                save_every=2,
                reply_tokens=6,
                min_recall=-1.0,
                chat=False,
            ),
            retrieval_heads.NeedleData(HAY, tuple(NEEDLES)),
            model_id="tiny",
            output=output,
            progress=False,
        )

    return run


def test_kv_gates_resume_while_reading_the_prompts(monkeypatch, tmp_path):
    run = kv_gates_run(tiny_model("llama-gqa"))
    _, (replies,) = resumes(monkeypatch, tmp_path, run, 1, (kv_gates, "generate_replies"))
    assert replies == 1


def test_kv_gates_resume_while_training(monkeypatch, tmp_path):
    """Stopped after the prompts and 2 of 5 steps: the resumed run trains steps 3-5 from the saved
    gates and Adam moments, to the same gates, history and answer NLLs."""
    run = kv_gates_run(tiny_model("llama-gqa"))
    resumed, (replies, steps) = resumes(
        monkeypatch, tmp_path, run, 3, (kv_gates, "generate_replies"), (kv_gates, "step")
    )
    assert replies == 0 and steps == 3
    assert [entry["step"] for entry in resumed.parameters["history"]] == [0, 1, 2, 3, 4]
    assert [p.name for p in (tmp_path / "resumed" / "artifact.progress").glob("*.pt")] == ["step_5.pt"]
