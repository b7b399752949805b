#!/usr/bin/env bash
# Everything a GPU session checks, in one run on a CUDA machine: the test suite with CUDA in
# parallel (every device-parametrised test gets its cuda case), then benchmarks/gpu.py.
# Logs and results go to $OUT (default ./gpu-out). POT is installed from .whl/ when present.
#   QUICK=1 bash benchmarks/gpu_checks.sh   # a dry run on the CPU: a few tests, gpu.py --quick
#   COMPILED=1 ...                          # also benchmarks/compiled.py (eager vs CUDA graphs)
set -uo pipefail
out=${OUT:-gpu-out}
mkdir -p "$out"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD/src:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
python3 -c "import torch, ot; print('torch', torch.__version__, 'POT', ot.__version__, \
'cuda', torch.cuda.is_available() and torch.cuda.get_device_name())" | tee "$out/device.txt"
if [ -n "${QUICK:-}" ]; then
    tests=(tests/test_kd.py tests/test_benchmark_gpu.py) bench=(--quick --device cpu)
    workers=()
else
    tests=(tests --deselect tests/test_examples.py) bench=() workers=(-n 8)
fi
start=$(date +%s)
timeout "${TEST_TIMEOUT:-240}" python3 -m pytest -q -p no:cacheprovider "${workers[@]}" \
    -o addopts="-ra" "${tests[@]}" >"$out/pytest-cuda.log" 2>&1
echo "pytest exit $? after $(($(date +%s) - start)) s" | tee -a "$out/pytest-cuda.log"
grep -E "^(FAILED|ERROR)|passed|failed" "$out/pytest-cuda.log" | tail -40
timeout "${BENCH_TIMEOUT:-300}" python3 benchmarks/gpu.py "${bench[@]}" --out "$out" \
    >"$out/gpu-bench.log" 2>&1
echo "gpu.py exit $? after $(($(date +%s) - start)) s" | tee -a "$out/gpu-bench.log"
tail -60 "$out/gpu-bench.log"
# eager against torch.compile (CUDA graphs) for the host-bound losses: opt-in, mostly compiling
if [ -n "${COMPILED:-}" ]; then
    timeout "${COMPILED_TIMEOUT:-240}" python3 benchmarks/compiled.py "${bench[@]}" --out "$out" \
        >"$out/compiled.log" 2>&1
    echo "compiled.py exit $? after $(($(date +%s) - start)) s" | tee -a "$out/compiled.log"
    tail -20 "$out/compiled.log"
fi
