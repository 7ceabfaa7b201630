#!/usr/bin/env bash
# The grounding example end to end on CPU, one command:
#   SFT warm start -> per seed, from that checkpoint: GRPO (arm A) and more SFT (arm B) at equal CPU
#   seconds -> every saved checkpoint evaluated on the in-domain and out-of-domain splits
#   -> OUT/results.md, OUT/results.json, OUT/accuracy_vs_cpu.png
# Knobs (environment): PYTHON, OUT, SEEDS, SFT_STEPS, GRPO_STEPS, POINTS, EVAL_N, JOBS, EXTRA (config
# overrides added to every stage, e.g. EXTRA="task.options.num_objects=1"), GRPO_EXTRA, SFT_EXTRA,
# PROGRESS_EVERY (seconds between a running stage's progress lines on the console, default 30).
# Each stage is a plain `python -m core.sft|core.train` command (printed, logged under OUT/logs/);
# finished stages are reused when the command is run again with the same OUT. See README.md.
set -euo pipefail
cd "$(dirname "$0")/../.."                      # the repository root
PY=${PYTHON:-.venv/bin/python}                 # the venv `make install` builds (a bare python lacks the plugins)
exec "$PY" examples/grounding_cpu/rl_vs_sft.py \
  --out "${OUT:-runs/grounding_cpu}" \
  --seeds "${SEEDS:-0,1,2}" \
  --sft-steps "${SFT_STEPS:-2500}" \
  --grpo-steps "${GRPO_STEPS:-600}" \
  --points "${POINTS:-6}" \
  --eval-n "${EVAL_N:-200}" \
  --jobs "${JOBS:-2}" \
  --python "$PY" \
  --progress-every "${PROGRESS_EVERY:-30}" \
  --extra "${EXTRA:-}" --grpo-extra "${GRPO_EXTRA:-}" --sft-extra "${SFT_EXTRA:-}"
