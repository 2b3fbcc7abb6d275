#!/usr/bin/env bash
# Preemption drill on CPU: start a tiny run, stop it with SIGTERM after 60 s (it finishes the step, saves and
# exits 0), then run the same command again: it resumes from the saved step and ends where an uninterrupted
# run would, bit for bit (tests/experiments/test_faults.py checks exactly this).
# Expected on 2 CPU cores: a few minutes (two model traces; the second run reuses the compilation cache).
set -euo pipefail
cd "$(dirname "$0")/../.."
WORKDIR=${WORKDIR:-runs/tiny_preemption}
ARGS=(--config=tiny --vocab_size=1024 --data=synthetic --batch_size=4 --seq_len=64 --steps=200 --save_every=50
      --log_every=10 --workdir="$WORKDIR")
timeout --signal=TERM 60 python -m experiments.pretrain "${ARGS[@]}" || true
python -m experiments.pretrain "${ARGS[@]}"
python -m tools.plot_metrics "$WORKDIR"
