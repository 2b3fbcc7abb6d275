#!/usr/bin/env bash
# DeepSeek-V4-Flash on 8 nodes x 8 H200 (64 GPUs x 141 GB) under SLURM: sbatch experiments/recipes/gpu_cluster.sh
# The flash recipe (deepseek_v4/recipes.py) sets the LR schedule, the batch ramp to 75.5M tokens per step, the
# sequence-length stages and the attention phases; the run crosses its stages by itself and picks each stage's
# gradient accumulation from the memory plan. Per stage (mesh, GB per GPU, accumulation, days at 40% MFU):
#   python -m tools.plan_run --recipe=flash --chips=64 --chip=h200
# -> 4K stages on fsdp=8,expert=8 at ~124 GB of 141; from the 16K stage on, one sequence per GPU does not fit
#    without context parallelism: the run saves and stops there with a one-line message (announced at the start).
# expert (8) is the fastest mesh axis: one expert group per node, so the MoE all-to-all stays on NVLink; fsdp spans
# the nodes. One process per node; --distributed_auto reads SLURM_* for jax.distributed.
# Install once into a venv every node sees: pip install -e . "jax[cuda12]"
# Without SLURM, run on node i: ... --coordinator_address=<node0>:12345 --num_processes=8 --process_id=<i>
#SBATCH --job-name=v4-flash --nodes=8 --ntasks-per-node=1 --gpus-per-node=8 --exclusive
set -euo pipefail
srun --kill-on-bad-exit=1 python -m experiments.pretrain --recipe=flash --distributed_auto \
  --mesh=fsdp=8,expert=8 --data=/shared/data/pretrain --workdir=/shared/runs/flash-h200x64
