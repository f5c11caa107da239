"""attnkit.data: splits, few-shot prompts, BIG-bench extraction. Synthetic data only; no download."""

from __future__ import annotations

import io
import json
import subprocess
import tarfile
from collections import Counter

import pytest

from attnkit import data
from attnkit.data import DataError, Example, fewshot_items, make_splits
from attnkit.recipe.tasks import ChoiceTask
from attnkit.tasks.choice import load_items

LABELS3 = ["a", "b", "c"]


def synthetic(counts: dict[str, int]) -> list[Example]:
    return [Example(f"{label} text number {i}", label) for label, n in counts.items() for i in range(n)]


def keys(rows) -> set[str]:
    return {" ".join(r.text.split()).casefold() for r in rows}


# --------------------------------------------------------------------------- make_splits


def test_splits_are_deterministic_and_seed_dependent():
    ex = synthetic({"a": 50, "b": 50, "c": 50})
    s1 = make_splits(ex, labels=LABELS3, n_train=30, n_test=60, seed=3)
    s2 = make_splits(list(ex), labels=LABELS3, n_train=30, n_test=60, seed=3)
    s3 = make_splits(ex, labels=LABELS3, n_train=30, n_test=60, seed=4)
    assert (s1.train, s1.test, s1.pool) == (s2.train, s2.test, s2.pool)
    assert s1.train != s3.train


def test_splits_are_disjoint_and_cover_everything():
    ex = synthetic({"a": 40, "b": 40, "c": 40})
    s = make_splits(ex, labels=LABELS3, n_train=30, n_test=45, seed=0, min_pool_per_label=5)
    train, test, pool = keys(s.train), keys(s.test), keys(s.pool)
    assert len(train) == 30 and len(test) == 45
    assert not train & test and not train & pool and not test & pool
    assert train | test | pool == keys(ex)


def test_splits_are_balanced_and_every_prefix_is_near_balanced():
    ex = synthetic({"a": 100, "b": 60, "c": 80})
    s = make_splits(ex, labels=LABELS3, n_train=31, n_test=90, seed=1)
    train = Counter(e.label for e in s.train)
    assert sum(train.values()) == 31 and max(train.values()) - min(train.values()) <= 1
    assert Counter(e.label for e in s.test) == {"a": 30, "b": 30, "c": 30}
    for n in range(1, len(s.test) + 1):
        c = Counter(e.label for e in s.test[:n])
        assert max(c.values()) - min(c.get(label, 0) for label in LABELS3) <= 1


def test_test_split_shrinks_when_data_runs_out_and_fills_from_other_labels():
    ex = synthetic({"a": 100, "b": 100, "c": 20})
    s = make_splits(ex, labels=LABELS3, n_train=30, n_test=150, seed=0, min_pool_per_label=5)
    train = Counter(e.label for e in s.train)
    test = Counter(e.label for e in s.test)
    assert train == {"a": 10, "b": 10, "c": 10}
    assert test["c"] == 5  # 20 - 5 pool - 10 train
    assert sum(test.values()) == 150 and abs(test["a"] - test["b"]) <= 1
    assert Counter(e.label for e in s.pool)["c"] == 5
    ex_small = synthetic({"a": 12, "b": 12, "c": 12})
    small = make_splits(ex_small, labels=LABELS3, n_train=6, n_test=100, seed=0, min_pool_per_label=2)
    assert len(small.test) == 24 and small.info["test"] == {"a": 8, "b": 8, "c": 8}
    assert small.info["test_requested"] == 100


def test_splits_drop_duplicates_ambiguous_texts_and_other_labels():
    ex = synthetic({"a": 20, "b": 20})
    ex += [Example("A text  number 0", "a"), Example("b TEXT number 1", "a")]  # duplicate; conflicting label
    ex += [Example("neutral one", "n"), Example("a text number 2", "n")]  # other label; conflicts with a kept text
    s = make_splits(ex, labels=["a", "b"], n_train=10, n_test=10, seed=0)
    everything = s.train + s.test + s.pool
    assert {e.label for e in everything} == {"a", "b"}
    texts = keys(everything)
    assert len(texts) == len(everything)
    assert "b text number 1" not in texts and "a text number 2" not in texts
    assert s.info["duplicates_dropped"] == 5


