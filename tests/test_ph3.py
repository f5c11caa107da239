"""PH3: the conflict task, the conflict-heads path-patching profiler, the ph3 method and its k sweep."""

from __future__ import annotations

import json
import string

import pytest
import torch

import attnkit
from attnkit.engine.attach import attention_modules
from attnkit.heads import HeadSetError, ModelShape
from attnkit.methods import METHODS, PH3, HeadMask
from attnkit.probes import conflict_heads, ph3_sweep
from attnkit.probes.act_heads import tail_supported
from attnkit.probes.configs import ConflictHeadsConfig, PH3SweepConfig, make_config
from attnkit.probes.conflict_heads import frozen_logit_diffs
from attnkit.recipe import RecipeError, check_against_model, load_recipe
from attnkit.recipe.tasks import ConflictTask
from attnkit.tasks import TaskDataError
from attnkit.tasks.choice import score_batch
from attnkit.tasks.conflict import (
    bigbench_conflict_rows,
    build_prompt,
    encode_pair,
    load_conflict_items,
    match_outcome,
    pair_logprobs,
    run_conflict,
)
from tests.factory import left_padded_batch, position_ids_from_mask, tiny_model
from tests.test_tasks import char_tokenizer

MERGES = tuple(" " + c for c in string.ascii_uppercase)
"""So an answer like " Rome" starts with its own token " R" (not a bare space shared by all answers)."""

NAMES = ["Rome", "Paris", "Oslo", "Lima", "Bern", "Kyiv", "Quito", "Dakar", "Hanoi", "Accra", "Baku", "Cairo"]


def conflict_rows(n: int = 12, relations: bool = False) -> list[dict]:
    rows = []
    for i in range(n):
        ctx, mem = NAMES[i % len(NAMES)], NAMES[(i + 5) % len(NAMES)]
        row = {
            "question": f"Where is place {i}?",
            "context": f"Place {i} is in {ctx}, it is said {'x' * (i % 4)}.",
            "context_answer": ctx,
            "memory_answer": mem,
        }
        if relations:
            row["relation"] = "city" if i % 2 else "capital"
        rows.append(row)
    return rows


