"""`tools.device_check` on CPU: toy shapes, Pallas in interpret mode, the tiny config; one JSON object."""

import json
import subprocess
import sys

import pytest

from tests.sharding.launch import ROOT, subprocess_env
from tools import device_check


def test_speedups_and_rates_arithmetic():
    rows = [{"case": "csa_sparse_attention fwd+bwd [pallas_gpu]", "seconds": 2.0},
            {"case": "csa_sparse_attention fwd+bwd [reference]", "seconds": 6.0},
            {"case": "expert_matmul bf16 [pallas_gpu]", "seconds": 3.0},
            {"case": "expert_matmul fp8 [pallas_gpu]", "seconds": 2.0},
            {"case": "expert_matmul fp8 [reference]", "error": "boom"},
            {"case": "linear fp8 (fp8_gemm) [xla]", "seconds": 1.0}, {"case": "linear bf16 [xla]", "seconds": 1.5}]
    assert device_check.speedups(rows) == {"csa_sparse_attention fwd+bwd: reference / kernel": 3.0,
                                           "expert_matmul: bf16 / fp8 time": 1.5, "linear: bf16 / fp8 time": 1.5}
    got = device_check.goals({"speedups": device_check.speedups(rows),
                              "train_step": [{"quant": "none", "mfu": 0.5}, {"quant": "fp8", "error": "x"}]})
    assert got["csa_sparse_attention fwd+bwd: reference / kernel"] == {"value": 3.0, "target": 3.0, "met": True}
    assert got["expert_matmul: bf16 / fp8 time"]["met"] is True and got["train step MFU (bf16)"]["met"] is True
    r = device_check._rates(2.0, 4e12, 1e9, "bf16")
    assert r["tflops"] == 2.0 and r["gbps"] == 0.5


@pytest.mark.slow
def test_small_run_writes_one_json(tmp_path):
    out = tmp_path / "check.json"
    proc = subprocess.run([sys.executable, "-m", "tools.device_check", f"--out={out}"], cwd=ROOT, capture_output=True,
                          text=True, timeout=1500, env=subprocess_env(8, compilation_cache=True))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["size"] == "small" and result["backend"] == "cpu"
    assert "skipped" in result["kernel_tests"]
    cases = {r["case"] for r in result["kernels"]}
    assert {"csa_sparse_attention fwd+bwd [pallas_gpu]", "expert_matmul mxfp4 [reference]",
            "lightning_indexer [pallas_gpu]", "linear fp8 (fp8_gemm) [xla]"} <= cases
    assert all("seconds" in r and r["tflops"] > 0 for r in result["kernels"])
    assert [r["quant"] for r in result["train_step"]] == ["none", "fp8"]
    assert all(r["step_s"] > 0 and 0 < r["mfu"] for r in result["train_step"])
    assert "csa_sparse_attention fwd+bwd: reference / kernel" in result["speedups"]
