#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
#
# `make serve`: a sphkv SGLang server for SmolLM2-135M-Instruct on 127.0.0.1:30000.
#
# Steps: the environment exists (the Makefile's `env` prerequisite), the model folder is converted
# (`make model` -> python -m sphkv_hf.prepare_model), and then
#   * on a machine with an NVIDIA GPU: the server runs on it as is;
#   * without one: SGLang's CPU engine (SGLANG_USE_CPU_ENGINE=1, the stand-in libcuda.so.1 built by
#     `make stub`, one OpenMP thread, --device cpu, --sleep-on-idle).
# Overrides (environment): HOST, PORT, BUDGET (KV memory, e.g. 512MiB), PRESET (sphkv-8|4|3|2),
# MODEL (a HF safetensors folder), EXTRA (more SGLang / --sphkv-* flags), VENV, STUB_DIR.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${VENV:-$(ls -d "$HOME"/.cache/sphkv/venv-*/ 2>/dev/null | head -1)}
PY="${VENV%/}/bin/python"
HOST=${HOST:-127.0.0.1}
PORT=${PORT:-30000}
BUDGET=${BUDGET:-512MiB}
PRESET=${PRESET:-sphkv-4}
STUB_DIR=${STUB_DIR:-$HOME/.cache/sphkv/stub}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

if [[ ! -x "$PY" ]]; then
  echo "serve.sh: no Python environment at '$VENV' (run: make env)" >&2
  exit 1
fi

if [[ -z "${MODEL:-}" ]]; then
  make -s -C "$ROOT" model
  MODEL="$ROOT/.cache/models/SmolLM2-135M-Instruct"
fi

DEVICE_ARGS=()
if [[ -e /dev/nvidia0 || -e /dev/nvidiactl ]]; then
  echo "serve.sh: NVIDIA GPU found; serving on it"
else
  make -s -C "$ROOT" stub STUB_DIR="$STUB_DIR"
  export SGLANG_USE_CPU_ENGINE=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  export LD_LIBRARY_PATH="$STUB_DIR${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  DEVICE_ARGS=(--device cpu --sleep-on-idle)
  echo "serve.sh: no GPU; SGLang CPU engine with the stand-in driver in $STUB_DIR"
fi

echo "serve.sh: sphkv server (preset $PRESET, KV budget $BUDGET) for $MODEL on http://$HOST:$PORT"
# shellcheck disable=SC2086
exec "$PY" -m sphkv_sglang.launch_server --model-path "$MODEL" --host "$HOST" --port "$PORT" \
  --dtype bfloat16 --sphkv --sphkv-preset "$PRESET" --sphkv-budget "$BUDGET" \
  "${DEVICE_ARGS[@]}" ${EXTRA:-}
