#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# One device call: software check, kernel tests on CUDA, the decode sweep, the end-to-end step.
# Usage on the device machine (repo root): bash benchmarks/kernels/gpu_run.sh [stages...]
#   stages: check seam (tests/test_wrappers_seam.py) tests kt (kernel tests only) decode ncu e2e tcsave jitsave
#   (default: check tests decode e2e); PYTEST_ARGS passes e.g. '-n 12' to the tests stage;
#   BENCH_ARGS passes extra arguments to bench_decode.py. FlashInfer, if carried, is .fi/site.tgz (a trimmed
#   flashinfer-python 0.7.2.post1 + apache-tvm-ffi tree, JIT-built on the device) or .fi/site; a JIT cache
#   from an earlier call travels as .fi/jit.tgz and stage `jitsave` writes the current one to $OUT/fi_jit.tgz.
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
FISITE="$PWD/.fi/site"
if [ -f .fi/site.tgz ]; then mkdir -p /tmp/fi && tar xzf .fi/site.tgz -C /tmp/fi && FISITE=/tmp/fi/site; fi
export FLASHINFER_WORKSPACE_BASE=/tmp/fiws FLASHINFER_CUDA_ARCH_LIST=9.0a MAX_JOBS=16
mkdir -p /tmp/fiws; [ -f .fi/jit.tgz ] && tar xzf .fi/jit.tgz -C /tmp/fiws
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:$FISITE:${PYTHONPATH:-}"
# Triton's kernel cache: a cache from an earlier call (stage tcsave) travels as .fi/triton.tgz (same Triton there)
export TRITON_CACHE_DIR=/tmp/tcache SPHKV_CPU_KERNEL=0    # the C++ CPU kernels are CPU-machine tests: not built here
mkdir -p /tmp/tcache; [ -f .fi/triton.tgz ] && tar xzf .fi/triton.tgz -C /tmp/tcache
stages=${*:-check tests decode e2e}
for s in $stages; do
  case $s in
    check) python3 -c 'import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())' 2>&1 | tee "$OUT/check.log"
           python3 -c 'import flashinfer; print("flashinfer", flashinfer.__version__)' 2>&1 | tail -1 | tee -a "$OUT/check.log" ;;
    tests) # SIGINT at the limit: pytest still prints its summary of failures
           timeout -k 20 -s INT ${TEST_TIMEOUT:-300} python3 -m pytest -v -rfEs --tb=short --durations=8 ${PYTEST_ARGS:-} \
             tests/test_kernels_*.py tests/test_wrappers_*.py tests/test_custom_ops.py -p no:cacheprovider 2>&1 | grep -v -i "benchmark" \
             | tee "$OUT/tests.log" | grep -E "FAILED|ERROR|passed|failed|Error" | tail -40 ;;
    seam) timeout -k 10 -s INT ${SEAM_TIMEOUT:-240} python3 -m pytest -v -rfEs --tb=short -p no:cacheprovider \
             tests/test_wrappers_seam.py 2>&1 | tee "$OUT/seam.log" | tail -8 ;;
    tcsave) tar czf "$OUT/triton.tgz" -C /tmp/tcache . && ls -la "$OUT/triton.tgz" ;;
    jitsave) (cd /tmp/fiws && find . -name '*.so' | tar czf "$OUT/fi_jit.tgz" -T -) && ls -la "$OUT/fi_jit.tgz" ;;
    kt) timeout 240 python3 -m pytest -q -rf tests/test_kernels_decode.py -p no:cacheprovider 2>&1 \
             | tee "$OUT/tests.log" | tail -15 ;;
    decode) timeout ${DECODE_TIMEOUT:-420} python3 benchmarks/kernels/bench_decode.py --out-dir "$OUT" ${BENCH_ARGS:-} 2>&1 \
             | tee "$OUT/decode.log" | tail -60 ;;
    ncu) NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
         timeout 240 "$NCU" --clock-control none -k "regex:decode_(rowwise_)?kernel" --launch-skip 3 --launch-count 4 \
           --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
           --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis \
           python3 benchmarks/kernels/profile_decode.py > "$OUT/ncu.txt" 2>&1
         grep -E "^  [a-z_]+decode_(rowwise_)?kernel|Duration|Throughput|Registers Per|Achieved Occupancy|Theoretical Occupancy|Block Limit Reg|Warp Cycles Per Issued|Local Memory|Stall|L1/TEX Hit|Mem Busy|Max Bandwidth|Waves Per SM|Executed Ipc A|Issue Slots Busy|Pipe" "$OUT/ncu.txt" | head -120 ;;
    e2e) KO=$(python3 -c 'import json,sys; print(json.dumps(json.load(open(sys.argv[1]))["tuned"]["best"]))' "$OUT/decode.json" 2>/dev/null || echo null)
         timeout 240 python3 benchmarks/kernels/bench_e2e.py --kernel-options "$KO" --out "$OUT/decode_e2e.json" 2>&1 | tee "$OUT/e2e.log" | tail -8 ;;
  esac
done
