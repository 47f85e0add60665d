#!/usr/bin/env bash
# One process per host of a GPU cluster, started on each host with its own JAX_PROCESS_ID
# (under SLURM: srun sets SLURM_PROCID; use it). All processes see the coordinator on host 0.
#   JAX_COORDINATOR_ADDRESS=host0:1234 JAX_NUM_PROCESSES=4 JAX_PROCESS_ID=$SLURM_PROCID \
#     bash launch/gpu_multihost.sh configs/paper.py /shared/runs/paper
set -euo pipefail
config=${1:?config}; workdir=${2:?workdir}; shift 2
: "${JAX_COORDINATOR_ADDRESS:?set JAX_COORDINATOR_ADDRESS=host:port}"
: "${JAX_NUM_PROCESSES:?set JAX_NUM_PROCESSES}"
export JAX_PROCESS_ID=${JAX_PROCESS_ID:-${SLURM_PROCID:?set JAX_PROCESS_ID or run under srun}}
exec python -m pasta_jax.main --config="$config" --workdir="$workdir" "$@"
