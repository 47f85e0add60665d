#!/usr/bin/env bash
# One process on this machine: bash launch/local.sh configs/quickstart.py runs/quickstart [--config.x=y ...]
set -euo pipefail
config=${1:?config file}; workdir=${2:?workdir}; shift 2
exec python -m pasta_jax.main --config="$config" --workdir="$workdir" "$@"
