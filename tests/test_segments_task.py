"""The ``segments`` task (PINE's evidence) on a tiny random Llama with the offline character tokenizer."""

from __future__ import annotations

import json
import random

import pytest
import torch

import attnkit
from attnkit.methods import Pine
from attnkit.recipe import RecipeError, load_recipe
from attnkit.recipe.tasks import SegmentsTask, parse_task
from attnkit.tasks import TaskDataError, run_recipe, summarize
from attnkit.tasks.needle import exact_match
from attnkit.tasks.segments import gold_positions, mentioned, orders_of, run_segments, with_gold_at
from tests.factory import tiny_model
from tests.test_tasks import CHAT_TEMPLATE, char_tokenizer

JUDGE = [
    {
        "prefix": "Which is right?\n",
        "segments": ["A: 2+2=4.", "B: 2+2=5."],
        "suffix": "Answer:",
        "answer": 0,
        "choices": [" A", " B"],
    },
    {
        "prefix": "Pick one.\n",
        "segments": ["A: sky is blue", "B: sky is red", "C: sky is green!"],
        "suffix": "Pick:",
        "answer": 2,
        "choices": [" A", " B", " C"],
    },
    {"prefix": "Odd one?\n", "segments": ["cat", "dog", "car"], "suffix": "It is", "answer": 2},  # choices: the texts
]
RECORDS = [
    {
        "prefix": "Records:\n",
        "segments": [f"{key} = {value}" for key, value in pairs],
        "suffix": f"Value of {pairs[gold][0]}?",
        "answer": gold,
        "choices": [value for _, value in pairs],
    }
    for pairs, gold in (
        ([("ab", "12"), ("cd", "34"), ("ef", "56")], 1),
        ([("gh", "78"), ("ij", "90"), ("kl", "13"), ("mn", "57")], 0),
    )
]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama-gqa")


def write_jsonl(path, items) -> str:
    path.write_text("".join((item if isinstance(item, str) else json.dumps(item)) + "\n" for item in items))
    return str(path)


def recipe(data: str, **task) -> attnkit.recipe.Recipe:
    return load_recipe(
        {"name": "segments", "methods": [{"method": "pine"}], "task": {"kind": "segments", "data": data, **task},
         "baseline": True}
    )  # fmt: skip


# ----------------------------------------------------------------------------- orders and positions


def test_orders_and_positions():
    rng = random.Random(0)
    assert orders_of(3, "all", rng) == [(0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0)]
    assert orders_of(3, 3, rng) == [(0, 1, 2), (1, 2, 0), (2, 0, 1)], "the listed order, then its rotations"
    assert orders_of(2, 5, rng) == [(0, 1), (1, 0)], "at most k! orders"
    five = orders_of(4, 7, random.Random(1))
    assert len(set(five)) == 7 and five[:4] == [(0, 1, 2, 3), (1, 2, 3, 0), (2, 3, 0, 1), (3, 0, 1, 2)]
    assert five == orders_of(4, 7, random.Random(1)), "seeded"
    assert gold_positions(20, [0, 0.5, 1]) == [0, 10, 19]
    assert gold_positions(5, [0, 0.5, 1]) == [0, 2, 4]
    assert gold_positions(3, "all") == [0, 1, 2]
    assert with_gold_at(5, 3, 0) == (3, 0, 1, 2, 4) and with_gold_at(5, 0, 4) == (1, 2, 3, 4, 0)
    assert mentioned("The value is 34, not 12.", ["12", "34"]) == 1
    assert mentioned("The value is 341.", ["12", "34"]) is None


# ----------------------------------------------------------------------------- choice mode


