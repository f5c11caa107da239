"""The contract every registered method keeps, checked on its entry in tests/method_examples.py.

Identity, exact removal, left padding, stats, the recipe round trip and the float64 reference are
each tested once here for all methods, so a new method gets them by adding one entry, and a
method registered without an entry fails, naming the file to add it to.
"""

import pytest
import torch
import yaml

import attnkit
import attnkit.methods  # noqa: F401  (registers the built-in methods)
from attnkit.engine import plan
from attnkit.methods import METHODS
from attnkit.recipe import load_recipe
from tests.factory import PAD_ID, left_padded_batch, position_ids_from_mask, single_threaded
from tests.method_examples import EXAMPLES, MethodExample

NAMES = sorted(METHODS)
HOOK_DICTS = (
    "_forward_pre_hooks",
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
)


@pytest.fixture(autouse=True)
def one_thread():
    """Models this small only lose time to a second thread, most of all on a busy 2-core machine."""
    with single_threaded():
        yield


def example_for(name: str) -> MethodExample:
    """The method's entry, or a failure that says where to add one."""
    entry = EXAMPLES.get(name)
    if entry is None:
        pytest.fail(
            f"method {name!r} is registered but has no entry in EXAMPLES; add an entry to "
            "tests/method_examples.py (example and identity configs, tiny model, stats key, float64 reference)",
            pytrace=False,
        )
    return entry


def padded_batch(entry: MethodExample) -> dict[str, torch.Tensor]:
    """The entry's prompts left-padded, with positions counting real tokens only (as generate's)."""
    batch = left_padded_batch(list(entry.seqs), pad_id=PAD_ID)
    batch["position_ids"] = position_ids_from_mask(batch["attention_mask"])
    return batch


def one_row(seq: list[int]) -> dict[str, torch.Tensor]:
    ids = torch.tensor([seq])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def hooked(model: torch.nn.Module) -> list[str]:
    """The names of the modules that hold any hook."""
    return [name or "<model>" for name, m in model.named_modules() if any(getattr(m, kind) for kind in HOOK_DICTS)]


def applied(model, entry: MethodExample, which: str = "example") -> attnkit.Handle:
    """The entry's ``example`` or ``identity`` config applied as a recipe's methods list."""
    return attnkit.apply(model, {"methods": [entry.config(which)]})


# --------------------------------------------------------------------------------------------
# (1) every registered method has an entry
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_every_registered_method_has_an_example(name):
    entry = example_for(name)
    assert entry.example["method"] == entry.identity["method"] == name
    assert len(entry.seqs) >= 2 and len(entry.seqs[0]) - min(map(len, entry.seqs)) >= 3, (
        "one row padded by several tokens"
    )


def test_a_method_without_an_entry_fails_naming_the_file():
    with pytest.raises(pytest.fail.Exception, match=r"add an entry to tests/method_examples\.py"):
        example_for("no_such_method")


def test_examples_name_only_registered_methods():
    """The other direction: an entry for a method that was renamed or removed is stale."""
    assert sorted(set(EXAMPLES) - set(METHODS)) == [], (
        "entries for unregistered methods: remove them or register the methods"
    )


# --------------------------------------------------------------------------------------------
# (2) identity and (3) removal: bit-identical logits
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_identity_config_is_bit_identical(name):
    entry = example_for(name)
    model = entry.model()
    inputs = padded_batch(entry)
    before = entry.logits(model, inputs)
    with applied(model, entry, "identity"):
        assert torch.equal(entry.logits(model, inputs), before)


@pytest.mark.parametrize("name", NAMES)
def test_remove_restores_the_model_exactly(name):
    entry = example_for(name)
    model = entry.model()
    inputs = padded_batch(entry)
    backend = model.config._attn_implementation
    before = entry.logits(model, inputs)
    handle = applied(model, entry)
    changed = entry.logits(model, inputs)
    model.generate(**one_row(entry.seqs[0]), max_new_tokens=2, do_sample=False)  # leaves decode state behind
    assert hooked(model), "an applied handle hooks the model, or this check would prove nothing"
    handle.remove()
    assert not torch.equal(changed, before), "the example must change the logits"
    assert model.config._attn_implementation == backend
    assert hooked(model) == [], "hooks left on these modules"
    assert not plan.PLANS
    assert torch.equal(entry.logits(model, inputs), before)


