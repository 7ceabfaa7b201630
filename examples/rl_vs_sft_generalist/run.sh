#!/usr/bin/env bash
# RL vs SFT from a generalist base, end to end on CPU, one command (README.md):
#   per seed: the generalist base (core.sft on base.yaml's mixture) -> evaluated per task (held out)
#   -> from that base, per learning rate of the sweep: GRPO (grpo.yaml) and SFT (new_task.yaml) on the
#   narrow new task, POINTS checkpoints each -> every checkpoint evaluated on probe.yaml (the new task,
#   the prior tasks, the OOD combination) with KL(pi || base) -> analyze.py -> OUT/results.md,
#   OUT/results/summary.json, OUT/results/*.png, OUT/results/raw.json
# Knobs (environment):
#   PYTHON      the interpreter (default .venv/bin/python: a bare python lacks the plugins)
#   OUT         output folder (default runs/rl_vs_sft_generalist); finished stages are reused on rerun
#   SEEDS       comma-separated seeds; each seed trains its own base and both arms from it (default 0,1,2)
#   BASE_STEPS  SFT steps of the base (default 4000)
#   ARM_STEPS   steps of each arm run (default 300); a multiple of POINTS
#   POINTS      checkpoints per arm run, evenly spaced, the last at ARM_STEPS (default 3)
#   LRS         learning rates of the sweep, both arms (default 3e-5,1e-4,3e-4); GRPO_LRS / SFT_LRS override per arm
#   EVAL_N      held-out samples per probe task and checkpoint (default 100; at most 1000)
#   THREADS     torch threads per stage (default 2; stages run one at a time)
#   EXTRA       config overrides for every stage (shell words, e.g. "grpo.max_completion_length=18")
#   BASE_EXTRA, GRPO_EXTRA, SFT_EXTRA, EVAL_EXTRA   overrides for one kind of stage only
#   PLUGINS     plugins to load (default qwen-vl,synthetic,grounding,text)
# Each stage is a plain `python -m core.sft|core.train|core.evaluate` command, printed and logged under
# OUT/logs/ (`tail -f` one to watch it).
set -euo pipefail
cd "$(dirname "$0")/../.."                       # the repository root
HERE=examples/rl_vs_sft_generalist
PY=${PYTHON:-.venv/bin/python}
OUT=${OUT:-runs/rl_vs_sft_generalist}
SEEDS=${SEEDS:-0,1,2}
BASE_STEPS=${BASE_STEPS:-4000}
ARM_STEPS=${ARM_STEPS:-300}
POINTS=${POINTS:-3}
LRS=${LRS:-3e-5,1e-4,3e-4}
GRPO_LRS=${GRPO_LRS:-$LRS}
SFT_LRS=${SFT_LRS:-$LRS}
EVAL_N=${EVAL_N:-100}
THREADS=${THREADS:-2}
PLUGINS=${PLUGINS:-qwen-vl,synthetic,grounding,text}
export OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS

# Overrides are shell words (quotes group a value with spaces: "'model.tiny={hidden_size: 32}'").
eval "extra=(${EXTRA:-})"; eval "base_extra=(${BASE_EXTRA:-})"; eval "grpo_extra=(${GRPO_EXTRA:-})"
eval "sft_extra=(${SFT_EXTRA:-})"; eval "eval_extra=(${EVAL_EXTRA:-})"

if (( ARM_STEPS < POINTS || ARM_STEPS % POINTS )); then
  echo "error: ARM_STEPS ($ARM_STEPS) must be a positive multiple of POINTS ($POINTS): checkpoints are evenly" \
       "spaced and the last one is the final step" >&2
  exit 2
fi
if (( EVAL_N < 1 || EVAL_N > 1000 )); then
  echo "error: EVAL_N ($EVAL_N) must be 1..1000 (probe.yaml's num_eval per task)" >&2
  exit 2
fi
IFS=, read -ra seeds <<< "$SEEDS"
IFS=, read -ra grpo_lrs <<< "$GRPO_LRS"
IFS=, read -ra sft_lrs <<< "$SFT_LRS"
every=$(( ARM_STEPS / POINTS ))
plug=(--plugins "$PLUGINS")
mkdir -p "$OUT/logs"
OUT=$(cd "$OUT" && pwd)                         # absolute: it is written into the runs' configs
t0=$SECONDS

