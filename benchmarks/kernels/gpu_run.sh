#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# One device call: software check, kernel tests on CUDA, the decode sweep, the end-to-end step.
# Usage on the device machine (repo root): bash benchmarks/kernels/gpu_run.sh [stages...]
#   stages: check seam (tests/test_wrappers_seam.py) tests kt (kernel tests only) decode ncu e2e tcsave jitsave extend
#   xsweep (TILES_SWEEP: extend tiles variants compiled in parallel, then timed; EXTEND_TAG names extend's logs)
#   (default: check tests decode e2e); PYTEST_ARGS passes e.g. '-n 12' to the tests stage (TEST_FILES, TESTS_LOG
#   override its files and log name);
#   BENCH_ARGS passes extra arguments to bench_decode.py. FlashInfer, if carried, is .fi/site.tgz (a trimmed
#   flashinfer-python 0.7.2.post1 + apache-tvm-ffi tree, JIT-built on the device) or .fi/site; the JIT modules
#   of an earlier call travel as .fi/jit.tgz (stage `jitsave` writes them to $OUT/fi_jit.tgz) and load as AOT modules.
#   The Triton and FlashInfer caches live in the git-ignored .tcache/ and .fiws/ of the checkout, so a later call on
#   the same (still warm) machine finds them; `tcsave` writes the Triton cache as <= 15 MB parts
#   ($OUT/triton.tgz.partNN: the device returns files of at most 16 MB), carried back as .fi/triton.tgz.part*.
#   `warm` (started in the background before the tests) builds FlashInfer's modules and the benches' Triton kernels
#   while the tests run; `extend` times chunked prefill over a coded prefix (bench_extend.py). LOGS (default $OUT)
#   is where stage logs go.
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
LOGS=${LOGS:-$OUT}; mkdir -p "$LOGS"
FISITE="$PWD/.fi/site"
# unpacked once per machine (a second gpu_run.sh started in the background, e.g. `warm`, reuses it)
if [ -f .fi/site.tgz ]; then
  FISITE=/tmp/fi/site
  if [ ! -f /tmp/fi/.unpacked ]; then
    mkdir -p /tmp/fi && tar xzf .fi/site.tgz -C /tmp/fi
    # an earlier call's JIT modules load as AOT modules (flashinfer/data/aot/<name>/<name>.so: no ninja, no rebuild)
    [ -f .fi/jit.tgz ] && mkdir -p "$FISITE/flashinfer/data/aot" && tar xzf .fi/jit.tgz -C "$FISITE/flashinfer/data/aot"
    touch /tmp/fi/.unpacked
  fi
fi
export FLASHINFER_WORKSPACE_BASE="$PWD/.fiws" FLASHINFER_CUDA_ARCH_LIST=9.0a MAX_JOBS=${MAX_JOBS:-16}
mkdir -p .fiws
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:$FISITE:${PYTHONPATH:-}"
# Triton's kernel cache: a cache from an earlier call (stage tcsave) travels as .fi/triton.tgz (same Triton there)
export TRITON_CACHE_DIR="$PWD/.tcache" SPHKV_CPU_KERNEL=0    # the C++ CPU kernels are CPU-machine tests: not built here
mkdir -p .tcache
if [ ! -f .tcache/.unpacked ]; then
  if ls .fi/triton.tgz.part* >/dev/null 2>&1; then cat .fi/triton.tgz.part* | tar xzf - -C .tcache
  elif [ -f .fi/triton.tgz ]; then tar xzf .fi/triton.tgz -C .tcache; fi
  touch .tcache/.unpacked