# --------------------------------------------------------------------------------------------
# (4) a left-padded batch equals its rows run alone, in float64
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_left_padded_batch_equals_single_rows(name):
    entry = example_for(name)
    model = entry.model(torch.float64)
    batch = padded_batch(entry)
    with applied(model, entry) as handle:
        together = entry.logits(model, batch)
        alone = [entry.logits(model, one_row(seq))[0] for seq in entry.seqs]
        assert handle.stats(total=True)[name][entry.stat] > 0
    for row, (seq, single) in enumerate(zip(entry.seqs, alone)):
        got = together[row] if entry.decode_steps else together[row, -len(seq) :]
        torch.testing.assert_close(got, single, rtol=entry.tolerance, atol=entry.tolerance)


# --------------------------------------------------------------------------------------------
# (5) stats: the method fired, and generate's calls are counted per phase
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_stats_show_it_fired_and_count_phases(name):
    entry = example_for(name)
    model = entry.model()
    inputs = one_row(entry.seqs[0])
    with torch.no_grad(), applied(model, entry) as handle:
        model(**inputs, use_cache=True)  # a prefill (KV methods compress the cache it makes)
        assert list(handle.stats()) == [name]
        last = handle.stats()[name]
        assert last["phase"] == "prefill", last
        assert (last.get(entry.stat, 0) > 0) == (entry.acts_at == "prefill"), last
    with applied(model, entry) as handle:
        model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
        total = handle.stats(total=True)[name]
        assert handle.stats()[name]["phase"] == "decode"
    assert total["phases"] == {"prefill": 1, "decode": 2} and total["calls"] == 3
    assert total[entry.stat] > 0


# --------------------------------------------------------------------------------------------
# (6) the recipe form round-trips
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_recipe_form_round_trips(name):
    entry = example_for(name)
    written = entry.config()
    cls = METHODS[name]
    loaded = load_recipe({"methods": [written]}).methods[0]
    assert type(loaded) is cls.config_class
    assert loaded == cls(**{k: v for k, v in written.items() if k != "method"}).config
    assert load_recipe({"methods": [loaded.model_dump()]}).methods[0] == loaded
    # the resolved recipe saved beside a report (JSON values, as YAML) reads back to the same resolved form
    resolved = loaded.model_dump(mode="json")
    again = load_recipe(yaml.safe_dump({"methods": [resolved]})).methods[0]
    assert again.model_dump(mode="json") == resolved


# --------------------------------------------------------------------------------------------
# (7) the float64 reference
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_equals_its_float64_reference(name):
    entry = example_for(name)
    model = entry.model(torch.float64)
    inputs = one_row(entry.seqs[0])
    untouched = entry.logits(model, inputs)
    with applied(model, entry):
        got = entry.logits(model, inputs)
    expected = entry.reference(model, inputs)
    assert expected.dtype == torch.float64 and expected.shape == got.shape
    assert (expected - untouched).abs().max() > 1e-3, "the example must visibly change the logits"
    torch.testing.assert_close(got, expected, rtol=entry.tolerance, atol=entry.tolerance)


def test_config_registry_and_method_registry_match():
    """Every method class names a config whose ``method`` is its name, and every config has a class."""
    from attnkit.recipe.methods import method_configs

    configs = method_configs()
    assert sorted(configs) == NAMES
    for name, cls in METHODS.items():
        assert cls.config_class is configs[name], name


# --------------------------------------------------------------------------------------------
# (8) nothing of a layer's call outlives it
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_no_attention_call_outlives_its_layer(name):
    """A call held in a reference cycle keeps its query, keys, values and mask alive until the garbage
    collector runs: on a GPU, every layer's tensors at once (PINE's prefill peak grew by 10 GB at 8K
    tokens so). With the collector off, reference counting alone must free every call."""
    import gc

    from attnkit.engine.plan import AttentionCall

    entry = example_for(name)
    model = entry.model()
    inputs = padded_batch(entry)
    gc.collect()
    gc.disable()
    try:
        with applied(model, entry):
            entry.logits(model, inputs)
            model.generate(**one_row(entry.seqs[0]), max_new_tokens=2, do_sample=False)
            alive = sum(type(o) is AttentionCall for o in gc.get_objects())
    finally:
        gc.enable()
    assert alive == 0, f"{alive} attention calls outlived their layers"