# stage NAME CMD...: run CMD with its output in OUT/logs/NAME.log; on failure show the log's tail, stop.
stage() {
  local name=$1; shift
  local log="$OUT/logs/$name.log" t=$SECONDS
  echo "== $*  (log: $log)"
  if ! "$@" > "$log" 2>&1; then
    tail -n 25 "$log" >&2
    echo "error: stage $name failed (log: $log)" >&2
    exit 1
  fi
  echo "   done in $(( SECONDS - t )) s"
}

# probe NAME CHECKPOINT BASE: the held-out probe (new task, OOD, prior tasks) of one checkpoint, with
# KL(checkpoint || BASE) on the sampled completions, to OUT/seedS/eval/NAME/summary.json.
probe() {
  local name=$1 ckpt=$2 base=$3 dest=$4
  [[ -f "$dest/summary.json" ]] && return 0
  stage "eval_${name//\//_}" "$PY" -m core.evaluate --config "$HERE/probe.yaml" "${plug[@]}" \
    --checkpoint "$ckpt" --split eval --limit $(( 5 * EVAL_N )) --out "$dest" --quiet \
    "${extra[@]}" "${eval_extra[@]}" "model.path=$ckpt" model.tiny=null "eval.kl_base=$base"
}

for seed in "${seeds[@]}"; do
  S="$OUT/seed$seed"
  base="$S/base"
  # 1. the generalist base (its own random init per seed: model.tiny.seed)
  if [[ ! -f "$base/sft_state.json" ]]; then
    stage "seed${seed}_base" "$PY" -m core.sft --config "$HERE/base.yaml" "${plug[@]}" --output-dir "$base" \
      "model.path=$S/init" "${extra[@]}" "${base_extra[@]}" "model.tiny.seed=$seed" "train.seed=$seed" \
      "train.max_steps=$BASE_STEPS"
  fi
  # 2. its accuracy per task on held-out data (KL to itself: 0 up to float noise, a check of the probe)
  probe "seed${seed}/base" "$base" "$base" "$S/eval/base"
  # 3. both arms from that base, over the learning-rate sweep
  for lr in "${grpo_lrs[@]}"; do
    run="$S/grpo/lr$lr"
    if [[ ! -f "$run/checkpoint-$ARM_STEPS/config.json" ]]; then
      stage "seed${seed}_grpo_lr$lr" "$PY" -m core.train --config "$HERE/grpo.yaml" "${plug[@]}" \
        "${extra[@]}" "${grpo_extra[@]}" "model.path=$base" model.tiny=null "logging.output_dir=$run" \
        "train.learning_rate=$lr" "train.max_steps=$ARM_STEPS" "train.seed=$seed" \
        "checkpoint.save_every=$every" "checkpoint.keep_last=$(( POINTS + 1 ))"
    fi
  done
  for lr in "${sft_lrs[@]}"; do
    run="$S/sft/lr$lr"
    if [[ ! -f "$run/sft_state.json" ]]; then
      stage "seed${seed}_sft_lr$lr" "$PY" -m core.sft --config "$HERE/new_task.yaml" "${plug[@]}" \
        --output-dir "$run" --save-steps "$every" "${extra[@]}" "${sft_extra[@]}" "model.path=$base" \
        model.tiny=null "train.learning_rate=$lr" "train.max_steps=$ARM_STEPS" "train.seed=$seed"
    fi
  done
  # 4. every checkpoint of both arms on the probe
  for arm in grpo sft; do
    if [[ $arm == grpo ]]; then lrs=("${grpo_lrs[@]}"); else lrs=("${sft_lrs[@]}"); fi
    for lr in "${lrs[@]}"; do
      for (( step = every; step <= ARM_STEPS; step += every )); do
        ckpt="$S/$arm/lr$lr/checkpoint-$step"
        if [[ ! -f "$ckpt/config.json" ]]; then
          echo "error: $ckpt is missing (the $arm run should save a checkpoint every $every steps)" >&2
          exit 1
        fi
        probe "seed${seed}/${arm}_lr${lr}_step$step" "$ckpt" "$base" "$S/eval/$arm/lr$lr/step$step"
      done
    done
  done
done

# 5. the report
"$PY" "$HERE/analyze.py" --out "$OUT" --seeds "$SEEDS" --grpo-lrs "$GRPO_LRS" --sft-lrs "$SFT_LRS" \
  --arm-steps "$ARM_STEPS" --points "$POINTS" --eval-n "$EVAL_N" --base-steps "$BASE_STEPS" \
  --wall-s $(( SECONDS - t0 ))
