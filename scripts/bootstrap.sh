#!/usr/bin/env bash
# Create (or reuse) the virtual environment .venv and install qpcell into it.
#
# torch comes first and on its own: `torch==2.13.0` is a CUDA build where PyPI serves
# one (Linux x86-64), so GPU users keep their GPU, while machines that carry a local
# CPU wheel of that release (pip's find-links) take it without a multi-GB download.
# Set QPCELL_TORCH to another requirement (e.g. "torch==2.5.1") to choose your own,
# or install torch into .venv yourself first: an importable torch is left alone.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
    .venv/bin/python -m pip install --quiet "${QPCELL_TORCH:-torch==2.13.0}"
fi
stamp=.venv/.qpcell-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    .venv/bin/python -m pip install --quiet -e ".[dev]"
    touch "$stamp"
fi
