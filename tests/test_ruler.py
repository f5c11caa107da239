"""The ruler task: RULER's families generated deterministically, fitted to token lengths, scored as RULER
scores, summarised per task and on average, and run end to end through the runner.

Prompts use the offline character tokenizer (one token per character), so a "length" here counts
characters; runs use a tiny random Llama with 4096 positions, whose replies are gibberish: the
tests check how replies are scored and reported, not that they are right.
"""

from __future__ import annotations

import json

import pytest

from attnkit.recipe import RecipeError, load_recipe
from attnkit.recipe.tasks import RULER_FAMILIES, RulerTask, parse_task
from attnkit.tasks import TaskDataError, run_recipe
from attnkit.tasks.report import score_table
from attnkit.tasks.ruler import (
    Renderer,
    cells,
    check_lengths,
    match_all,
    postprocess,
    string_match_all,
    string_match_part,
    summary,
)
from attnkit.tasks.ruler_families import FAMILIES, NEEDLE, essay_words, singular
from tests.factory import tiny_model
from tests.test_tasks import CHAT_TEMPLATE, char_tokenizer

ESSAY = " ".join(
    f"Essay sentence {i} tells of the {w} near the old mill."
    for i, w in enumerate(["river", "forest", "bridge", "market", "harbour", "garden", "tower"] * 12)
)
UNIT = 130
"""The largest haystack unit in characters (a distractor needle with two UUIDs), the fitting tolerance."""


pytestmark = pytest.mark.usefixtures("one_thread")


def build(tokenizer, chat: bool = False, **task):
    task = RulerTask(**{"samples": 2, "lengths": [3000], **task})
    return cells(task, Renderer(tokenizer, chat, None), essay_words(ESSAY))


# ----------------------------------------------------------------------------- generation


def test_family_table_matches_the_config():
    assert list(FAMILIES) == list(RULER_FAMILIES)
    assert {f for f, family in FAMILIES.items() if family.single_needle} == {
        "niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_2", "niah_multikey_3"
    }  # fmt: skip


def test_generation_is_deterministic_for_a_seed(tokenizer):
    first = build(tokenizer)
    again = build(tokenizer)
    assert [(p.text, p.sample.answers) for p in first] == [(p.text, p.sample.answers) for p in again]
    other = build(tokenizer, seed=1)
    assert all(a.text != b.text for a, b in zip(first, other)), "another seed gives other prompts"
    assert first[0].text != first[1].text, "samples of one task differ"


@pytest.mark.parametrize("chat", [False, True])
@pytest.mark.parametrize("length", [2500, 3800])
def test_prompts_hit_their_token_length(length, chat):
    tokenizer = char_tokenizer(CHAT_TEMPLATE)
    for prompt in build(tokenizer, chat=chat, lengths=[length]):
        tokens = len(prompt.input_ids)
        assert length - UNIT <= tokens <= length, (prompt.family, tokens)
        assert prompt.input_ids == tokenizer(prompt.text, add_special_tokens=not chat)["input_ids"]
        assert prompt.text.endswith(prompt.sample.answer_prefix), "the reply continues RULER's answer prefix"
        if chat:
            assert prompt.text.startswith("<s>user: ") and "<s>assistant: " in prompt.text


def test_needles_hold_their_answers_at_their_depths(tokenizer):
    for prompt in build(tokenizer, samples=5):
        if not prompt.family.startswith("niah"):
            continue
        kind = "uuid" if prompt.family in ("niah_single_3", "niah_multikey_3") else "number"
        for answer in prompt.sample.answers:
            assert prompt.text.count(answer) == 1
            assert f"One of the special magic {kind}s for " in prompt.text and f" is: {answer}." in prompt.text
        if FAMILIES[prompt.family].single_needle:
            assert prompt.sample.depth == [0.0, 0.25, 0.5, 0.75, 1.0][prompt.index]
            context = prompt.text[prompt.text.index("afterwards.\n") : prompt.text.rindex("\nWhat is")]
            at = context.index(f" is: {prompt.sample.answers[0]}.") / len(context)
            assert abs(at - prompt.sample.depth) < 0.08, (prompt.family, at, prompt.sample.depth)
        else:
            assert prompt.sample.depth is None
    multi = {p.family: p for p in build(tokenizer)}
    assert len(multi["niah_multivalue"].sample.answers) == 4
    assert len(multi["niah_multiquery"].sample.answers) == 4 and ", and " in multi["niah_multiquery"].text