def test_splits_accept_dicts_and_tuples():
    rows = [{"text": f"t{i}", "label": "xy"[i % 2]} for i in range(20)]
    a = make_splits(rows, labels=["x", "y"], n_train=4, n_test=4, seed=0)
    b = make_splits([(r["text"], r["label"]) for r in rows], labels=["x", "y"], n_train=4, n_test=4, seed=0)
    assert a.train == b.train and isinstance(a.train[0], Example)


def test_splits_errors():
    ex = synthetic({"a": 10, "b": 10})
    with pytest.raises(DataError, match="train items"):
        make_splits(ex, labels=["a", "b"], n_train=19, n_test=0, seed=0)
    with pytest.raises(DataError, match="min_pool_per_label"):
        make_splits(ex, labels=["a", "b"], n_train=2, n_test=2, seed=0, min_pool_per_label=11)
    with pytest.raises(DataError, match="at least 2 labels"):
        make_splits(ex, labels=["a"], n_train=2, n_test=2, seed=0)


# --------------------------------------------------------------------------- fewshot_items

SENTIMENT = {"pos": "positive", "neg": "negative"}
TEMPLATE = dict(input_prefix="Review: ", output_prefix="Sentiment:")


def sentiment_splits(seed: int = 0):
    ex = synthetic({"pos": 60, "neg": 60})
    return make_splits(ex, labels=list(SENTIMENT), n_train=20, n_test=40, seed=seed, min_pool_per_label=10)


def parse(prompt: str, separator: str = "\n\n"):
    """(demonstrations as (text, word), query text) of a prompt in the default layout."""
    blocks = prompt.split(separator)
    demos = []
    for block in blocks[:-1]:
        first, second = block.split("\n")
        assert first.startswith("Review: ") and second.startswith("Sentiment: ")
        demos.append((first[len("Review: ") :], second[len("Sentiment: ") :]))
    first, second = blocks[-1].split("\n")
    assert first.startswith("Review: ") and second == "Sentiment:"
    return demos, first[len("Review: ") :]


def test_fewshot_exact_format():
    items = fewshot_items(
        [Example("query", "neg")], pool=[Example("good", "pos"), Example("bad", "neg")],
        labels=SENTIMENT, shots=2, seed=0, **TEMPLATE,
    )  # fmt: skip
    assert len(items) == 1
    item = items[0]
    assert item["choices"] == [" positive", " negative"] and item["answer"] == 1 and item["label"] == "neg"
    assert item["prompt"] in (
        "Review: good\nSentiment: positive\n\nReview: bad\nSentiment: negative\n\nReview: query\nSentiment:",
        "Review: bad\nSentiment: negative\n\nReview: good\nSentiment: positive\n\nReview: query\nSentiment:",
    )
    zero = fewshot_items([Example("q", "pos")], pool=[], labels=SENTIMENT, shots=0, seed=0,
                         instruction="Classify.", **TEMPLATE)  # fmt: skip
    assert zero[0]["prompt"] == "Classify.\n\nReview: q\nSentiment:" and zero[0]["answer"] == 0


def test_fewshot_answers_demos_balance_and_disjointness():
    s = sentiment_splits()
    pool_text = {e.text: e.label for e in s.pool}
    items = fewshot_items(s.test, pool=s.pool, labels=SENTIMENT, shots=4, seed=7, **TEMPLATE)
    assert len(items) == len(s.test)
    for ex, item in zip(s.test, items):
        assert item["choices"][item["answer"]] == " " + SENTIMENT[ex.label]
        demos, query = parse(item["prompt"])
        assert query == ex.text
        assert len(demos) == 4 and Counter(word for _, word in demos) == {"positive": 2, "negative": 2}
        assert len({t for t, _ in demos}) == 4
        for text, word in demos:
            assert text in pool_text and SENTIMENT[pool_text[text]] == word  # demo carries its true label
    prompts = {item["prompt"] for item in items}
    assert len(prompts) == len(items)  # demonstrations are redrawn per item


