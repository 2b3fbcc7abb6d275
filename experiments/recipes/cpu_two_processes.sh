#!/usr/bin/env bash
# The multi-process path on one machine: 2 processes x 4 CPU devices (gloo), the same run as 1 x 8 devices.
# tests/sharding/test_pretrain_multiprocess.py runs exactly this and compares the losses.
set -euo pipefail
for i in 0 1; do
  XLA_FLAGS=--xla_force_host_platform_device_count=4 JAX_PLATFORMS=cpu \
  python -m experiments.pretrain --config=tiny --data=synthetic --steps=3 --batch_size=8 --seq_len=64 \
    --mesh=data=2,expert=4 --workdir=runs/tiny-2proc \
    --coordinator_address=localhost:12355 --num_processes=2 --process_id=$i &
done
wait
