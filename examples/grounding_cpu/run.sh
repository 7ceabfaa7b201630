#!/usr/bin/env bash
# The grounding example end to end on CPU, one command per stage:
#   base eval -> SFT -> eval -> GRPO from the SFT checkpoint -> eval
#   -> (baseline) more SFT for the CPU time GRPO took -> eval -> results.md
# Each stage's log is in $OUT/logs/, its CPU time in $OUT/times/ ("user sys wall" seconds).
# Knobs (environment): OUT, SFT_STEPS, GRPO_STEPS, EVAL_N, PLUGINS, PYTHON, EXTRA (config overrides added to
# every stage, e.g. EXTRA="task.options.num_objects=1"); see README.md.
set -euo pipefail
cd "$(dirname "$0")/../.."                      # the repository root
HERE=examples/grounding_cpu
OUT=${OUT:-runs/grounding_cpu}
SFT_STEPS=${SFT_STEPS:-300}
GRPO_STEPS=${GRPO_STEPS:-60}
EVAL_N=${EVAL_N:-200}
PLUGINS=${PLUGINS:-qwen-vl,synthetic,grounding}
PY=${PYTHON:-python}                         # e.g. PYTHON=.venv/bin/python
read -r -a EXTRA_ARGS <<< "${EXTRA:-}"
mkdir -p "$OUT/logs" "$OUT/times"

stage() {  # stage NAME COMMAND...: run COMMAND, log to $OUT/logs/NAME.log, CPU seconds to $OUT/times/NAME
  local name=$1; shift
  echo "== $name: $*"
  local TIMEFORMAT="%3U %3S %3R"
  if ! { time "$@" > "$OUT/logs/$name.log" 2>&1 ; } 2> "$OUT/times/$name"; then
    tail -n 30 "$OUT/logs/$name.log"; echo "stage $name failed (log: $OUT/logs/$name.log)"; exit 1
  fi
  grep -E "^(│|SFT done|outputs in)" "$OUT/logs/$name.log" || true
}

EVAL=("$PY" -m core.evaluate --config "$HERE/config.yaml" --plugins "$PLUGINS" --quiet
      "task.options.num_eval=$EVAL_N" "${EXTRA_ARGS[@]}")

stage eval_base  "${EVAL[@]}" --out "$OUT/eval_base"
stage sft        "$PY" -m core.sft --config "$HERE/config.yaml" --plugins "$PLUGINS" --output-dir "$OUT/sft" \
                   "train.max_steps=$SFT_STEPS" "${EXTRA_ARGS[@]}"
stage eval_sft   "${EVAL[@]}" --checkpoint "$OUT/sft" --out "$OUT/eval_sft"
stage grpo       "$PY" -m core.train --config "$HERE/grpo.yaml" --plugins "$PLUGINS" "model.path=$OUT/sft" \
                   "logging.output_dir=$OUT/grpo" "train.max_steps=$GRPO_STEPS" "${EXTRA_ARGS[@]}"
stage eval_grpo  "${EVAL[@]}" --checkpoint "$OUT/grpo" --out "$OUT/eval_grpo"
# The fair baseline: spend GRPO's CPU time on more SFT instead (same learning rate as GRPO, fresh data order).
MORE=$("$PY" "$HERE/compare.py" "$OUT" --equal-steps)
stage sft_more   "$PY" -m core.sft --config "$HERE/config.yaml" --plugins "$PLUGINS" --output-dir "$OUT/sft_more" \
                   "model.path=$OUT/sft" model.tiny=null "train.max_steps=$MORE" train.learning_rate=1.0e-4 \
                   train.lr_scheduler=constant train.warmup_steps=0 train.seed=1 "${EXTRA_ARGS[@]}"
stage eval_sft_more "${EVAL[@]}" --checkpoint "$OUT/sft_more" --out "$OUT/eval_sft_more"

"$PY" "$HERE/compare.py" "$OUT" | tee "$OUT/results.md"