def test_fewshot_odd_shots_and_many_labels():
    ex = synthetic({"a": 30, "b": 30, "c": 30})
    s = make_splits(ex, labels=LABELS3, n_train=9, n_test=9, seed=0, min_pool_per_label=5)
    labels = {"a": "alpha", "b": "beta", "c": "gamma"}
    for shots in (1, 3, 4, 5):
        items = fewshot_items(s.test, pool=s.pool, labels=labels, shots=shots, seed=0)
        for item in items:
            words = [b.split("\n")[1][len("Label: ") :] for b in item["prompt"].split("\n\n")[:-1]]
            counts = Counter(words)
            assert len(words) == shots
            assert max(counts.get(w, 0) for w in labels.values()) - min(counts.get(w, 0) for w in labels.values()) <= 1
            assert item["choices"] == [" alpha", " beta", " gamma"]


def test_fewshot_is_deterministic_given_seed():
    s = sentiment_splits()
    a = fewshot_items(s.test, pool=s.pool, labels=SENTIMENT, shots=4, seed=1, **TEMPLATE)
    b = fewshot_items(s.test, pool=list(s.pool), labels=SENTIMENT, shots=4, seed=1, **TEMPLATE)
    c = fewshot_items(s.test, pool=s.pool, labels=SENTIMENT, shots=4, seed=2, **TEMPLATE)
    assert a == b and a != c


def test_fewshot_refuses_overlap_short_pool_and_unknown_labels():
    s = sentiment_splits()
    with pytest.raises(DataError, match="disjoint"):
        fewshot_items(s.test, pool=s.pool + [Example(s.test[3].text.upper(), "pos")], labels=SENTIMENT, shots=2, seed=0)
    with pytest.raises(DataError, match="too few"):
        fewshot_items(s.test, pool=[e for e in s.pool if e.label == "pos"], labels=SENTIMENT, shots=2, seed=0)
    with pytest.raises(DataError, match="not in labels"):
        fewshot_items([Example("x", "neutral")], pool=s.pool, labels=SENTIMENT, shots=2, seed=0)
    with pytest.raises(DataError, match="distinct"):
        fewshot_items(s.test, pool=s.pool, labels={"pos": "good", "neg": " good"}, shots=2, seed=0)


def test_fewshot_truncates_long_texts():
    long = " ".join(f"w{i}" for i in range(100))
    items = fewshot_items([Example(long, "pos")], pool=[Example(long + " x", "pos"), Example("short", "neg")],
                          labels=SENTIMENT, shots=2, seed=0, max_words=5, **TEMPLATE)  # fmt: skip
    assert items[0]["prompt"].count("Review: w0 w1 w2 w3 w4 ...\n") == 2
    assert data.truncate_words("a b c", 3) == "a b c" and data.truncate_words("a b c", None) == "a b c"


def test_items_are_read_by_the_choice_task(tmp_path):
    s = sentiment_splits()
    items = fewshot_items(s.test, pool=s.pool, labels=SENTIMENT, shots=2, seed=0, **TEMPLATE)
    path = tmp_path / "d" / "items.jsonl"
    assert data.write_jsonl(path, items) == len(items)
    loaded = load_items(ChoiceTask(data=str(path)))
    assert [(i.prompt, i.choices, i.answer) for i in loaded] == [
        (r["prompt"], r["choices"], r["answer"]) for r in items
    ]


# --------------------------------------------------------------------------- BIG-bench (fake archive, no download)


def fake_archive(cache, tasks: dict[str, dict]) -> None:
    path = cache / "data" / f"bigbench-{data.BIGBENCH_VERSION}.tar.gz"
    path.parent.mkdir(parents=True)
    with tarfile.open(path, "w:gz") as tf:
        for name, task in {"other_task": {"examples": []}, **tasks}.items():
            raw = json.dumps(task).encode()
            info = tarfile.TarInfo(f"bigbench-{data.BIGBENCH_VERSION}/bigbench/benchmark_tasks/{name}/task.json")
            info.size = len(raw)
            tf.addfile(info, io.BytesIO(raw))


