#!/usr/bin/env bash
# DeepSeek-V4-Flash on one Cloud TPU v5p-256 slice (128 chips x 95 GB, 32 hosts x 4 chips).
# The flash recipe (deepseek_v4/recipes.py) sets the LR schedule, the batch ramp to 75.5M tokens per step, the
# sequence-length stages and the attention phases; the run crosses its stages by itself and picks each stage's
# gradient accumulation from the memory plan. Per stage (mesh, GB per chip, accumulation, days at 40% MFU):
#   python -m tools.plan_run --recipe=flash --chips=128 --chip=v5p
# -> 4K stages on fsdp=8,expert=16 at ~78 GB of 95; from the 16K stage on, one sequence per chip does not fit
#    without context parallelism: the run saves and stops there with a one-line message (announced at the start).
# Every host runs the same command; --distributed_auto lets jax.distributed read the slice from the TPU metadata.
# --data and --workdir must be directories every host sees (NFS / Filestore or a gcsfuse mount).
set -euo pipefail
TPU=${TPU:?name of the TPU VM}; ZONE=${ZONE:?its zone}
gcloud compute tpus tpu-vm scp --recurse --zone="$ZONE" --worker=all . "$TPU":deepseek-v4-jax
gcloud compute tpus tpu-vm ssh "$TPU" --zone="$ZONE" --worker=all --command='
  cd deepseek-v4-jax && pip install -q -e . "jax[tpu]" &&
  python -m experiments.pretrain --recipe=flash --distributed_auto --mesh=fsdp=8,expert=16 \
    --data=/mnt/shared/data/pretrain --workdir=/mnt/shared/runs/flash-v5p256'
# Two slices (multislice): the same command with --mesh=data=2,fsdp=8,expert=16; the data axis is split across
# slices, so only the gradient all-reduce crosses the data-centre network.
