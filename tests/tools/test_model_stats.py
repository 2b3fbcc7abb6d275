"""tools.model_stats at a context length: KV-cache bytes and decode FLOPs of V4 against DeepSeek-V3.2, pinned from
abstract shapes (no weights are allocated). The parameter counts themselves are pinned in
tests/deepseek_v4/test_model.py."""

import functools
import json
import subprocess
import sys

import pytest

from deepseek_v4 import get_config
from tools import model_stats as ms

M = 1048576  # 1M tokens of context


@functools.cache
def _active(name):
    return ms.model_stats(get_config(name))["active_params"]


def test_storage_formats_of_one_entry():
    flash, v32 = get_config("flash"), ms.DEEPSEEK_V32
    assert ms.v4_entry_bytes(flash) == 448 + 448 // 64 + 64 * 2 == 583  # FP8 + UE8M0 scales + BF16 rope
    assert ms.v4_indexer_key_bytes(flash) == 128 // 2 + 128 // 32 == 68  # MXFP4
    assert ms.v32_latent_bytes(v32) == 512 + 4 * 4 + 64 * 2 == 656
    assert ms.v32_indexer_key_bytes(v32) == 128 + 4 == 132


def test_v4_kv_cache_at_1m_by_part():
    # Flash: 43 layers = 2 sliding + 21 CSA + 20 HCA; Pro: 61 = 30 CSA + 31 HCA.
    for name, n_layers, n_csa, n_hca in (("flash", 43, 21, 20), ("pro", 61, 30, 31)):
        kv = ms.kv_cache_bytes(get_config(name), M)
        assert kv["sliding_window"] == n_layers * 128 * 583
        assert kv["csa_entries"] == n_csa * (M // 4) * 583
        assert kv["indexer_keys"] == n_csa * (M // 4) * 68
        assert kv["hca_entries"] == n_hca * (M // 128) * 583
        assert kv["compressor_tails"] == n_csa * 2 * 3 * 4 * (512 + 128) * 4 + n_hca * 2 * 128 * 512 * 4
        assert kv["total"] == sum(v for k, v in kv.items() if k != "total")
    assert ms.kv_cache_bytes(get_config("flash"), M)["total"] == 3_694_274_176


def test_v32_cost_at_1m():
    v32 = ms.DEEPSEEK_V32
    assert ms.v32_kv_cache_bytes(v32, M)["total"] == 61 * M * (656 + 132)
    # V3.2 (= V3's shapes + the indexer): "37B activated parameters" published for V3.
    assert ms.v32_active_params(v32) == 37_477_128_448
    flops = ms.v32_decode_flops(v32, M)
    assert flops["attention"] == 61 * 128 * (2 * 576 + 2 * 512) * 2048
    assert flops["indexer"] == 61 * 2 * 64 * 129 * M
    assert flops["fp8_equivalent"] == flops["projections"] + 2 * flops["attention"] + flops["indexer"]


@pytest.mark.parametrize("name, kv_claim, flops_claim", [("flash", 0.07, 0.10), ("pro", 0.10, 0.27)])
def test_ratios_reproduce_the_published_claims_within_2_points(name, kv_claim, flops_claim):
    cfg = get_config(name)
    r = ms.compare_with_v32(cfg, M, active_params=_active(name))["ratios"]
    assert abs(r["kv_cache"] - kv_claim) < 0.02
    assert abs(r["flops_fp8_equivalent"] - flops_claim) < 0.02
    # Pinned values (README table): KV 7.3% / 10.5%, FP8-equivalent FLOPs 9.9% / 26.3%, plain FLOPs 12.1% / 26.1%.
    expected = {"flash": (0.0733, 0.0993, 0.1210), "pro": (0.1050, 0.2632, 0.2609)}[name]
    assert (round(r["kv_cache"], 4), round(r["flops_fp8_equivalent"], 4), round(r["flops"], 4)) == expected


def test_decode_flops_terms():
    flash = get_config("flash")
    f = ms.decode_flops(flash, M, active_params=_active("flash"))
    assert f["projections"] == 2 * _active("flash")
    # 21 CSA layers see 128 + 512 keys, 20 HCA layers 128 + 8192, 2 sliding layers 128; 64 heads of 512.
    assert f["attention"] == 4 * 512 * 64 * (21 * 640 + 20 * (128 + 8192) + 2 * 128)
    assert f["indexer"] == 21 * 2 * 64 * 129 * (M // 4)
    assert f["fp8_equivalent"] == f["projections"] + 2 * f["attention"] + f["indexer"] / 2


def test_short_context_and_bad_input():
    tiny = get_config("tiny")  # window 16, CSA 4, HCA 16, top-k 8
    kv = ms.kv_cache_bytes(tiny, 10)
    entry = ms.v4_entry_bytes(tiny)
    assert kv["sliding_window"] == 6 * 10 * entry
    assert kv["csa_entries"] == 3 * 2 * entry and kv["hca_entries"] == 0
    f = ms.decode_flops(tiny, 10, active_params=0)
    assert f["attention"] == 4 * 64 * 4 * (6 * 10 + 3 * 2)
    for bad in (0, -5, 1.5, True):
        with pytest.raises(ValueError, match="positive number of tokens"):
            ms.kv_cache_bytes(tiny, bad)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        ms.compare_with_v32(tiny, 257, active_params=0)


def test_command_line_keeps_the_counts_and_adds_the_comparison():
    run = functools.partial(subprocess.run, capture_output=True, text=True, timeout=300)
    out = run([sys.executable, "-m", "tools.model_stats", "--config=tiny", "--context=256", "--json"])
    assert out.returncode == 0, out.stderr
    stats = json.loads(out.stdout)
    assert {"total_params", "total_params_with_mtp", "active_params"} <= set(stats)
    assert stats["inference"]["context"] == 256 and "ratios" in stats["inference"]
    table = run([sys.executable, "-m", "tools.model_stats", "--config=tiny", "--context=256"])
    assert "ratio v4 / v3.2" in table.stdout and "active_params" in table.stdout
    bad = run([sys.executable, "-m", "tools.model_stats", "--config=tiny", "--context=0"])
    assert bad.returncode != 0 and "positive number of tokens" in bad.stderr