TOY = {
    "name": "toy",
    "examples": [
        {"input": "Utterance: play jazz", "target_scores": {"play_music": 1, "get_weather": 0}},
        {"input": "Utterance: rain tomorrow?", "target_scores": {"play_music": 0, "get_weather": 1}},
    ],
}


def test_bigbench_tasks_extract_once_and_read_from_cache(tmp_path, monkeypatch):
    fake_archive(tmp_path, {"toy": TOY, "multi/sub_en": {"name": "sub", "examples": []}})
    monkeypatch.setattr(data.subprocess, "run", lambda *a, **k: pytest.fail("must not download"))
    got = data.bigbench_tasks(["toy", "multi/sub_en"], cache=tmp_path)
    assert got["toy"] == TOY and got["multi/sub_en"]["name"] == "sub"
    assert (tmp_path / "data" / "bigbench" / "multi" / "sub_en" / "task.json").is_file()
    assert not (tmp_path / "data" / "bigbench" / "other_task").exists()
    (tmp_path / "data" / f"bigbench-{data.BIGBENCH_VERSION}.tar.gz").unlink()  # now served from the extraction
    assert data.bigbench_task("toy/", cache=tmp_path) == TOY


def test_bigbench_task_errors(tmp_path, monkeypatch):
    fake_archive(tmp_path, {"toy": TOY})
    with pytest.raises(DataError, match="did you mean 'toy'"):
        data.bigbench_task("toyy", cache=tmp_path)
    with pytest.raises(DataError, match="bad BIG-bench task path"):
        data.bigbench_task("../etc", cache=tmp_path)
    monkeypatch.setenv("ATTNKIT_CACHE", str(tmp_path))
    assert data.bigbench_task("toy") == TOY  # cache root from $ATTNKIT_CACHE


def test_bigbench_archive_failed_download_names_the_command(tmp_path, monkeypatch):
    def fake_run(cmd, **kwargs):
        assert cmd[1:4] == ["-m", "pip", "download"] and "bigbench==1.0.0" in cmd and "--no-deps" in cmd
        return subprocess.CompletedProcess(cmd, 1, stdout="", stderr="ERROR: network unreachable")

    monkeypatch.setattr(data.subprocess, "run", fake_run)
    with pytest.raises(DataError) as err:
        data.bigbench_archive(tmp_path)
    msg = str(err.value)
    assert "network unreachable" in msg and "pip download --no-deps --no-binary :all:" in msg and str(tmp_path) in msg
    assert list((tmp_path / "data").iterdir()) == []  # no partial file or temp folder left


def test_bigbench_archive_moves_download_into_place(tmp_path, monkeypatch):
    def fake_run(cmd, **kwargs):
        dest = cmd[cmd.index("-d") + 1]
        (data.Path(dest) / f"bigbench-{data.BIGBENCH_VERSION}.tar.gz").write_bytes(b"x")
        return subprocess.CompletedProcess(cmd, 0, stdout="", stderr="")

    monkeypatch.setattr(data.subprocess, "run", fake_run)
    path = data.bigbench_archive(tmp_path)
    assert path == tmp_path / "data" / f"bigbench-{data.BIGBENCH_VERSION}.tar.gz" and path.read_bytes() == b"x"
    monkeypatch.setattr(data.subprocess, "run", lambda *a, **k: pytest.fail("downloaded twice"))
    assert data.bigbench_archive(tmp_path) == path


def test_bigbench_examples():
    ex = data.bigbench_examples(TOY, strip_prefix="Utterance: ")
    assert ex == [Example("play jazz", "play_music"), Example("rain tomorrow?", "get_weather")]
    with pytest.raises(DataError, match="options scored"):
        data.bigbench_examples({"name": "t", "examples": [{"input": "x", "target_scores": {"a": 1, "b": 1}}]})
    with pytest.raises(DataError, match="no target_scores"):
        data.bigbench_examples({"name": "t", "examples": [{"input": "x", "target": "a"}]})