def test_singular_wording_is_rulers():
    template = "Some special magic {type_needle_v} are hidden. What are all the special magic {type_needle_v}?"
    assert singular(template) == "A special magic {type_needle_v} is hidden. What is the special magic {type_needle_v}?"
    assert NEEDLE.format(type_needle_v="numbers", key="k", value="1") == "One of the special magic numbers for k is: 1."


def test_variable_tracking_chain_and_word_lists(tokenizer):
    prompts = {p.family: p for p in build(tokenizer)}
    vt = prompts["vt"]
    names = vt.sample.answers
    assert len(names) == 5 and all(len(n) == 5 and n.isupper() for n in names)
    question = vt.text[vt.text.rindex("Memorize and track") :]
    value = question.split("assigned the value ")[1].split(" ")[0]
    assert f"VAR {names[0]} = {value}" in question
    for a, b in zip(names, names[1:]):
        assert f"VAR {b} = VAR {a} " in question
    assert vt.text.count("Memorize and track") == 2, "RULER's one-shot example comes first"
    cwe = prompts["cwe"]
    listing = cwe.text[cwe.text.rindex("Below is a numbered list") :]
    counts = [listing.count(f". {w} ") + listing.endswith(f". {w}\n") for w in cwe.sample.answers]
    assert len(cwe.sample.answers) == 10 and all(c >= 5 for c in counts), "the common words repeat (6x under 4K)"
    fwe = prompts["fwe"]
    coded = fwe.text.split("coded words. ")[1].split("\nQuestion")[0].split()
    top = sorted(set(coded), key=coded.count, reverse=True)[:4]
    assert top[0] == "..." and top[1:] == fwe.sample.answers


def test_a_length_below_the_template_is_refused(tokenizer):
    with pytest.raises(TaskDataError, match="too short for vt"):
        build(tokenizer, families=["vt"], lengths=[900])
    with pytest.raises(TaskDataError, match="exceed the model's 4096 positions"):
        check_lengths(4096, RulerTask(lengths=[4000]))
    check_lengths(4096, RulerTask(lengths=[4000], max_new_tokens=16))
    with pytest.raises(RecipeError, match="task.lengths"):
        parse_task({"kind": "ruler", "lengths": [64]})


# ----------------------------------------------------------------------------- scoring


def test_scoring_matches_rulers_metrics():
    predictions = ["The numbers are 123 and 456.", "NOTHING here", "abc-DEF is it"]
    references = [["123", "456", "789"], ["x"], ["ABC-def"]]
    # RULER: sum(sum(r.lower() in pred.lower()) / len(ref)) / len(preds) * 100, rounded to 2 places
    assert string_match_all(predictions, references) == round((2 / 3 + 0 + 1) / 3 * 100, 2) == 55.56
    assert string_match_part(predictions, references) == round((1 + 0 + 1) / 3 * 100, 2) == 66.67
    assert match_all("x", ["x", "y"]) == 0.5
    assert postprocess("  \t7 is\x01it\n ") == "7 is\nit"
    assert match_all(postprocess("1234567"), ["123456"]) == 1.0, "substring match, as RULER's"


