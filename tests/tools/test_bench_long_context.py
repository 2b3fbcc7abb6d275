"""tools.bench_long_context and tools.bench_attention skip what would not fit by an estimate made before anything
is allocated, and say so; the long-context benchmark reports one JSON object per line."""

import pytest
import json
import os
import subprocess
import sys

from tests.sharding.launch import subprocess_env

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run(args):
    p = subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=900,
                       env=subprocess_env(8, compilation_cache=True))
    assert p.returncode == 0, p.stderr[-2000:]
    return p.stdout


@pytest.mark.slow  # compiles a train step and runs it in subprocesses: ~15 s
def test_long_context_skips_a_run_over_the_memory_limit_and_measures_one_under_it():
    """On the benchmark model's first CSA and HCA layers (`--model=small`): the memory estimate and the skip do not
    depend on the depth. Both runs are the indexer warm-up step at one length (the cheapest step to compile), so the
    second run reads the first one's compiled program from the persistent compilation cache."""
    out = _run(["tools.bench_long_context", "--model=small", "--seq_lens=256", "--phases=warmup", "--steps=1",
                "--max_gib=0.01", "--json"])
    row = json.loads(out.strip().splitlines()[-1])
    assert row["seq_len"] == 256 and row["phase"] == "warmup" and row["seconds"] is None
    assert "max_gib" in row["skipped"] and row["peak_bytes"] > 0.01 * 2**30
    out = _run(["tools.bench_long_context", "--model=small", "--seq_lens=256", "--phases=warmup", "--steps=1",
                "--json"])
    row = json.loads(out.strip().splitlines()[-1])
    assert row["phase"] == "warmup" and row["seconds"] > 0 and row["peak_rss_bytes"] > 0 and "skipped" not in row


def test_attention_bench_skips_the_full_mask_before_allocating_it():
    """The README's command: the 128K full-mask baseline (a 21 GB mask) is skipped by the estimate."""
    out = _run(["tools.bench_attention", "--seq_lens=131072", "--kinds=full_mask_fwd", "--json", "--log="])
    rows = json.loads(out[out.index("["):])
    assert rows[0]["seconds"] is None and rows[0]["skipped"].startswith("estimated")
