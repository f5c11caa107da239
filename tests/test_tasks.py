"""Tasks and the recipe runner on a tiny random Llama with an offline character-level tokenizer."""

from __future__ import annotations

import importlib.util
import json
import string

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, processors
from transformers import PreTrainedTokenizerFast

from attnkit.recipe import RecipeError, load_recipe
from attnkit.recipe.tasks import ChoiceTask, GenerateTask
from attnkit.tasks import (
    TaskDataError,
    run_choice,
    run_generate,
    run_recipe,
    summarize,
    wilson_interval,
)
from attnkit.tasks.choice import encode_choice
from tests.factory import BOS_ID, EOS_ID, PAD_ID, tiny_model

CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant: {% endif %}"
)


def char_tokenizer(chat_template: str | None = None, merges: tuple[str, ...] = ()) -> PreTrainedTokenizerFast:
    """One token per printable ASCII character (plus ``merges`` of two characters), ids 0-2 =
    pad/bos/eos as in the factory, BOS prepended."""
    specials = {"<pad>": PAD_ID, "<s>": BOS_ID, "</s>": EOS_ID}
    tokens = [*specials, *string.printable[:95], *merges]
    vocab = {token: i for i, token in enumerate(tokens)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[(m[0], m[1]) for m in merges], unk_token="<pad>"))
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS_ID)])
    backend.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", padding_side="left"
    )
    tok.chat_template = chat_template
    return tok


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama-gqa")


def generate(model, tokenizer, **task):
    return run_generate(model, tokenizer, GenerateTask(**task), progress=False)


def write_jsonl(path, items) -> str:
    path.write_text("".join((item if isinstance(item, str) else json.dumps(item)) + "\n" for item in items))
    return str(path)


# ----------------------------------------------------------------------------- generate

PROMPTS = ["The capital of France is", "2 + 3 =", "Hi"]


def test_generate_batch_equals_one_by_one(model, tokenizer):
    batched = generate(model, tokenizer, prompts=PROMPTS, max_new_tokens=8, batch_size=3)
    single = generate(model, tokenizer, prompts=PROMPTS, max_new_tokens=8, batch_size=1)
    assert batched.rows == single.rows
    assert [row["prompt"] for row in batched.rows] == PROMPTS
    assert all(1 <= row["n_new_tokens"] <= 8 for row in batched.rows)
    assert batched.metrics["n"] == 3 and batched.metrics["tokens_per_s"] > 0


def test_generate_stops_on_model_eos(model, tokenizer):
    """The generation config's eos id ends a row, and nothing after it is counted or decoded."""
    free = generate(model, tokenizer, prompts=["Hi"], max_new_tokens=6).rows[0]
    first = tokenizer(free["completion"], add_special_tokens=False)["input_ids"][0]
    old = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = first
    try:
        stopped = generate(model, tokenizer, prompts=["Hi"], max_new_tokens=6).rows[0]
    finally:
        model.generation_config.eos_token_id = old
    assert stopped["n_new_tokens"] == 1


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="the decode kernel needs Triton")
def test_generate_decode_captured_gives_the_eager_rows(model, tokenizer, monkeypatch):
    """`decode: captured` hands generate() attnkit's decoding loop (here in its graph-free `buffers`
    mode, which runs on a CPU), with the same completions as eager decoding."""
    import functools

    import attnkit.tasks.generate as generate_module
    from attnkit.decode import captured_decoding

    calls = []

    def buffered(*args, **kwargs):
        calls.append(1)
        return functools.partial(captured_decoding, mode="buffers")(*args, **kwargs)

    monkeypatch.setattr(
        generate_module, "decoding", lambda mode: {"custom_generate": buffered} if mode == "captured" else {}
    )
    eager = generate(model, tokenizer, prompts=PROMPTS, max_new_tokens=8, batch_size=3)
    captured = generate(model, tokenizer, prompts=PROMPTS, max_new_tokens=8, batch_size=3, decode="captured")
    assert calls and captured.rows == eager.rows


