#!/usr/bin/env bash
# The whole GPU check in one command (see benchmarks/gpu/README.md):
#
#   benchmarks/gpu/run.sh [--cpu] [--tiny] [--size 3b|1b|tiny] [OUTDIR]
#
# 1 env     nvidia-smi, python, torch/CUDA, transformers, trl, accelerate, peft, deepspeed versions
# 2 tests   the CUDA-marked tests (pytest -m gpu)
# 3 bench   vlmr1 vs trl.GRPOTrainer, bf16 + SDPA, 448px images, G 8, 256 new tokens, beta 0.04
#           (benchmarks/gpu/bench.py): s/step, tokens/s, MFU, peak GPU memory
# 4 steps   one LoRA step and one frozen-vision step on the benchmark model, the quickstart on
#           the device reaching its accuracy target (benchmarks/gpu/steps.py)
# 5 zero2, zero3   two steps under `accelerate launch` with examples/multinode's DeepSpeed configs
#
# On the GPU machine it first installs the wheels of benchmarks/gpu/wheels.txt from .whl/ (no
# network there) and the project itself (editable, no deps), and stops with exit 3 if a wheel is
# missing. Every step runs under a time cap and is recorded even when it fails; the exit status
# is 1 if any step failed. Small results go to OUTDIR (default $OUT, else runs/gpu-check):
# run.log env.txt summary.json bench.json steps.json logs.tar.gz (<= 8 files, as the device
# tool returns); the model and full logs stay in WORK (default: a temp dir).
#   --cpu    run on CPU with the current environment (no wheel install; DeepSpeed steps are
#            skipped unless deepspeed imports)    --tiny   tiny model and minimal steps
# Env: PYTHON (default python3 on GPU, .venv/bin/python with --cpu), WHEEL_DIR (.whl), WORK,
#   SKIP_STEPS (e.g. "zero2 zero3": recorded as skipped).
set -uo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$ROOT"

CPU=0 TINY=0 SIZE="" OUTDIR="" CHECK_WHEELS_ONLY=0
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu) CPU=1 ;;
    --tiny) TINY=1 ;;
    --size) SIZE="$2"; shift ;;
    --check-wheels) CHECK_WHEELS_ONLY=1 ;;
    -h|--help) sed -n '2,24p' "$0"; exit 0 ;;
    -*) echo "run.sh: unknown option $1" >&2; exit 2 ;;
    *) OUTDIR="$1" ;;
  esac
  shift
done
OUTDIR="${OUTDIR:-${OUT:-runs/gpu-check}}"
WHEEL_DIR="${WHEEL_DIR:-$ROOT/.whl}"

