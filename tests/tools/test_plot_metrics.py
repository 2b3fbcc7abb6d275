"""tools.plot_metrics: several runs overlaid in one PNG; a clear error without --out."""

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run_dir(root, name, losses):
    d = root / name
    d.mkdir()
    with open(d / "metrics.jsonl", "w", encoding="utf-8") as f:
        for step, loss in enumerate(losses, start=1):
            f.write(json.dumps({"step": step, "loss": loss, "mtp_loss": loss + 0.5}) + "\n")
    return str(d)


def test_several_runs_in_one_png(tmp_path):
    a = _run_dir(tmp_path, "base", [9.0, 7.0, 6.0, 5.5])
    b = _run_dir(tmp_path, "fp8", [9.0, 7.1, 6.1, 5.6])
    out = str(tmp_path / "compare.png")
    cmd = [sys.executable, "-m", "tools.plot_metrics", a, b]
    p = subprocess.run(cmd + [f"--out={out}"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "base: steps 1-4, last loss 5.5" in p.stdout and "fp8: steps 1-4, last loss 5.6" in p.stdout
    with open(out, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and p.stderr.strip() == "error: comparing several runs needs --out=PATH"


def test_held_out_metrics_get_their_panels(tmp_path):
    from tools import plot_metrics

    records = [{"step": s, "loss": 9.0 - s, "mtp_loss": 9.5 - s} for s in range(1, 7)]
    for r in records[1::2]:
        r.update({"eval_loss": 9.2 - r["step"], "eval_bits_per_byte": 3.0, "eval_loss_pos_0-1K": 8.0,
                  "eval_loss_pos_1K-4K": 7.5})
    assert plot_metrics._expand(("eval_loss_pos_*",), records) == ("eval_loss_pos_0-1K", "eval_loss_pos_1K-4K")
    out = plot_metrics.plot(records, str(tmp_path / "m.png"))
    with open(out, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