def write(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def tokenizer():
    return char_tokenizer(merges=MERGES)


@pytest.fixture
def data(tmp_path):
    return write(tmp_path / "conflict.jsonl", conflict_rows(12, relations=True))


def last_ld(model, ids, memory_token, context_token, **kw) -> torch.Tensor:
    logits = model(input_ids=ids, **kw).logits[:, -1].double()
    return logits[:, memory_token] - logits[:, context_token]


# ------------------------------------------------------------------------------------ the task


def test_bigbench_rows_parse_question_context_and_target_scores():
    task = {
        "examples": [
            {
                "input": "\nQuestion: who wrote it?\nContext: It was written by Ann Lee in 1990 .",
                "target": "Ann Lee",
                "target_scores": {"Ann Lee": 1, "Bo Chen": 0},
            },
            {"input": "no question here", "target_scores": {"a": 1, "b": 0}},
            {"input": "\nQuestion: q?\nContext: c", "target_scores": {"a": 1}},
        ]
    }
    rows, skipped = bigbench_conflict_rows(task)
    assert rows == [
        {
            "question": "who wrote it?",
            "context": "It was written by Ann Lee in 1990 .",
            "context_answer": "Ann Lee",
            "memory_answer": "Bo Chen",
        }
    ]
    assert skipped == 2


@pytest.mark.parametrize(
    "completion, outcome",
    [
        (" Rome\nQuestion: ...Paris", "context"),
        (" It is the city of Paris.", "memory"),
        (" the rome, or Paris", "context"),
        (" Paris or Rome", "memory"),
        (" Romeo", "other"),
        ("\n\n Oslo", "other"),
    ],
)
def test_answer_matching_normalises_and_uses_the_first_line(completion, outcome):
    assert match_outcome(completion, "Rome", "Paris") == outcome


def test_bad_items_are_reported_with_the_fix(tmp_path):
    rows = conflict_rows(2)
    rows[1]["memory_answer"] = rows[1]["context_answer"]
    path = write(tmp_path / "bad.jsonl", [rows[0], {"question": "q"}, rows[1]])
    with pytest.raises(TaskDataError) as err:
        load_conflict_items(ConflictTask(data=path))
    message = str(err.value)
    assert 'bad.jsonl:2: "context" must be a non-empty string' in message
    assert 'bad.jsonl:3: "context_answer" and "memory_answer" are the same' in message
    assert "each line must look like" in message


def test_template_must_hold_its_fields():
    with pytest.raises(ValueError, match="template must contain {context}"):
        ConflictTask(data="x", template="Question: {question}\nAnswer:")


def test_cached_pair_scoring_equals_scoring_each_sequence(tokenizer, data):
    model = tiny_model("llama-gqa")
    task = ConflictTask(data=data)
    items = load_conflict_items(task)
    pairs = [encode_pair(tokenizer, build_prompt(it, task), it, False) for it in items[:5]]
    cached = pair_logprobs(model, tokenizer.pad_token_id, pairs)
    for (ctx_ids, mem_ids, ctx_start, mem_start), (ctx_lp, mem_lp, _, _) in zip(pairs, cached):
        (ref_ctx, _), (ref_mem, _) = score_batch(
            model, tokenizer.pad_token_id, [(ctx_ids, ctx_start), (mem_ids, mem_start)]
        )
        assert ctx_lp == pytest.approx(ref_ctx, abs=1e-4) and mem_lp == pytest.approx(ref_mem, abs=1e-4)


def test_run_conflict_rates_per_relation_and_closed_book(tokenizer, data):
    model = tiny_model("llama-gqa")
    result = run_conflict(model, tokenizer, ConflictTask(data=data, batch_size=5, max_new_tokens=4), progress=False)
    m = result.metrics
    assert m["n"] == 12 and m["context_rate"] + m["memory_rate"] == pytest.approx(1.0)
    assert m["generate_context_rate"] + m["generate_memory_rate"] + m["generate_other_rate"] == pytest.approx(1.0)
    assert m["capital/n"] + m["city/n"] == 12 and "city/generate_other_rate_ci95" in m
    low, high = m["context_rate_ci95"]
    assert low <= m["context_rate"] <= high
    choices = [r["loglik_choice"] for r in result.rows]
    assert m["context_rate"] == choices.count("context") / 12
    for row in result.rows:  # the choice is the larger summed log-prob
        expected = "context" if row["loglik"]["context"] >= row["loglik"]["memory"] else "memory"
        assert row["loglik_choice"] == expected
    closed = run_conflict(
        model, tokenizer, ConflictTask(data=data, with_context=False, scoring="loglik"), progress=False
    )
    assert closed.metrics["with_context"] is False and "generate_other_rate" not in closed.metrics
    assert [r["loglik"] for r in closed.rows] != [r["loglik"] for r in result.rows]


# ------------------------------------------------------------------------------------ path patching


def full_record(model, ids):
    """Every layer's o_proj input and attention output at ALL positions (the reference's cache)."""
    z, a, hooks = {}, {}, []
    for layer, module in attention_modules(model).items():
        hooks.append(
            module.o_proj.register_forward_pre_hook(lambda m, args, lay=layer: z.__setitem__(lay, args[0].clone()))
        )
        hooks.append(module.register_forward_hook(lambda m, args, out, lay=layer: a.__setitem__(lay, out[0].clone())))
    with torch.no_grad():
        model(input_ids=ids)
    for hook in hooks:
        hook.remove()
    return z, a


def direct_patched_ld(model, ids, clean, corrupt, layer, head, memory_token, context_token):
    """Reference: a full-sequence forward of the clean input in which EVERY attention output at EVERY
    position is its clean value, except ``layer``'s, which is o_proj of the clean input with ``head``'s
    slice taken from the corrupted run (at every position, as equal lengths allow)."""
    (z_clean, a_clean), (z_corr, _) = clean, corrupt
    dim = ModelShape.from_config(model.config).head_dim
    hooks = []
    for lay, module in attention_modules(model).items():

        def hook(m, args, out, lay=lay):
            if lay != layer:
                return (a_clean[lay], *out[1:])
            z = z_clean[lay].clone()
            z[..., head * dim : (head + 1) * dim] = z_corr[lay][..., head * dim : (head + 1) * dim]
            return (m.o_proj(z), *out[1:])

        hooks.append(module.register_forward_hook(hook))
    with torch.no_grad():
        ld = last_ld(model, ids, memory_token, context_token)
    for h in hooks:
        h.remove()
    return ld.item()


@pytest.mark.parametrize(
    "arch, attn",
    [
        ("llama-gqa", "sdpa"),
        ("qwen3-gqa", "sdpa"),
        ("gemma3-gqa", "sdpa"),
        ("gemma2-gqa", "eager"),
        ("phi3-mha", "sdpa"),
    ],
)
def test_path_patching_equals_direct_recomputation(arch, attn):
    model = tiny_model(arch, attn_implementation=attn, dtype=torch.float64)
    gen = torch.Generator().manual_seed(1)
    clean_ids = torch.randint(3, 128, (1, 14), generator=gen)
    corrupt_ids = clean_ids.clone()
    corrupt_ids[0, 2:9] = torch.randint(3, 128, (7,), generator=gen)  # the "context" differs, the end does not
    mem, ctx = 40, 77
    clean, corrupt = full_record(model, clean_ids), full_record(model, corrupt_ids)
    L, H = model.config.num_hidden_layers, model.config.num_attention_heads
    last = lambda d: torch.stack([d[lay][0, -1] for lay in range(L)])  # noqa: E731
    with torch.no_grad():
        hidden = model(input_ids=clean_ids, output_hidden_states=True).hidden_states
    resid = torch.stack([hidden[lay][0, -1] for lay in range(L)])
    assert tail_supported(model) == (arch in ("llama-gqa", "qwen3-gqa", "phi3-mha"))
    for tail in (resid, None):  # layer tails where supported, and the whole-model forward
        ld_clean, ld_patched = frozen_logit_diffs(
            model, int(clean_ids[0, -1]), 13, last(clean[0]), last(clean[1]), last(corrupt[0]), mem, ctx, resid=tail
        )
        with torch.no_grad():
            assert ld_clean == pytest.approx(last_ld(model, clean_ids, mem, ctx).item(), abs=1e-9)
        for layer in range(L):
            for head in range(H):
                reference = direct_patched_ld(model, clean_ids, clean, corrupt, layer, head, mem, ctx)
                assert ld_patched[layer, head].item() == pytest.approx(reference, abs=1e-9), (layer, head)
        assert (ld_patched - ld_clean).abs().max() > 1e-3  # patching does something here


def test_last_layer_path_patching_is_activation_patching():
    model = tiny_model("llama-gqa", dtype=torch.float64)
    gen = torch.Generator().manual_seed(2)
    clean_ids = torch.randint(3, 128, (1, 12), generator=gen)
    corrupt_ids = torch.randint(3, 128, (1, 7), generator=gen)  # shorter: the context removed
    corrupt_ids[0, -1] = clean_ids[0, -1]
    mem, ctx = 10, 20
    L, H, D = 3, 4, 16
    clean, corrupt = full_record(model, clean_ids), full_record(model, corrupt_ids)
    last = lambda d: torch.stack([d[lay][0, -1] for lay in range(L)])  # noqa: E731
    with torch.no_grad():
        hidden = model(input_ids=clean_ids, output_hidden_states=True).hidden_states
    _, ld_patched = frozen_logit_diffs(
        model,
        int(clean_ids[0, -1]),
        11,
        last(clean[0]),
        last(clean[1]),
        last(corrupt[0]),
        mem,
        ctx,
        resid=torch.stack([h[0, -1] for h in hidden[:L]]),
    )
    o_proj = attention_modules(model)[L - 1].o_proj
    for head in range(H):

        def patch(m, args, head=head):
            z = args[0].clone()
            z[0, -1, head * D : (head + 1) * D] = corrupt[0][L - 1][0, -1, head * D : (head + 1) * D]
            return (z,)

        hook = o_proj.register_forward_pre_hook(patch)
        with torch.no_grad():
            plain = last_ld(model, clean_ids, mem, ctx).item()
        hook.remove()
        assert ld_patched[L - 1, head].item() == pytest.approx(plain, abs=1e-9)


# ------------------------------------------------------------------------------------ the profiler


def test_profile_artifact_rankings_resume_and_padding(tokenizer, data, tmp_path):
    model = tiny_model("llama-gqa")
    out = tmp_path / "conflict.json"
    art = conflict_heads.profile(
        model,
        tokenizer,
        ConflictHeadsConfig(data=data, batch_size=5, select=3),
        model_id="tiny",
        output=out,
        progress=False,
    )
    assert art.method == "conflict-heads" and len(art.scores) == 3 and len(art.scores[0]) == 4
    p = art.parameters
    assert p["items_used"] + sum(p["items_skipped"].values()) == 12
    assert p["max_abs_ld_frozen_vs_full_forward"] < 1e-4
    memory, context = p["memory_heads"], p["context_heads"]
    assert len(memory) + len(context) == 12 - sum(1 for row in art.scores for s in row if s == 0)
    assert all(s > 0 for *_, s in memory) and all(s < 0 for *_, s in context)
    assert [s for *_, s in memory] == sorted((s for *_, s in memory), reverse=True)
    assert sum(map(len, art.selected.values())) == min(3, len(memory))
    # one item scored by hand: the recorded per-item scores are LD(clean) - LD(patched)
    lines = [json.loads(line) for line in out.with_suffix(".progress.jsonl").read_text().splitlines()]
    assert lines[0]["setup"]["corruption"] == "removed" and len(lines) == 1 + p["items_used"]
    mean = torch.tensor([line["scores"] for line in lines[1:]]).double().mean(0)
    assert torch.allclose(mean, torch.tensor(art.scores).double(), atol=1e-12)
    # resuming recomputes nothing and gives the same artifact
    again = conflict_heads.profile(
        model,
        tokenizer,
        ConflictHeadsConfig(data=data, batch_size=5, select=3),
        model_id="tiny",
        output=out,
        progress=False,
    )
    assert again.parameters["resumed_items"] == p["items_used"] and again.scores == art.scores
    # the whole-model patched forward gives the layer tails' scores
    whole = conflict_heads.profile(
        model,
        tokenizer,
        ConflictHeadsConfig(data=data, batch_size=5, tail=False),
        model_id="tiny",
        output=tmp_path / "whole.json",
        progress=False,
    )
    assert art.parameters["layer_tails"] and not whole.parameters["layer_tails"]
    assert torch.allclose(torch.tensor(whole.scores), torch.tensor(art.scores), atol=1e-4)
    # left-padded batches give the scores of one item at a time
    single = conflict_heads.profile(
        model,
        tokenizer,
        ConflictHeadsConfig(data=data, batch_size=1),
        model_id="tiny",
        output=tmp_path / "single.json",
        progress=False,
    )
    assert torch.allclose(torch.tensor(single.scores), torch.tensor(art.scores), atol=1e-4)


def test_ablation_mode_and_swapped_corruption(tokenizer, data, tmp_path):
    model = tiny_model("llama-gqa")
    ablation = conflict_heads.profile(
        model,
        tokenizer,
        ConflictHeadsConfig(data=data, mode="ablation"),
        model_id="tiny",
        output=tmp_path / "a.json",
        progress=False,
    )
    swapped = conflict_heads.profile(
        model,
        tokenizer,
        ConflictHeadsConfig(data=data, corruption="swapped"),
        model_id="tiny",
        output=tmp_path / "s.json",
        progress=False,
    )
    removed = conflict_heads.profile(
        model, tokenizer, ConflictHeadsConfig(data=data), model_id="tiny", output=tmp_path / "r.json", progress=False
    )
    assert ablation.parameters["corruption"] is None and swapped.parameters["corruption"] == "swapped"
    assert ablation.scores != removed.scores != swapped.scores
    with pytest.raises(ValueError, match="use removed or swapped"):
        conflict_heads.profile(
            model,
            tokenizer,
            make_config(ConflictHeadsConfig, data=data, corruption="x"),
            model_id="tiny",
            output=tmp_path / "x.json",
        )


def test_pruning_moves_the_logit_difference_as_profiled(tokenizer, data, tmp_path):
    """One layer and ablation mode: no attention sits downstream of a head, so freezing the others is
    what really happens, and pruning a head must move LD by exactly its score, per item, in its sign."""
    model = tiny_model("llama-gqa", num_hidden_layers=1, seed=4)  # a seed whose heads include both kinds
    out = tmp_path / "one.json"
    art = conflict_heads.profile(
        model, tokenizer, ConflictHeadsConfig(data=data, mode="ablation"), model_id="tiny", output=out, progress=False
    )
    lines = {
        line["key"]: line for line in map(json.loads, out.with_suffix(".progress.jsonl").read_text().splitlines()[1:])
    }
    task = ConflictTask(data=data)
    items = load_conflict_items(task)
    assert art.parameters["memory_heads"] and art.parameters["context_heads"]
    for steer, ranking, direction in (("memory", "context_heads", +1), ("context", "memory_heads", -1)):
        ((layer, head, score),) = art.parameters[ranking][:1]
        shifts = []
        for key, line in lines.items():
            item = items[int(key)]
            ctx_ids, mem_ids, start, _ = encode_pair(tokenizer, build_prompt(item, task), item, False)
            ids = torch.tensor([ctx_ids[:start]])
            with torch.no_grad():
                before = last_ld(model, ids, mem_ids[start], ctx_ids[start]).item()
                with attnkit.apply(model, [PH3(heads=str(out), steer=steer, k=1)]) as handle:
                    after = last_ld(model, ids, mem_ids[start], ctx_ids[start]).item()
                    assert handle.stats()["ph3"]["head_outputs_scaled"] == 1
            assert after - before == pytest.approx(-line["scores"][layer][head], abs=1e-4)
            shifts.append(after - before)
        # steer: memory prunes a context head, so LD (memory minus context) goes up, and vice versa
        assert direction * sum(shifts) / len(shifts) == pytest.approx(abs(score), abs=1e-4)
        assert direction * sum(shifts) > 0


# ------------------------------------------------------------------------------------ the method


@pytest.fixture
def artifact(tokenizer, data, tmp_path):
    model = tiny_model("llama-gqa")
    path = tmp_path / "conflict.json"
    conflict_heads.profile(
        model, tokenizer, ConflictHeadsConfig(data=data), model_id="tiny", output=path, progress=False
    )
    return model, path


def test_ph3_prunes_the_ranked_heads_like_head_mask(artifact):
    model, path = artifact
    ranking = json.loads(path.read_text())["parameters"]["memory_heads"]
    ids = torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(0))
    heads = [[lay, h] for lay, h, _ in ranking[:2]]
    with torch.no_grad(), attnkit.apply(model, [HeadMask(heads=heads, scale=0.0)]):
        expected = model(input_ids=ids).logits
    with torch.no_grad(), attnkit.apply(model, [PH3(heads=str(path), steer="context", k=2)]) as handle:
        got = model(input_ids=ids).logits
        stats = handle.stats()["ph3"]
    assert torch.equal(got, expected)
    assert stats["k"] == 2 and stats["k_source"] == "recipe" and stats["heads"] == 2
    assert stats["pruned"] == ", ".join(f"L{lay}H{h}" for lay, h in heads)


