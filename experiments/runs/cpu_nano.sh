#!/usr/bin/env bash
# The README's first command: the nano preset (V4-shaped, ~37M parameters, most of them the 129,280-row
# embedding and head) on the embedded Shakespeare corpus, CPU, default flags.
# Expected on 2 CPU cores: see experiments/LOG.md ("nano default run") for the measured time and loss curve.
# Re-running resumes from runs/nano/checkpoints; the curves: python -m tools.plot_metrics runs/nano
set -euo pipefail
cd "$(dirname "$0")/../.."
python -m experiments.pretrain "$@"
python -m tools.plot_metrics runs/nano