# ---- wheels --------------------------------------------------------------------------------
check_wheels() {
  local missing=() spec name ver norm
  while read -r spec; do
    name="${spec%%==*}" ver="${spec#*==}"
    norm="$(echo "$name" | tr '-' '_' | tr '[:upper:]' '[:lower:]')"
    compgen -G "$WHEEL_DIR/${norm}-${ver}-*.whl" >/dev/null || missing+=("$spec")
  done < <(sed -e 's/#.*//' -e 's/[[:space:]]//g' benchmarks/gpu/wheels.txt | grep -v '^$')
  if [ ${#missing[@]} -gt 0 ]; then
    echo "error: missing wheel(s) in $WHEEL_DIR: ${missing[*]}" >&2
    echo "  run benchmarks/gpu/fetch_wheels.sh where pip reaches PyPI, and carry .whl to the GPU machine" >&2
    return 3
  fi
  echo "wheels: all $(sed -e 's/#.*//' benchmarks/gpu/wheels.txt | grep -c '==') present in $WHEEL_DIR"
}
if [ "$CHECK_WHEELS_ONLY" = 1 ]; then check_wheels; exit $?; fi

mkdir -p "$OUTDIR"
OUTDIR="$(cd "$OUTDIR" && pwd)"
WORK="${WORK:-$(mktemp -d /tmp/vlmr1-gpu.XXXXXX)}"
mkdir -p "$WORK"
exec > >(tee -a "$OUTDIR/run.log") 2>&1
START=$(date +%s)
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1

if [ "$CPU" = 1 ]; then
  DEV=cpu
  PY="${PYTHON:-$ROOT/.venv/bin/python}"
  test -x "$PY" || PY=python3
else
  DEV=cuda
  PY="${PYTHON:-python3}"
  check_wheels || exit 3
  # The machine cannot download: wheels go to /tmp/site (first on the path), the project is
  # installed editable without dependencies (its entry points register the plugins).
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    "$WHEEL_DIR"/*.whl || { echo "error: installing the wheels failed" >&2; exit 3; }
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
  "$PY" -m pip install -q --no-index --no-deps --no-build-isolation -r requirements-dev.txt \
    || { echo "error: installing vlmr1 (editable, no deps) failed" >&2; exit 3; }
  export DS_ACCELERATOR=cuda  # the deepspeed wheel was built on a machine without a GPU
fi
if [ "$TINY" = 1 ]; then SIZE="${SIZE:-tiny}"; else SIZE="${SIZE:-3b}"; fi
export PY OUTDIR WORK
echo "vlmr1 GPU check: device $DEV, size $SIZE, tiny=$TINY, out $OUTDIR, work $WORK, python $PY"

declare -A STATUS SECS
ORDER=()
step() {  # step NAME CAP_SECONDS CMD...: run, time, record; never aborts the script
  local name="$1" cap="$2"; shift 2
  ORDER+=("$name")
  echo; echo "=== $name (cap ${cap}s): $*"
  local t0 rc
  t0=$(date +%s)
  if declare -F "$1" >/dev/null; then  # a shell function: timeout needs a process
    timeout --kill-after=10 "$cap" bash -c "$(declare -f "$1"); $*"
  else
    timeout --kill-after=10 "$cap" "$@"
  fi
  rc=$?
  SECS[$name]=$(( $(date +%s) - t0 ))
  case $rc in
    0) STATUS[$name]=ok ;;
    124|137) STATUS[$name]="timeout after ${cap}s" ;;
    *) STATUS[$name]="failed (exit $rc)" ;;
  esac
  echo "=== $name: ${STATUS[$name]} in ${SECS[$name]}s"
}
skip() { ORDER+=("$1"); STATUS[$1]="skipped: $2"; SECS[$1]=0; echo; echo "=== $1: skipped: $2"; }

# ---- 1 environment -------------------------------------------------------------------------
env_report() {
  {
    date -u +"date %Y-%m-%dT%H:%M:%SZ"; uname -a; nproc
    if command -v nvidia-smi >/dev/null; then nvidia-smi; else echo "nvidia-smi: not found"; fi
    "$PY" - <<'PY'
import importlib, platform, sys
print("python", sys.version.split()[0], platform.machine())
for m in ("torch", "transformers", "trl", "accelerate", "peft", "deepspeed", "pydantic", "datasets", "tokenizers"):
    try:
        print(m, importlib.import_module(m).__version__)
    except Exception as exc:  # report, don't fail: the later steps say what they need
        print(m, "NOT IMPORTABLE:", type(exc).__name__, str(exc)[:200])
import torch
print("cuda available", torch.cuda.is_available(), "torch cuda", torch.version.cuda)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("gpu", p.name, "capability", f"{p.major}.{p.minor}", "memory GiB", round(p.total_memory / 2**30, 1),
          "bf16", torch.cuda.is_bf16_supported(), "flash sdp", torch.backends.cuda.flash_sdp_enabled())
PY
    "$PY" -m core.plugins list 2>&1 | head -40
  } > "$OUTDIR/env.txt" 2>&1
  cat "$OUTDIR/env.txt"
}
step env 120 env_report

# ---- 2 CUDA-marked tests -------------------------------------------------------------------
step tests 150 "$PY" -m pytest -q -m gpu plugins/devices/cuda -p no:cacheprovider --junitxml="$WORK/tests.xml"

# ---- 3 benchmark ---------------------------------------------------------------------------
if [ "$TINY" = 1 ]; then
  BENCH_ARGS=(--size "$SIZE" --device "$DEV" --steps 2 --warmup 1 --generations 4 --prompts 1
              --max-new-tokens 8 --image-size 56 --lr 1e-4)
  MODE_ARGS=(--generations 4 --prompts 1 --max-new-tokens 8 --image-size 56 --quickstart-steps 2)
else
  BENCH_ARGS=(--size "$SIZE" --device "$DEV" --steps 4 --warmup 1 --generations 8 --prompts 2
              --max-new-tokens 256 --image-size 448 --beta 0.04)
  MODE_ARGS=(--generations 8 --prompts 2 --max-new-tokens 256 --image-size 448)
fi
step bench 300 "$PY" benchmarks/gpu/bench.py --out "$WORK/bench" "${BENCH_ARGS[@]}"
cp "$WORK/bench/bench.json" "$OUTDIR/" 2>/dev/null

# ---- 4 LoRA step, frozen-vision step, quickstart ----------------------------------------------
CKPT="$WORK/bench/model-$SIZE"
if [ -f "$CKPT/config.json" ]; then
  step steps 240 "$PY" benchmarks/gpu/steps.py lora frozen_vision quickstart --out "$WORK/steps" --device "$DEV" \
    --ckpt "$CKPT" "${MODE_ARGS[@]}"
else
  step steps 240 "$PY" benchmarks/gpu/steps.py quickstart --out "$WORK/steps" --device "$DEV" "${MODE_ARGS[@]}"
fi
cp "$WORK/steps/steps.json" "$OUTDIR/" 2>/dev/null

# ---- 5 DeepSpeed ZeRO-2 / ZeRO-3 under accelerate launch (world size 1) ---------------------
for z in zero2 zero3; do
  if [[ " ${SKIP_STEPS:-} " == *" $z "* ]]; then
    skip "$z" "in SKIP_STEPS"
    continue
  fi
  if [ "$DEV" = cpu ] && ! "$PY" -c "import deepspeed" >/dev/null 2>&1; then
    skip "$z" "deepspeed is not installed here (it runs on the GPU machine from .whl)"
    continue
  fi
  step "$z" 150 "$PY" -m accelerate.commands.launch --config_file "examples/multinode/accelerate_$z.yaml" \
    --num_processes 1 --num_machines 1 --main_process_port $((29500 + RANDOM % 1000)) \
    -m core.train --config examples/quickstart/config.yaml "device.name=$DEV" train.max_steps=2 \
    train.per_device_batch_size=32 eval.enabled=false "logging.output_dir=$WORK/$z" logging.progress_bar=false \
    logging.plot=false logging.tensorboard=false
done

# ---- summary -------------------------------------------------------------------------------
TOTAL=$(( $(date +%s) - START ))
{
  for n in "${ORDER[@]}"; do printf '%s\t%s\t%s\n' "$n" "${SECS[$n]}" "${STATUS[$n]}"; done
} > "$WORK/status.tsv"
"$PY" - "$WORK/status.tsv" "$OUTDIR" "$TOTAL" "$DEV" "$SIZE" <<'PY'
import json, sys
from pathlib import Path
tsv, out, total, dev, size = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
steps = {}
for line in Path(tsv).read_text().splitlines():
    name, secs, status = line.split("\t")
    steps[name] = {"status": status, "seconds": int(secs)}
summary = {"device": dev, "size": size, "total_seconds": total, "status": steps}
for f, key in (("bench.json", "bench"), ("steps.json", "modes")):
    if (out / f).is_file():
        data = json.loads((out / f).read_text())
        summary[key] = data.get("summary", data)
(out / "summary.json").write_text(json.dumps(summary, indent=2))
print("\n=== summary (total %ds)" % total)
for name, s in steps.items():
    print(f"{name:8s} {s['seconds']:4d}s  {s['status']}")
PY
tar -czf "$OUTDIR/logs.tar.gz" -C "$WORK" --exclude='model-*' --exclude='checkpoint-*' . 2>/dev/null
FAILED=$(grep -cvP '\t(ok|skipped: .*)$' "$WORK/status.tsv")
[ "$FAILED" = 0 ] && echo "all steps ok or skipped" || echo "$FAILED step(s) failed"
[ "$FAILED" = 0 ]