def test_identity_and_removal_are_bit_identical(artifact):
    model, path = artifact
    ids = torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(input_ids=ids).logits
        with attnkit.apply(model, [PH3(heads=str(path), steer="memory", k=0)]) as handle:
            assert torch.equal(model(input_ids=ids).logits, before)
            assert handle.stats()["ph3"]["heads"] == 0
        with attnkit.apply(model, [PH3(heads=str(path), steer="memory", k=2)]):
            assert not torch.equal(model(input_ids=ids).logits, before)
        assert torch.equal(model(input_ids=ids).logits, before)


def test_left_padded_batch_equals_single_rows_and_cache_equals_no_cache(artifact):
    model, path = artifact
    gen = torch.Generator().manual_seed(3)
    seqs = [torch.randint(3, 128, (n,), generator=gen).tolist() for n in (6, 11, 9)]
    batch = left_padded_batch(seqs, 0)
    with torch.no_grad(), attnkit.apply(model, [PH3(heads=str(path), steer="context", k=3)]):
        padded = model(**batch, position_ids=position_ids_from_mask(batch["attention_mask"])).logits[:, -1]
        for row, seq in enumerate(seqs):
            single = model(input_ids=torch.tensor([seq])).logits[:, -1]
            assert torch.allclose(padded[row], single[0], atol=1e-5)
        ids = torch.tensor([seqs[1]])
        cached = model.generate(ids, max_new_tokens=8, do_sample=False, use_cache=True)
        uncached = model.generate(ids, max_new_tokens=8, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


def test_foreign_and_wrong_artifacts_are_refused(artifact, tmp_path):
    model, path = artifact
    other = tiny_model("qwen3-gqa")
    with pytest.raises(HeadSetError, match="was made for 'tiny'"):
        attnkit.apply(other, [PH3(heads=str(path), steer="context", k=1)])
    data = json.loads(path.read_text())
    data["method"] = "act"
    wrong = tmp_path / "act.json"
    wrong.write_text(json.dumps(data))
    with pytest.raises(HeadSetError, match="written by the 'act' profiler, not 'conflict-heads'"):
        attnkit.apply(model, [PH3(heads=str(wrong), steer="context", k=1)])
    assert model.config._attn_implementation == "sdpa"  # the failed apply rolled back


def test_recipes_validate_k_against_the_artifact(artifact):
    model, path = artifact
    shape = ModelShape.from_config(model.config, "tiny")
    n_memory = len(json.loads(path.read_text())["parameters"]["memory_heads"])
    recipe = load_recipe({"methods": [{"method": "ph3", "heads": str(path), "steer": "context", "k": n_memory + 1}]})
    with pytest.raises(RecipeError) as err:
        check_against_model(recipe, shape)
    assert (
        f"methods[0].k: k={n_memory + 1} but {path} ranks only {n_memory} memory heads "
        f"(steer: context prunes memory heads); use k <= {n_memory}"
    ) in str(err.value)
    auto = load_recipe({"methods": [{"method": "ph3", "heads": str(path), "steer": "memory"}]})
    with pytest.raises(RecipeError, match=r"methods\[0\].k: k: auto needs the validation sweep's choice.*ph3-sweep"):
        check_against_model(auto, shape)
    ok = load_recipe({"methods": [{"method": "ph3", "heads": str(path), "steer": "context", "k": n_memory}]})
    check_against_model(ok, shape)
    with pytest.raises(RecipeError, match=r"methods\[0\].steer"):
        load_recipe({"methods": [{"method": "ph3", "heads": str(path), "steer": "both", "k": 1}]})
    with pytest.raises(RecipeError, match=r"methods\[0\].k"):
        load_recipe({"methods": [{"method": "ph3", "heads": str(path), "steer": "context", "k": "many"}]})


def test_sweep_chooses_k_and_auto_uses_it(artifact, tokenizer, data):
    model, path = artifact
    sweep = ph3_sweep.profile(model, tokenizer, PH3SweepConfig(heads=path, data=data, ks=(1, 2, 3)), progress=False)
    for steer in ("context", "memory"):
        tried = sweep["results"][steer]
        best = max(r[f"{steer}_rate"] for r in tried.values())
        assert tried[str(sweep["chosen"][steer])][f"{steer}_rate"] == best
    stored = json.loads(path.read_text())["parameters"]["sweep"]
    assert stored["chosen"] == sweep["chosen"] and stored["n"] == 12
    with attnkit.apply(model, [PH3(heads=str(path), steer="memory")]) as handle:
        stats = handle.stats()["ph3"]
    assert stats["k"] == sweep["chosen"]["memory"] and stats["k_source"].startswith("validation sweep on")


def test_ph3_composes_with_head_mask_in_one_recipe(artifact):
    model, path = artifact
    ranking = json.loads(path.read_text())["parameters"]["context_heads"]
    taken = {(lay, h) for lay, h, _ in ranking[:2]}
    extra = next([lay, h] for lay in range(3) for h in range(4) if (lay, h) not in taken)
    recipe = load_recipe(
        {
            "methods": [
                {"method": "ph3", "heads": str(path), "steer": "memory", "k": 2},
                {"method": "head_mask", "heads": [extra]},
            ]
        }
    )
    ids = torch.randint(3, 128, (1, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        with attnkit.apply(model, recipe) as handle:
            both = model(input_ids=ids).logits
            stats = handle.stats()
        with attnkit.apply(model, [HeadMask(heads=[*map(list, taken), extra], scale=0.0)]):
            union = model(input_ids=ids).logits
    assert torch.allclose(both, union, atol=1e-6)
    assert stats["ph3"]["head_outputs_scaled"] == 2 and stats["head_mask"]["head_outputs_scaled"] == 1


@pytest.mark.skipif("snapkv" not in METHODS, reason="snapkv is not registered")
def test_ph3_composes_with_snapkv(artifact):
    model, path = artifact
    recipe = load_recipe(
        {
            "methods": [
                {"method": "ph3", "heads": str(path), "steer": "context", "k": 2},
                {"method": "snapkv", "budget": 12, "window": 4, "kernel": 3},
            ]
        }
    )
    ids = torch.randint(3, 128, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), attnkit.apply(model, recipe) as handle:
        out = model.generate(ids, max_new_tokens=4, do_sample=False)
        stats = handle.stats(total=True)
    assert out.shape == (1, 28)
    assert stats["ph3"]["head_outputs_scaled"] > 0
    assert any(isinstance(v, (int, float)) and v > 0 for k, v in stats["snapkv"].items() if k not in ("calls",))


def test_runner_compares_context_rates(tokenizer, data, tmp_path, artifact):
    from attnkit.tasks import run_recipe

    model, path = artifact
    recipe = load_recipe(
        {
            "name": "ph3",
            "baseline": True,
            "methods": [{"method": "ph3", "heads": str(path), "steer": "context", "k": 2}],
            "task": {"kind": "conflict", "data": data, "scoring": "loglik"},
        }
    )
    report = run_recipe(recipe, out_dir=tmp_path / "run", progress=False, model=model, tokenizer=tokenizer)
    comparison = report["comparison"]
    assert comparison["metric"] == "context rate (log-likelihood)"
    runs = report["runs"]
    assert comparison["accuracy_difference"] == pytest.approx(
        runs["attnkit"]["metrics"]["context_rate"] - runs["baseline"]["metrics"]["context_rate"]
    )
    assert "attnkit - baseline context rate (log-likelihood)" in (tmp_path / "run" / "report.md").read_text()


def test_cli_profiles_sweeps_and_refuses_bad_options(tokenizer, data, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import attnkit.models
    from attnkit.cli import app

    model = tiny_model("llama-gqa")
    monkeypatch.setattr(attnkit.models, "load_model", lambda name: (model, tokenizer))
    out = tmp_path / "c.json"
    result = CliRunner().invoke(app, ["profile", "conflict-heads", "--data", data, "-o", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert out.is_file() and out.with_suffix(".png").stat().st_size > 0
    assert "memory heads (" in result.output and "context heads (" in result.output
    sweep = CliRunner().invoke(
        app, ["profile", "ph3-sweep", "--heads", str(out), "--data", data, "--ks", "1,2", "--no-progress"]
    )
    assert sweep.exit_code == 0, sweep.output
    assert "steer context: chose k=" in sweep.output and json.loads(out.read_text())["parameters"]["sweep"]
    bad = CliRunner().invoke(app, ["profile", "conflict-heads", "--data", data, "--corruption", "shuffled"])
    assert bad.exit_code == 2 and "use removed or swapped" in bad.output
    bad = CliRunner().invoke(app, ["profile", "ph3-sweep", "--heads", str(out), "--data", data, "--ks", "1,x"])
    assert bad.exit_code == 2 and "give whole numbers" in bad.output
