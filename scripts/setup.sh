#!/usr/bin/env bash
# Create .venv and install cifarcnn with its test tools, the `export` extra (ONNX), the `docs` extra (MkDocs),
# the `serve` extra (FastAPI, uvicorn) and the `audit` extra (cleanlab). torch is pinned to the CPU build; for a
# GPU, install the CUDA build of torch into .venv first (see docs/getting-started.md), and this script keeps it.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/python -m pip install -q "torch==2.13.0" 2>&1 | grep -v "^WARNING: Location" || true
fi
.venv/bin/python -m pip install -q -e ".[dev,export,docs,serve,audit]" 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import cifarcnn, fastapi, mkdocs, onnx, onnxruntime, onnxscript, torch
print(f'cifarcnn ready: torch {torch.__version__}, onnxruntime {onnxruntime.__version__}')"
