#!/usr/bin/env bash
# DeepSeek-V4-Flash on 8 nodes x 8 H200 (64 GPUs x 141 GB) under SLURM: sbatch experiments/recipes/gpu_cluster.sh
# Memory plan (per GPU; bf16 compute, f32 params, Muon, dropless MoE, one 4096-token sequence per data shard):
#   python -m tools.memory_plan --config=flash --mesh=fsdp=8,expert=8 --seq_len=4096  -> ~124 GB of 141
# Global batch 256 x 4096 tokens (1M) as 4 microbatches of 64 sequences (one per GPU). expert (8) is the fastest
# mesh axis: one expert group per node, so the MoE all-to-all stays on NVLink; fsdp spans the nodes.
# One process per node; --distributed_auto reads SLURM_* for jax.distributed.
# Install once into a venv every node sees: pip install -e . "jax[cuda12]"
# Without SLURM, run on node i: ... --coordinator_address=<node0>:12345 --num_processes=8 --process_id=<i>
#SBATCH --job-name=v4-flash --nodes=8 --ntasks-per-node=1 --gpus-per-node=8 --exclusive
set -euo pipefail
srun --kill-on-bad-exit=1 python -m experiments.pretrain --config=flash --distributed_auto \
  --mesh=fsdp=8,expert=8 --batch_size=256 --grad_accum=4 --seq_len=4096 \
  --data=/shared/data/pretrain --workdir=/shared/runs/flash-h200x64