def test_choice_mode_under_pine_is_consistent_and_the_baseline_depends_on_the_order(model, tokenizer, tmp_path):
    data = write_jsonl(tmp_path / "judge.jsonl", JUDGE)
    report = run_recipe(recipe(data, batch_size=5), out_dir=tmp_path / "out", progress=False, model=model,
                        tokenizer=tokenizer)  # fmt: skip
    base, pine = report["runs"]["baseline"]["metrics"], report["runs"]["attnkit"]["metrics"]
    for metrics in (base, pine):
        assert metrics["n"] == 2 + 6 + 6 and metrics["items"] == 3
        assert metrics["orders_per_item"] == pytest.approx(14 / 3)
        for key in ("accuracy", "consistency", "accuracy@gold_pos1", "accuracy@gold_pos3"):
            low, high = metrics[f"{key}_ci95"]
            assert 0 <= low <= metrics[key] + 1e-9 and metrics[key] <= high + 1e-9 and high <= 1
        assert sum(metrics[f"picked@pos{p}"] for p in (1, 2, 3)) == pytest.approx(1)
        assert sum(metrics[f"picked@choice{c}"] for c in (1, 2, 3)) == pytest.approx(1)
    assert pine["consistency"] == 1.0 and pine["pine"] and not base["pine"]
    stats = report["runs"]["attnkit"]["method_stats"]["pine"]
    assert stats["rows_with_segments"] == 2 * 2 + 6 * 3 + 6 * 3 and stats["segment_queries"] > 0
    assert stats["reordered_queries"] > 0
    rows = {run: [json.loads(line) for line in (tmp_path / "out" / f).read_text().splitlines()]
            for run, f in (("baseline", "baseline_outputs.jsonl"), ("attnkit", "outputs.jsonl"))}  # fmt: skip
    for item in range(3):
        pine_rows = [r for r in rows["attnkit"] if r["item"] == item]
        base_rows = [r for r in rows["baseline"] if r["item"] == item]
        assert len({tuple(r["order"]) for r in pine_rows}) == len(pine_rows), "every order differs"
        for row in pine_rows[1:]:  # the same content gets the same score in every order
            assert row["scores"] == pytest.approx(pine_rows[0]["scores"], abs=1e-4)
        spread = max(abs(a - b) for r in base_rows[1:] for a, b in zip(r["scores"], base_rows[0]["scores"]))
        assert spread > 1e-3, "the untouched model depends on the order"
    assert report["comparison"]["n"] == 14
    assert "consistency" in summarize(report) and "accuracy@gold_pos2" in (tmp_path / "out" / "report.md").read_text()
    assert model.config._attn_implementation == "sdpa", "the handle was removed"


def test_choice_batches_equal_one_by_one_and_a_chat_template_is_used(model, tmp_path):
    tokenizer = char_tokenizer(CHAT_TEMPLATE)
    data = write_jsonl(tmp_path / "judge.jsonl", JUDGE)
    task = {"kind": "segments", "data": data, "orders": 2}
    runs = []
    for size in (1, 7):
        pine = Pine()
        with attnkit.apply(model, [pine]):
            runs.append(run_segments(model, tokenizer, SegmentsTask(**task, batch_size=size), progress=False,
                                     methods=[pine]))  # fmt: skip
    assert runs[0].metrics["consistency"] == 1.0 and runs[0].metrics["n"] == 6
    for one, batched in zip(runs[0].rows, runs[1].rows, strict=True):
        assert one["scores"] == pytest.approx(batched["scores"], abs=1e-4)
    plain = run_segments(model, tokenizer, SegmentsTask(**task, chat_template=False), progress=False)
    assert not plain.metrics["pine"]
    assert plain.rows[0]["scores"] != pytest.approx(runs[0].rows[0]["scores"], abs=1e-3), "the template changed it"


def test_without_pine_the_segments_are_just_text(model, tokenizer, tmp_path):
    data = write_jsonl(tmp_path / "judge.jsonl", JUDGE)
    methods = [{"method": "head_mask", "heads": {1: [0]}, "scale": 0.0}]
    report = run_recipe(
        load_recipe({"methods": methods, "task": {"kind": "segments", "data": data}, "baseline": True}),
        out_dir=tmp_path / "out", progress=False, model=model, tokenizer=tokenizer,
    )  # fmt: skip
    assert not report["runs"]["attnkit"]["metrics"]["pine"]
    assert report["runs"]["attnkit"]["method_stats"]["head_mask"]["head_outputs_scaled"] > 0
    direct = run_segments(model, tokenizer, SegmentsTask(data=data), progress=False)
    assert [r["scores"] for r in direct.rows] == [
        json.loads(line)["scores"] for line in (tmp_path / "out" / "baseline_outputs.jsonl").read_text().splitlines()
    ], "the baseline is the untouched model on the same inputs"


# ----------------------------------------------------------------------------- generate mode


def test_generate_mode_moves_the_gold_and_pine_answers_the_same_everywhere(model, tokenizer, tmp_path):
    data = write_jsonl(tmp_path / "kv.jsonl", RECORDS)
    report = run_recipe(recipe(data, mode="generate", max_new_tokens=5, batch_size=3), out_dir=tmp_path / "out",
                        progress=False, model=model, tokenizer=tokenizer)  # fmt: skip
    base, pine = report["runs"]["baseline"]["metrics"], report["runs"]["attnkit"]["metrics"]
    for metrics in (base, pine):
        assert metrics["n"] == 3 + 4 and metrics["items"] == 2 and metrics["items@k3"] == metrics["items@k4"] == 1
        assert {f"accuracy@k3/pos{p}" for p in (1, 2, 3)} <= set(metrics)
        assert {f"accuracy@k4/pos{p}_ci95" for p in (1, 2, 3, 4)} <= set(metrics)
        assert 0 <= metrics["spread@k4"] <= 1 and 0 <= metrics["other_segment@k3"] <= 1
    assert pine["same_reply@k3"] == pine["same_reply@k4"] == 1.0
    assert pine["spread@k3"] == pine["spread@k4"] == 0.0
    assert report["runs"]["attnkit"]["method_stats"]["pine"]["rows_with_segments"] == 7
    rows = [json.loads(line) for line in (tmp_path / "out" / "outputs.jsonl").read_text().splitlines()]
    assert [(r["k"], r["gold_position"], r["order"]) for r in rows[:3]] == [
        (3, 1, [1, 0, 2]), (3, 2, [0, 1, 2]), (3, 3, [0, 2, 1])
    ]  # fmt: skip
    assert all(r["expected"] == RECORDS[r["item"]]["choices"][r["answer"]] for r in rows)
    assert all(r["correct"] == exact_match(r["output"], r["expected"]) for r in rows)