def test_generate_sampling_is_seeded(model, tokenizer):
    task = dict(prompts=PROMPTS, max_new_tokens=6, do_sample=True, temperature=1.5, seed=3)
    first = generate(model, tokenizer, **task).rows
    torch.manual_seed(123)  # the task reseeds itself, whatever the global state
    assert generate(model, tokenizer, **task).rows == first


def test_generate_chat_template(model):
    rows = generate(model, char_tokenizer(CHAT_TEMPLATE), prompts=["Hi"], max_new_tokens=3, system="Be brief.").rows
    assert rows[0]["prompt"] == "Hi" and rows[0]["n_new_tokens"] >= 1
    with pytest.raises(TaskDataError, match="no chat template"):
        generate(model, char_tokenizer(), prompts=["Hi"], chat_template=True)


def test_prompts_file_and_errors(model, tokenizer, tmp_path):
    good = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Hi"}, "", {"prompt": "Yo"}])
    rows = generate(model, tokenizer, prompts_file=good, max_new_tokens=2, limit=1).rows
    assert [row["prompt"] for row in rows] == ["Hi"]
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "Hi"}, "{oops"])
    with pytest.raises(TaskDataError, match=r"bad\.jsonl:2: not valid JSON"):
        generate(model, tokenizer, prompts_file=bad)
    keyless = write_jsonl(tmp_path / "keyless.jsonl", [{"text": "Hi"}])
    with pytest.raises(TaskDataError, match=r'keyless\.jsonl:1: needs a "prompt" string'):
        generate(model, tokenizer, prompts_file=keyless)
    with pytest.raises(TaskDataError, match=r"task\.prompts_file: '.*missing\.jsonl' not found"):
        generate(model, tokenizer, prompts_file=str(tmp_path / "missing.jsonl"))


# ----------------------------------------------------------------------------- choice


def continuation_logprob(model, tokenizer, context: str, continuation: str) -> float:
    """Summed log-prob of ``continuation``'s characters after ``context``, one unpadded sequence."""
    ids = tokenizer(context + continuation)["input_ids"]
    start = len(ids) - len(continuation)
    with torch.no_grad():
        logprobs = model(torch.tensor([ids])).logits[0].double().log_softmax(-1)
    return sum(logprobs[i - 1, ids[i]].item() for i in range(start, len(ids)))


def test_choice_scores_match_direct_computation(model, tokenizer, tmp_path):
    items = [
        {"prompt": "Q: sky? A:", "choices": [" blue", " green!"], "answer": " blue"},
        {"prompt": "Q: 2+2? A: ", "choices": ["4", "five"], "answer": 1},
    ]
    data = write_jsonl(tmp_path / "c.jsonl", items)
    result = run_choice(model, tokenizer, ChoiceTask(data=data, batch_size=3), progress=False)
    first, second = result.rows
    expected = [continuation_logprob(model, tokenizer, "Q: sky? A:", c) for c in items[0]["choices"]]
    assert first["scores"] == pytest.approx(expected, abs=1e-4)
    # the prompt's trailing space is scored with the choice: " 4" after "Q: 2+2? A:"
    expected = [continuation_logprob(model, tokenizer, "Q: 2+2? A:", " " + c) for c in items[1]["choices"]]
    assert second["scores"] == pytest.approx(expected, abs=1e-4)
    assert first["answer"] == 0 and second["answer"] == 1
    for row in result.rows:
        assert row["predicted"] == max(range(2), key=row["scores"].__getitem__)
        assert row["correct"] == (row["predicted"] == row["answer"])
    accuracy = sum(row["correct"] for row in result.rows) / 2
    assert result.metrics["accuracy"] == accuracy and result.metrics["n"] == 2
    assert result.metrics["accuracy_ci95"] == list(wilson_interval(int(accuracy * 2), 2))
    normalized = run_choice(model, tokenizer, ChoiceTask(data=data, normalize=True), progress=False)
    assert normalized.rows[0]["scores"] == pytest.approx([first["scores"][0] / 5, first["scores"][1] / 7], abs=1e-5)


