#!/usr/bin/env bash
# The same program on every host of a Cloud TPU pod slice; jax.distributed.initialize() finds the pod
# (PASTA_MULTIHOST=1). The workdir must be shared storage (a gs:// bucket or a mounted filesystem).
#   bash launch/tpu_pod.sh TPU_NAME ZONE configs/paper.py gs://BUCKET/runs/paper [--config.x=y ...]
# Every argument reaches the remote shell single-quoted, so tuples ('(1,8)'), spaces and ';' stay data.
set -euo pipefail
tpu=${1:?tpu name}; zone=${2:?zone}; config=${3:?config}; workdir=${4:?workdir}; shift 4

quote() {  # One shell word holding exactly $1, for the remote POSIX shell.
  printf "'%s'" "${1//\'/\'\\\'\'}"
}

remote="cd ~/pasta_jax && PASTA_MULTIHOST=1 .venv/bin/python -m pasta_jax.main"
for arg in "--config=$config" "--workdir=$workdir" "$@"; do
  remote+=" $(quote "$arg")"
done
gcloud compute tpus tpu-vm ssh "$tpu" --zone="$zone" --worker=all --command="$remote"