def test_summary_has_per_task_and_average_rows():
    rows = [
        {"family": "vt", "length": 1000, "score": 100.0},
        {"family": "vt", "length": 2000, "score": 50.0},
        {"family": "cwe", "length": 1000, "score": 0.0},
        {"family": "cwe", "length": 1000, "score": 20.0},
        {"family": "cwe", "length": 2000, "score": 40.0},
    ]
    metrics = summary(rows)
    assert metrics["vt"] == 75.0 and metrics["cwe"] == 20.0
    assert metrics["vt@1000"] == 100.0 and metrics["cwe@1000"] == 10.0
    assert metrics["average"] == 47.5, "the average is over tasks (RULER's summary), not over rows"
    assert metrics["average@1000"] == 55.0 and metrics["average@2000"] == 45.0
    table = score_table(metrics)
    assert table[0] == "| task | 1000 | 2000 | all |"
    assert table[2:] == ["| vt | 100.0 | 50.0 | 75.0 |", "| cwe | 10.0 | 40.0 | 20.0 |",
                         "| **average** | 55.0 | 45.0 | 47.5 |"]  # fmt: skip


# ----------------------------------------------------------------------------- end to end


def test_runner_runs_a_tiny_grid_end_to_end(tokenizer, tmp_path):
    essay = tmp_path / "essay.txt"
    essay.write_text(ESSAY)
    families = ["niah_single_1", "niah_single_2", "niah_multivalue", "vt", "cwe", "fwe"]
    recipe = load_recipe(
        {
            "name": "ruler-tiny",
            "methods": [{"method": "snapkv", "budget": 0.5, "window": 8}],
            "task": {"kind": "ruler", "families": families, "lengths": [2400, 3200], "samples": 2,
                     "depths": [0.2, 0.8], "max_new_tokens": 3, "haystack": str(essay), "batch_size": 2},
            "baseline": True,
        }
    )  # fmt: skip
    model = tiny_model("llama-gqa", max_position_embeddings=4096)
    report = run_recipe(recipe, out_dir=tmp_path / "out", progress=False, model=model, tokenizer=tokenizer)
    for run in ("baseline", "attnkit"):
        metrics = report["runs"][run]["metrics"]
        assert metrics["n"] == len(families) * 2 * 2
        assert {"average", "average@2400", "average@3200", *families, "vt@2400", "fwe@3200"} <= set(metrics)
    assert report["runs"]["attnkit"]["files"] == ["ruler.png", "ruler_depth.png"]
    assert report["runs"]["baseline"]["files"] == ["baseline_ruler.png", "baseline_ruler_depth.png"]
    assert report["runs"]["attnkit"]["method_stats"]["snapkv"]["kv_bytes_before"] > 0
    rows = [json.loads(line) for line in (tmp_path / "out" / "outputs.jsonl").read_text().splitlines()]
    assert {r["family"] for r in rows} == set(families)
    for r in rows:
        assert r["score"] == 100 * match_all(postprocess(r["output"]), r["expected"])
        assert r["n_new_tokens"] <= 3 and r["prompt_tokens"] <= r["length"]
        assert (r["depth"] is not None) == (r["family"] in ("niah_single_1", "niah_single_2"))
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert "## RULER scores: baseline" in markdown and "## RULER scores: attnkit" in markdown
    assert "| **average** |" in markdown and "![attnkit: ruler_depth.png](ruler_depth.png)" in markdown


def test_preflight_checks_lengths_and_haystack(tmp_path):
    recipe = load_recipe(
        {"model": {"name_or_path": "smollm2-135m-instruct"},
         "task": {"kind": "ruler", "lengths": [8100], "haystack": str(tmp_path / "missing.txt")}}
    )  # fmt: skip
    model = tiny_model("llama-gqa", max_position_embeddings=8192)
    with pytest.raises(RecipeError) as err:
        run_recipe(recipe, out_dir=tmp_path / "out", progress=False, model=model, tokenizer=char_tokenizer())
    assert "missing.txt" in str(err.value) and "exceed the model's 8192 positions" in str(err.value)


def test_the_smollm2_recipe_parses():
    recipe = load_recipe("recipes/ruler_smollm2.yaml")
    assert recipe.task.kind == "ruler" and set(recipe.task.families) == set(RULER_FAMILIES)