def test_label_word_scoring_reads_the_last_sub_token_at_the_prompt_end(model, tokenizer, tmp_path):
    items = [
        {"prompt": "Review: fine. Sentiment:", "choices": [" good", " bay"], "answer": 0},
        {"prompt": "Q: x", "choices": [" ab", " cd", " ef"], "answer": 2},
    ]
    data = write_jsonl(tmp_path / "l.jsonl", items)
    result = run_choice(model, tokenizer, ChoiceTask(data=data, scoring="label_word", batch_size=2), progress=False)
    for item, row in zip(items, result.rows):
        ids = tokenizer(item["prompt"])["input_ids"]
        with torch.no_grad():
            logprobs = model(torch.tensor([ids])).logits[0, -1].double().log_softmax(-1)
        last = [tokenizer(item["prompt"] + c)["input_ids"][-1] for c in item["choices"]]
        assert row["scores"] == pytest.approx([logprobs[t].item() for t in last], abs=1e-4)
    clash = write_jsonl(tmp_path / "clash.jsonl", [{"prompt": "Q:", "choices": [" ab", " cb"], "answer": 0}])
    with pytest.raises(TaskDataError, match="end in the same token.*scoring: sequence"):
        run_choice(model, tokenizer, ChoiceTask(data=clash, scoring="label_word"), progress=False)


def test_choice_tokens_across_the_boundary(tokenizer):
    """A token spanning prompt and choice is scored with the choice; a trailing space moves to it."""
    merging = char_tokenizer(merges=("bl",))
    full, shared = encode_choice(merging, "x b", "lue", True, "item")
    assert full == merging("x blue")["input_ids"] and full[:shared] == merging("x ")["input_ids"]
    assert merging.decode(full[shared:]) == "blue"
    full, shared = encode_choice(tokenizer, "Q: ", "blue", True, "item")
    assert tokenizer.decode(full[shared:]) == " blue"
    with pytest.raises(TaskDataError, match="item: the prompt gives no context token"):
        encode_choice(tokenizer, "", "b", False, "item")


def test_choice_validation_names_file_and_line(model, tokenizer, tmp_path):
    data = write_jsonl(
        tmp_path / "bad.jsonl",
        [
            {"prompt": "a", "choices": ["x", "y"], "answer": 0},
            {"prompt": "a", "choices": ["x", "y"], "answer": 2},
            {"prompt": "a", "choices": ["x", "y"], "answer": "z"},
            {"prompt": "a", "choices": ["x"], "answer": 0},
        ],
    )
    with pytest.raises(TaskDataError) as err:
        run_choice(model, tokenizer, ChoiceTask(data=data), progress=False)
    message = str(err.value)
    assert 'bad.jsonl:2: "answer" 2 is out of range; there are 2 choices, so use 0-1' in message
    assert "bad.jsonl:3: \"answer\" 'z' is not one of the choices" in message
    assert 'bad.jsonl:4: "choices" must be a list of at least 2 strings' in message
    assert "bad.jsonl:1" not in message


def test_wilson_interval():
    low, high = wilson_interval(5, 10)
    assert (low, high) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson_interval(10, 10) == pytest.approx((0.7225, 1.0), abs=1e-4)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    wide, narrow = wilson_interval(8, 10), wilson_interval(80, 100)
    assert wide[0] < narrow[0] < 0.8 < narrow[1] < wide[1]


# ----------------------------------------------------------------------------- runner


