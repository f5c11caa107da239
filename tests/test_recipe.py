"""Recipes: parsing, defaults, --set overrides, and the promised error messages."""

import json

import pytest

from attnkit.heads import HeadArtifact, HeadSetError, ModelShape, Selection, config_fingerprint, resolve_heads
from attnkit.recipe import RecipeError, check_against_model, load_recipe
from attnkit.recipe.methods import HeadMaskConfig
from tests.factory import tiny_config

SHAPE = ModelShape(num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64, model_id="smol", fingerprint="abc")

GOOD = """
name: demo
methods:
  - method: head_mask
    heads: {14: [0, 3]}
task:
  kind: generate
  prompts: ["hi"]
"""


def errors_of(source, overrides=None):
    with pytest.raises(RecipeError) as info:
        load_recipe(source, overrides)
    return "\n".join(info.value.errors)


def test_good_recipe_parses_with_defaults():
    recipe = load_recipe(GOOD)
    assert isinstance(recipe.methods[0], HeadMaskConfig)
    assert recipe.methods[0].scale == 0.0
    assert recipe.model.name_or_path == "smollm2-135m-instruct"
    assert recipe.model.trust_remote_code is False
    assert recipe.task.max_new_tokens == 64
    resolved = recipe.resolved()
    assert resolved["methods"][0] == {"method": "head_mask", "heads": {"14": [0, 3]}, "scale": 0.0}
    assert load_recipe(json.loads(json.dumps(resolved))).resolved() == json.loads(json.dumps(resolved))


def test_set_overrides_a_field():
    recipe = load_recipe(GOOD, ["methods.0.scale=0.5", "task.max_new_tokens=8", "model.dtype=bfloat16"])
    assert recipe.methods[0].scale == 0.5 and recipe.task.max_new_tokens == 8
    assert recipe.model.dtype == "bfloat16"
    assert "methods.3 is not an index of a list of 1" in errors_of(GOOD, ["methods.3.scale=1"])
    assert "path=value" in errors_of(GOOD, ["methods.0.scale"])


@pytest.mark.parametrize(
    "body,expected",
    [
        ("methods:\n  - method: head_mask\n    heads: all\n    scael: 0.5\n", "methods[0].scael: unknown key"),
        (
            "methods:\n  - method: head_mask\n    heads: all\n    scale: lots\n",
            "methods[0].scale: Input should be a valid number",
        ),
        ("methods:\n  - method: nope\n", "methods[0].method: unknown method 'nope'; known methods: act, head_mask"),
        ("methods:\n  - heads: all\n", "methods[0]: each method needs a `method:` name"),
        ("methods:\n  - method: head_mask\n", "methods[0].heads: Field required"),
        ("task:\n  kind: generate\n", "task: Value error, give exactly one of `prompts`"),
        (
            "task:\n  kind: generate\n  prompts: [a]\n  max_new_tokens: 0\n",
            "task.max_new_tokens: Input should be greater than or equal to 1",
        ),
        ("task:\n  kind: dance\n", "task: Input tag 'dance' found using 'kind' does not match"),
        ("model:\n  dtype: float8\n", "model.dtype: Input should be 'float32', 'bfloat16', 'float16' or 'auto'"),
        ("modle: {}\n", "modle: unknown key"),
        ("- just a list\n", "the recipe must be a mapping"),
        ("methods: [\n", "not valid YAML"),
    ],
)
def test_bad_recipes_name_path_and_problem(body, expected):
    assert expected in str(pytest.raises(RecipeError, load_recipe, body).value)


def test_all_errors_reported_at_once():
    text = errors_of("methods:\n  - method: head_mask\n    heads: all\n    scale: x\n  - method: nope\nmodle: 1\n")
    assert "methods[0].scale" in text and "methods[1].method" in text and "modle" in text


def test_yaml_is_loaded_safely():
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe("name: !!python/object/apply:os.system ['echo pwned']\n")


def test_missing_file_is_clear(tmp_path):
    assert "not found" in errors_of(tmp_path / "nope.yaml")


def test_heads_checked_against_model():
    recipe = load_recipe("methods:\n  - method: head_mask\n    heads: {40: [0]}\n")
    with pytest.raises(RecipeError, match=r"methods\[0\]\.heads: layer 40 does not exist, model has 30 layers"):
        check_against_model(recipe, SHAPE)
    recipe = load_recipe("methods:\n  - method: head_mask\n    heads: {layers: 2-29, heads: [0, 9]}\n")
    with pytest.raises(RecipeError, match=r"head 9 does not exist, model has 9 heads \(0-8\)"):
        check_against_model(recipe, SHAPE)


@pytest.mark.parametrize(
    "spec,count",
    [
        ("all", 270),
        ({"layers": "2-29", "heads": "all"}, 252),
        ({3: [0, 1], "5-6": "all"}, 20),
        ([[0, 0], [29, 8]], 2),
        ({"layers": "0,3,5-7", "heads": "0-2"}, 15),
    ],
)
def test_head_set_forms(spec, count):
    assert len(resolve_heads(spec, SHAPE)) == count


def test_kv_level_head_sets_use_kv_heads():
    assert len(resolve_heads("all", SHAPE, level="kv")) == 90
    with pytest.raises(HeadSetError, match="head 3 does not exist, model has 3 heads"):
        resolve_heads({0: [3]}, SHAPE, level="kv")


@pytest.mark.parametrize("spec", ["29-2", {0: ["x"]}, {0: [True]}, 3.5, {}])
def test_bad_head_sets(spec):
    with pytest.raises(HeadSetError):
        resolve_heads(spec, SHAPE)


def artifact_for(config, path):
    shape = ModelShape.from_config(config, "tiny")
    scores = [[0.0] * shape.num_heads for _ in range(shape.num_layers)]
    return HeadArtifact(
        attnkit_version="0.1.0",
        model_id="tiny",
        config_fingerprint=config_fingerprint(config),
        method="test",
        scores=scores,
        selection=Selection(rule="top-2", heads={1: [0, 2]}),
    ).save(path)


def test_artifact_for_this_model_loads_and_foreign_one_is_refused(tmp_path):
    mine, other = tiny_config("llama-gqa"), tiny_config("llama-gqa", hidden_size=96)
    path = artifact_for(mine, tmp_path / "heads.json")
    assert resolve_heads(str(path), ModelShape.from_config(mine)).by_layer() == {1: [0, 2]}
    with pytest.raises(HeadSetError, match="was made for 'tiny'.*allow_foreign_heads"):
        resolve_heads(str(path), ModelShape.from_config(other))
    with pytest.warns(UserWarning):
        assert len(resolve_heads(str(path), ModelShape.from_config(other), allow_foreign=True)) == 2
    with pytest.raises(HeadSetError, match="not found; run `attnkit profile`"):
        resolve_heads(str(tmp_path / "missing.json"), SHAPE)