def test_generate_positions_as_fractions(model, tokenizer, tmp_path):
    data = write_jsonl(tmp_path / "kv.jsonl", RECORDS)
    task = SegmentsTask(data=data, mode="generate", positions=[0, 1], max_new_tokens=2, limit=1)
    result = run_segments(model, tokenizer, task, progress=False)
    assert [r["gold_position"] for r in result.rows] == [1, 3]
    assert set(result.metrics) >= {"accuracy@k3/pos1", "accuracy@k3/pos3", "spread@k3"}


# ----------------------------------------------------------------------------- errors


def test_data_errors_name_the_file_and_the_fix(model, tokenizer, tmp_path):
    bad = write_jsonl(
        tmp_path / "bad.jsonl",
        [
            JUDGE[0],
            {**JUDGE[0], "segments": ["only one"]},
            {**JUDGE[0], "answer": 2},
            {**JUDGE[0], "choices": ["A"]},
            {**JUDGE[0], "choices": ["A", "A"]},
            {k: v for k, v in JUDGE[0].items() if k != "suffix"},
        ],
    )
    with pytest.raises(TaskDataError) as err:
        run_segments(model, tokenizer, SegmentsTask(data=bad), progress=False)
    message = str(err.value)
    for line, fix in ((2, "at least 2 strings"), (3, "index of the gold segment"), (4, "one string per segment"),
                      (5, "make them differ"), (6, '"suffix" must be a string')):  # fmt: skip
        assert f"{bad}:{line}: " in message and fix in message, (line, message)
    assert f"{bad}:1:" not in message and "each line must look like" in message
    repeated = write_jsonl(tmp_path / "repeated.jsonl", [{**JUDGE[0], "choices": ["A", "A"]}])
    task = SegmentsTask(data=repeated, mode="generate", max_new_tokens=1)
    assert run_segments(model, tokenizer, task, progress=False).metrics["n"] == 2, "only the gold one is looked for"
    broken = write_jsonl(tmp_path / "broken.jsonl", [JUDGE[0], "not json"])
    with pytest.raises(TaskDataError, match=f"{broken}:2: not valid JSON"):
        run_segments(model, tokenizer, SegmentsTask(data=broken), progress=False)
    four = write_jsonl(tmp_path / "four.jsonl", [RECORDS[1]])
    with pytest.raises(TaskDataError, match=rf"{four}:1: 4 segments have 24 orders.*task.orders: 4"):
        run_segments(model, tokenizer, SegmentsTask(data=four), progress=False)
    with pytest.raises(TaskDataError, match="task.data: .*missing.jsonl' not found"):
        run_segments(model, tokenizer, SegmentsTask(data=str(tmp_path / "missing.jsonl")), progress=False)


def test_config_errors():
    for task, match in (
        ({"positions": [0, 1.5]}, r"task.positions: .*1.5 is outside \[0, 1\]"),
        ({"positions": []}, "task.positions: .*no positions"),
        ({"orders": 0}, "task.orders: .*at least 1"),
        ({"mode": "rank"}, "task.mode"),
        ({"ordres": 2}, "task.ordres"),
    ):
        with pytest.raises(RecipeError, match=match):
            parse_task({"kind": "segments", "data": "x.jsonl", **task})
    assert parse_task({"kind": "segments", "data": "x.jsonl"}).orders == "all"


def test_pine_refuses_a_sequence_beyond_a_sliding_window(tokenizer, tmp_path):
    model = tiny_model("gemma3-gqa", sliding_window=16)
    data = write_jsonl(tmp_path / "judge.jsonl", JUDGE[:1])
    pine = Pine()
    with attnkit.apply(model, [pine]), pytest.raises(ValueError, match="sliding-window layer of 16 tokens"):
        run_segments(model, tokenizer, SegmentsTask(data=data), progress=False, methods=[pine])
    with torch.no_grad():
        run_segments(model, tokenizer, SegmentsTask(data=data), progress=False)  # untouched: any length