def test_run_recipe_writes_report(model, tokenizer, tmp_path):
    recipe = load_recipe(
        {
            "name": "tiny",
            "methods": [{"method": "head_mask", "heads": {1: [0, 3]}, "scale": 0.0}],
            "task": {"kind": "generate", "prompts": PROMPTS, "max_new_tokens": 4, "batch_size": 2},
            "baseline": True,
        }
    )
    report = run_recipe(recipe, out_dir=tmp_path, progress=False, model=model, tokenizer=tokenizer)
    assert model.config._attn_implementation == "sdpa"  # the handle was removed
    assert set(report["runs"]) == {"baseline", "attnkit"}
    stats = report["runs"]["attnkit"]["method_stats"]["head_mask"]
    assert stats["heads"] == 2 and stats["head_outputs_scaled"] > 0
    assert "method_stats" not in report["runs"]["baseline"]
    for run in report["runs"].values():
        assert run["metrics"]["n"] == 3 and run["seconds"] > 0
        assert run["memory"]["measure"] == "process_peak_rss" and run["memory"]["peak_bytes"] > 0
    on_disk = json.loads((tmp_path / "report.json").read_text())
    assert on_disk["runs"]["attnkit"]["method_stats"] == report["runs"]["attnkit"]["method_stats"]
    assert set(on_disk["versions"]) == {"python", "torch", "transformers", "attnkit"}
    for name in ("outputs.jsonl", "baseline_outputs.jsonl"):
        rows = [json.loads(line) for line in (tmp_path / name).read_text().splitlines()]
        assert [row["prompt"] for row in rows] == PROMPTS
    assert load_recipe(tmp_path / "recipe.yaml").resolved() == recipe.resolved()
    markdown = (tmp_path / "report.md").read_text()
    assert "| metric | baseline | attnkit |" in markdown and "head_outputs_scaled" in markdown
    assert "**Prompt:** The capital of France is" in markdown
    summary = summarize(report)
    assert "head_mask" in summary and "baseline" in summary and str(tmp_path) in summary


def test_run_recipe_choice_without_baseline(model, tokenizer, tmp_path):
    data = write_jsonl(tmp_path / "c.jsonl", [{"prompt": "a", "choices": ["b", "c"], "answer": 0}])
    methods = [{"method": "head_mask", "heads": {0: [1]}}]
    recipe = load_recipe({"methods": methods, "task": {"kind": "choice", "data": data}})
    report = run_recipe(recipe, out_dir=tmp_path / "out", progress=False, model=model, tokenizer=tokenizer)
    assert list(report["runs"]) == ["attnkit"] and report["runs"]["attnkit"]["metrics"]["n"] == 1
    assert not (tmp_path / "out" / "baseline_outputs.jsonl").exists()
    assert "accuracy_ci95" in summarize(report)


def test_run_recipe_errors(model, tokenizer, tmp_path):
    with pytest.raises(RecipeError, match="no task"):
        run_recipe(load_recipe({"methods": []}), out_dir=tmp_path, model=model, tokenizer=tokenizer)
    bad_heads = load_recipe(
        {"methods": [{"method": "head_mask", "heads": {7: [0]}}], "task": {"kind": "generate", "prompts": ["Hi"]}}
    )
    with pytest.raises(RecipeError, match=r"methods\[0\]\.heads"):
        run_recipe(bad_heads, out_dir=tmp_path, model=model, tokenizer=tokenizer)
    assert not (tmp_path / "report.json").exists()


def test_paired_comparison():
    from attnkit.tasks.choice import paired_comparison

    base = [{"correct": c} for c in [True] * 6 + [False] * 4]
    treated = [{"correct": c} for c in [True] * 5 + [False] + [True] * 3 + [False]]
    result = paired_comparison(base, treated)
    assert result["gained"] == 3 and result["lost"] == 1 and result["n"] == 10
    assert result["accuracy_difference"] == pytest.approx(0.2)
    # differences: +1 x3, -1 x1, 0 x6 -> sample sd sqrt((3*0.64 + 1.44 + 6*0.04) / 9)
    half = 1.959964 * ((3 * 0.64 + 1.44 + 6 * 0.04) / 9 / 10) ** 0.5
    assert result["difference_ci95"] == pytest.approx([0.2 - half, 0.2 + half])
    assert result["mcnemar_p"] == pytest.approx(2 * (1 + 4) / 16)  # exact binomial, 4 discordant pairs
