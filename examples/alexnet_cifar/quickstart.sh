#!/usr/bin/env bash
# One command on a fresh CPU machine: install, then train AlexNet in 2 pipeline stages on 2 CPU ranks on the
# built-in data (about 2 minutes). Extra arguments are passed to train.py (e.g. --schedule gpipe).
set -euo pipefail
cd "$(dirname "$0")/../.."
bash .ci/install
export OMP_NUM_THREADS=1 DS_ACCELERATOR=cpu PATH="$PWD/.venv/bin:$PATH"
mkdir -p runs
deepspeed --num_gpus 2 examples/alexnet_cifar/train.py \
    --deepspeed_config examples/alexnet_cifar/ds_config_cpu.json \
    -p 2 --steps 40 --dataset synthetic --image-size 64 \
    --log-json runs/quickstart.json "$@"
echo "log: runs/quickstart.json"
