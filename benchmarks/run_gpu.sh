#!/usr/bin/env bash
# One GPU session, one command: parity checks on the device, then the kernel and decode benchmarks.
# Results land in benchmarks/results/ (and in $OUT when run through the device tool).
#   device tool:  bash benchmarks/run_gpu.sh          (carry .whl with bitsandbytes for the peer)
# Expects torch with CUDA and triton on the machine; installs kbitrt without dependencies.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv || exit 2
status=0
python3 -m pytest -q tests/test_gpu.py tests/test_kernels.py tests/test_linear.py 2>&1 | tail -15 || status=1
# each kernel (word GEMV M=1, word dot M=2..16, prefill) beside torch fp16 F.linear and a
# device-to-device copy of the same run; the static prediction for the same shapes beside it
python3 benchmarks/kernel_bench.py --check --quick || status=1
python3 benchmarks/kernel_bench.py || status=1
python3 benchmarks/sass_budget.py --arch sm_90 --shapes 7b-o 7b-gateup 70b-o --kernels gemv small prefill \
  --bits 3 4 8 --dtypes nf int --out benchmarks/results/sass_budget-gpu-run.json \
  >/dev/null || status=1
python3 benchmarks/decode.py || status=1
if [ -n "${OUT:-}" ]; then cp benchmarks/results/*.json "$OUT"/ 2>/dev/null; fi
exit $status
