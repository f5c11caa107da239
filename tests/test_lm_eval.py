"""lm-evaluation-harness on the embedded SmolLM2, offline: a ten-item local multiple-choice task
(tests/data/lm_eval/) scored untouched and with an attnkit recipe, through the Python route
(``attnkit.apply`` around a model handed to lm-eval's HFLM), the registered ``attnkit`` model type
and the ``attnkit-lm-eval`` command line. Skipped only where lm-eval is not installed; CI installs
it (``scripts/setup.sh --test`` adds the ``lmeval`` extra)."""

import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")

import attnkit  # noqa: E402
from attnkit.engine.plan import PLANS  # noqa: E402
from attnkit.models import load_model  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "data" / "lm_eval"
RECIPE = str(DATA / "recipe.yaml")
TASK = "attnkit_tiny_mc"
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def offline_at_root(monkeypatch):
    """No network, and the task's data path (relative to the repository root) resolves."""
    for key, value in OFFLINE.items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(ROOT)


@pytest.fixture(scope="module")
def smollm2():
    return load_model(device="cpu")


@pytest.fixture(scope="module")
def tasks():
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(DATA))


def evaluate(lm, tasks) -> dict:
    return lm_eval.simple_evaluate(model=lm, tasks=[TASK], task_manager=tasks, log_samples=True)


def choice_logliks(results: dict) -> list[list[float]]:
    """Each item's log-likelihood per choice, in document order."""
    samples = sorted(results["samples"][TASK], key=lambda s: s["doc_id"])
    return [[float(resp[0][0]) for resp in s["resps"]] for s in samples]


def assert_fired(stats: dict, forward_calls: int) -> None:
    assert stats["act"]["calls"] == forward_calls > 0
    assert stats["act"]["sinks_found"] > 0 and stats["act"]["heads_calibrated"] > 0
    assert stats["head_mask"]["calls"] == forward_calls
    assert stats["head_mask"]["head_outputs_scaled"] == 2 * forward_calls


@pytest.fixture(scope="module")
def python_route(smollm2, tasks):
    """Untouched and attnkit scores through lm-eval's own HFLM, with the forward calls counted."""
    from lm_eval.models.huggingface import HFLM

    model, tok = smollm2
    untouched = evaluate(HFLM(pretrained=model, tokenizer=tok, batch_size=1), tasks)
    calls = []
    counter = model.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        with attnkit.apply(model, RECIPE) as handle:
            patched = evaluate(HFLM(pretrained=model, tokenizer=tok, batch_size=1), tasks)
            stats = handle.stats(total=True)
    finally:
        counter.remove()
    return untouched, patched, stats, len(calls)


def test_python_route_scores_both_and_methods_fire(python_route) -> None:
    untouched, patched, stats, forward_calls = python_route
    for results in (untouched, patched):
        assert results["results"][TASK]["sample_len"] == 10
        assert 0.0 <= results["results"][TASK]["acc,none"] <= 1.0
    assert untouched["results"][TASK]["acc,none"] >= 0.5  # the untouched model knows these facts
    assert_fired(stats, forward_calls)
    base, act = choice_logliks(untouched), choice_logliks(patched)
    assert max(abs(a - b) for row_a, row_b in zip(act, base) for a, b in zip(row_a, row_b)) > 1e-2


def test_registered_model_type_matches_python_route(python_route, tasks) -> None:
    """``model="attnkit"`` goes through lm-eval's registry; a batch of 4 gives the batch-1 scores
    (lm-eval right-pads loglikelihood batches without a mask, which ACT would otherwise count)."""
    from attnkit.integrations.lm_eval import AttnkitLM

    assert lm_eval.api.registry.get_model("attnkit") is AttnkitLM
    args = {"pretrained": "smollm2-135m-instruct", "recipe": RECIPE, "device": "cpu", "batch_size": 4}
    results = lm_eval.simple_evaluate(
        model="attnkit", model_args=args, tasks=[TASK], task_manager=tasks, log_samples=True
    )
    _, patched, _, _ = python_route
    assert results["results"][TASK]["acc,none"] == patched["results"][TASK]["acc,none"]
    got, want = choice_logliks(results), choice_logliks(patched)
    assert max(abs(a - b) for row_a, row_b in zip(got, want) for a, b in zip(row_a, row_b)) < 1e-4
    info = results["config"]["attnkit"]
    assert info["recipe"] == "lm_eval_test" and [m["method"] for m in info["methods"]] == ["act", "head_mask"]
    assert info["stats"]["act"]["calls"] > 0 and info["stats"]["act"]["sinks_found"] > 0
    assert info["stats"]["head_mask"]["head_outputs_scaled"] == 2 * info["stats"]["head_mask"]["calls"]


def test_without_recipe_the_model_is_untouched(smollm2) -> None:
    """No ``recipe`` in the model arguments: the untouched baseline, nothing applied."""
    from attnkit.integrations.lm_eval import AttnkitLM

    lm = AttnkitLM(pretrained="smollm2-135m-instruct", device="cpu")
    assert lm.handle.methods == [] and lm.attnkit_info()["stats"] == {}
    ids = smollm2[1]("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(lm.model(ids).logits, smollm2[0](ids).logits)
    lm.close()
    assert not lm.handle.active


@pytest.fixture(autouse=True, scope="module")
def nothing_left_applied():
    """Every AttnkitLM's recipe is removed once the LM is gone: no plan outlives its model."""
    yield
    gc.collect()
    assert not PLANS, PLANS


def test_command_line(tmp_path, python_route) -> None:
    """``python -m attnkit.integrations.lm_eval`` (``attnkit-lm-eval``): lm-eval's own command line
    with ``--model attnkit``; the score and the stats land in its results file."""
    _, patched, _, _ = python_route
    cmd = [sys.executable, "-m", "attnkit.integrations.lm_eval", "--model", "attnkit", "--device", "cpu"]
    cmd += ["--model_args", f"pretrained=smollm2-135m-instruct,recipe={RECIPE}", "--tasks", TASK]
    cmd += ["--include_path", str(DATA), "--output_path", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, **OFFLINE}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "attnkit after loglikelihood: act:" in proc.stderr
    (path,) = tmp_path.rglob("results_*.json")
    results = json.loads(path.read_text())
    assert results["results"][TASK]["acc,none"] == patched["results"][TASK]["acc,none"]
    stats = results["config"]["attnkit"]["stats"]
    assert stats["act"]["calls"] > 0 and stats["act"]["sinks_found"] > 0
    assert stats["head_mask"]["head_outputs_scaled"] == 2 * stats["head_mask"]["calls"]
