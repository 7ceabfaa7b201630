#!/usr/bin/env bash
# Launch `python -m core.train` on N nodes x M GPUs with accelerate. Run it once per node
# (e.g. `srun --ntasks-per-node=1 examples/multinode/launch.sh ...` in a SLURM job).
#
#   examples/multinode/launch.sh ACCELERATE_CONFIG RUN_CONFIG [config overrides ...]
#   e.g. examples/multinode/launch.sh examples/multinode/accelerate_zero3.yaml my_rec.yaml train.max_steps=500
#
# Topology comes from the scheduler; any variable already set wins:
#   NNODES         number of nodes        <- SLURM_NNODES, else SLURM_JOB_NUM_NODES, else 1
#   NODE_RANK      this node's rank       <- SLURM_NODEID, else 0
#   GPUS_PER_NODE  processes per node     <- SLURM_GPUS_ON_NODE, else visible GPUs (nvidia-smi -L), else 1
#   MASTER_ADDR    rendezvous host        <- first host of SLURM_JOB_NODELIST (scontrol), else 127.0.0.1
#   MASTER_PORT    rendezvous port        <- 29500
# (torchrun/Kubernetes-style jobs set MASTER_ADDR/MASTER_PORT themselves; set NNODES and
# NODE_RANK from their variables.) LAUNCH_DRY_RUN=1 prints the command instead of running it.
set -euo pipefail

if [[ $# -lt 2 ]]; then
  sed -n '2,16p' "$0" >&2
  exit 2
fi
ACCEL_CONFIG=$(realpath "$1")
RUN_CONFIG=$(realpath "$2")
shift 2

NNODES=${NNODES:-${SLURM_NNODES:-${SLURM_JOB_NUM_NODES:-1}}}
NODE_RANK=${NODE_RANK:-${SLURM_NODEID:-0}}
if [[ -z "${GPUS_PER_NODE:-}" ]]; then
  if [[ -n "${SLURM_GPUS_ON_NODE:-}" ]]; then
    GPUS_PER_NODE=$SLURM_GPUS_ON_NODE
  elif command -v nvidia-smi >/dev/null 2>&1; then
    GPUS_PER_NODE=$(nvidia-smi -L | wc -l)
  else
    GPUS_PER_NODE=1
  fi
fi
if [[ -z "${MASTER_ADDR:-}" ]]; then
  if [[ -n "${SLURM_JOB_NODELIST:-}" ]] && command -v scontrol >/dev/null 2>&1; then
    MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
  else
    MASTER_ADDR=127.0.0.1
  fi
fi
MASTER_PORT=${MASTER_PORT:-29500}
NUM_PROCESSES=$((NNODES * GPUS_PER_NODE))

# Run from the repository root: the accelerate configs name DeepSpeed files relative to it.
cd "$(dirname "$0")/../.."

CMD=(accelerate launch --config_file "$ACCEL_CONFIG"
     --num_machines "$NNODES" --machine_rank "$NODE_RANK" --num_processes "$NUM_PROCESSES"
     --main_process_ip "$MASTER_ADDR" --main_process_port "$MASTER_PORT"
     -m core.train --config "$RUN_CONFIG" "$@")
echo "node $NODE_RANK/$NNODES, $GPUS_PER_NODE GPU(s) per node, rendezvous $MASTER_ADDR:$MASTER_PORT" >&2
if [[ "${LAUNCH_DRY_RUN:-0}" == "1" ]]; then
  printf '%q ' "${CMD[@]}"
  echo
  exit 0
fi
exec "${CMD[@]}"
