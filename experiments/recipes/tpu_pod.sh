#!/usr/bin/env bash
# DeepSeek-V4-Flash on one Cloud TPU v5p-256 slice (128 chips x 95 GB, 32 hosts x 4 chips).
# Memory plan (per chip; bf16 compute, f32 params, Muon, dropless MoE, one 4096-token sequence per data shard):
#   python -m tools.memory_plan --config=flash --mesh=fsdp=8,expert=16 --seq_len=4096  -> ~78 GB of 95
# Global batch 256 x 4096 tokens (1M) as 2 microbatches of 128 sequences (one per chip).
# Every host runs the same command; --distributed_auto lets jax.distributed read the slice from the TPU metadata.
# --data and --workdir must be directories every host sees (NFS / Filestore or a gcsfuse mount).
set -euo pipefail
TPU=${TPU:?name of the TPU VM}; ZONE=${ZONE:?its zone}
gcloud compute tpus tpu-vm scp --recurse --zone="$ZONE" --worker=all . "$TPU":deepseek-v4-jax
gcloud compute tpus tpu-vm ssh "$TPU" --zone="$ZONE" --worker=all --command='
  cd deepseek-v4-jax && pip install -q -e . "jax[tpu]" &&
  python -m experiments.pretrain --config=flash --distributed_auto --mesh=fsdp=8,expert=16 \
    --batch_size=256 --grad_accum=2 --seq_len=4096 --data=/mnt/shared/data/pretrain \
    --workdir=/mnt/shared/runs/flash-v5p256'
# Two slices (multislice): the same command with --mesh=data=2,fsdp=8,expert=16 (and twice the batch);
# the data axis is split across slices, so only the gradient all-reduce crosses the data-centre network.
