"""One process of a two-process job that logs GRPO rollout statistics: each process holds its own prompts' sums and
counts (`shares`), and `grpo.record_over_processes` must give every process the record of the whole step.

Launched by `test_grpo_processes.py` (gloo collectives on CPU); writes this process's record as JSON to --out.
"""

from __future__ import annotations

import argparse
import json


def shares(process: int) -> list:
    """Two logged steps of one process's rollout statistics (made-up sums and counts that differ by process)."""
    from deepseek_v4.grpo import StepStats

    return [StepStats(reward_sum=2.0 + process + step, reward_sq_sum=2.0 + 3 * process + step, rewarded=4 + step,
                      length_sum=10.0 + 5 * process, sampled=4 + 2 * process, kept=3 + process, rows=4 + 2 * process,
                      signal=1 + process * step, groups=2 + process, skipped_groups=process, skipped_samples=2 * process,
                      errors=[])
            for step in range(2)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--coordinator_address", required=True)
    parser.add_argument("--num_processes", type=int, required=True)
    parser.add_argument("--process_id", type=int, required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    from sharding import mesh as mesh_lib

    mesh_lib.init_distributed(args.coordinator_address, args.num_processes, args.process_id)
    import jax

    from deepseek_v4 import grpo

    record = grpo.record_over_processes(shares(jax.process_index()))
    with open(f"{args.out}.{args.process_id}.json", "w", encoding="utf-8") as f:
        json.dump(record, f)


if __name__ == "__main__":
    main()