fi
stages=${*:-check tests decode e2e}
for s in $stages; do
  case $s in
    check) python3 -c 'import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())' 2>&1 | tee "$LOGS/check.log"
           python3 -c 'import flashinfer; print("flashinfer", flashinfer.__version__)' 2>&1 | tail -1 | tee -a "$LOGS/check.log" ;;
    tests) # SIGINT at the limit: pytest still prints its summary of failures; one CPU thread per worker (torch's
           # default of one per core, times the xdist workers, oversubscribes the CPU-side references)
           OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} timeout -k 20 -s INT ${TEST_TIMEOUT:-300} python3 -m pytest -v -rfEs --tb=short --durations=8 ${PYTEST_ARGS:-} \
             ${TEST_FILES:-tests/test_kernels_*.py tests/test_wrappers_*.py tests/test_custom_ops.py} -p no:cacheprovider 2>&1 \
             | grep -v -i "benchmark" | tee "$LOGS/${TESTS_LOG:-tests}.log" | grep -E "FAILED|ERROR|passed|failed|Error" | tail -40 ;;
    seam) timeout -k 10 -s INT ${SEAM_TIMEOUT:-240} python3 -m pytest -v -rfEs --tb=short -p no:cacheprovider \
             tests/test_wrappers_seam.py 2>&1 | tee "$LOGS/seam.log" | tail -8 ;;
    tcsave) tar czf - -C .tcache --exclude .unpacked . | split -b 15m -d - "$OUT/triton.tgz.part" && ls -la "$OUT"/triton.tgz.part* ;;
    jitsave) # the modules built here and those carried in (loaded as AOT): a later call needs both
             rm -rf /tmp/fijit && mkdir -p /tmp/fijit && { [ -d "$FISITE/flashinfer/data/aot" ] && cp -r "$FISITE/flashinfer/data/aot/." /tmp/fijit/ || true; }
             for so in $(find .fiws -path '*/cached_ops/*/*.so'); do n=$(basename "$so" .so); mkdir -p /tmp/fijit/$n && cp "$so" /tmp/fijit/$n/; done
             tar czf "$OUT/fi_jit.tgz" -C /tmp/fijit . && ls -la "$OUT/fi_jit.tgz" ;;
    warm) python3 benchmarks/kernels/bench_decode.py --warm ${WARM_ARGS:-} > "$LOGS/warm.log" 2>&1; echo "warm: rc $? ($(tail -1 "$LOGS/warm.log"))" ;;
    extend) timeout ${EXTEND_TIMEOUT:-240} python3 benchmarks/kernels/bench_extend.py --out "$LOGS/decode_extend${EXTEND_TAG:-}.json" ${EXTEND_ARGS:-} 2>&1 \
             | tee "$LOGS/extend${EXTEND_TAG:-}.log" | tail -20 ;;
    xsweep) # the extend tiles route's launch variants (TILES_SWEEP, a JSON list): compiled in parallel (one process each,
            # plus bench_decode with DECODE_WARM_ARGS if set), then timed one after the other (bench_extend --tiles-sweep)
            i=0
            for v in $(python3 -c 'import json,os; [print(json.dumps(x, separators=(",", ":"))) for x in json.loads(os.environ["TILES_SWEEP"])]'); do
              python3 benchmarks/kernels/bench_extend.py --check-only --tiles-options "$v" > "$LOGS/xcompile$i.log" 2>&1 &
              i=$((i + 1))
            done
            [ -n "${DECODE_WARM_ARGS:-}" ] && python3 benchmarks/kernels/bench_decode.py ${DECODE_WARM_ARGS} --out-dir /tmp/dwarm > "$LOGS/xcompile_decode.log" 2>&1 &
            wait; echo "xsweep: compiled $i variants"
            timeout ${EXTEND_TIMEOUT:-240} python3 benchmarks/kernels/bench_extend.py --tiles-sweep "$TILES_SWEEP" --batches ${SWEEP_BATCH:-1} \
              --out "$LOGS/extend_sweep.json" 2>&1 | tee "$LOGS/extend_sweep.log" | tail -20 ;;
    kt) timeout 240 python3 -m pytest -q -rf tests/test_kernels_decode.py -p no:cacheprovider 2>&1 \
             | tee "$LOGS/tests.log" | tail -15 ;;
    decode) timeout ${DECODE_TIMEOUT:-420} python3 benchmarks/kernels/bench_decode.py --out-dir "$LOGS" ${BENCH_ARGS:-} 2>&1 \
             | tee "$LOGS/decode.log" | tail -60 ;;
    ncu) NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
         timeout 240 "$NCU" --clock-control none -k "regex:decode_(rowwise_)?kernel" --launch-skip 3 --launch-count 4 \
           --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
           --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis \
           python3 benchmarks/kernels/profile_decode.py > "$LOGS/ncu.txt" 2>&1
         grep -E "^  [a-z_]+decode_(rowwise_)?kernel|Duration|Throughput|Registers Per|Achieved Occupancy|Theoretical Occupancy|Block Limit Reg|Warp Cycles Per Issued|Local Memory|Stall|L1/TEX Hit|Mem Busy|Max Bandwidth|Waves Per SM|Executed Ipc A|Issue Slots Busy|Pipe" "$LOGS/ncu.txt" | head -120 ;;
    e2e) KO=$(python3 -c 'import json,sys; print(json.dumps(json.load(open(sys.argv[1]))["tuned"]["best"]))' "$LOGS/decode.json" 2>/dev/null || echo null)
         timeout ${E2E_TIMEOUT:-240} python3 benchmarks/kernels/bench_e2e.py --kernel-options "$KO" --out "$LOGS/decode_e2e.json" 2>&1 | tee "$LOGS/e2e.log" | tail -8 ;;
  esac
done
