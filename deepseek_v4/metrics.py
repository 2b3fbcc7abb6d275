"""Training metrics: model FLOPs per token (for MFU), a matmul-peak probe, and the metrics writer.

FLOPs follow the usual convention: a training step costs 6 FLOPs per weight used by a token in a matmul
(2 forward, 4 backward) plus 3x the forward attention-score FLOPs, which depend on how many keys a query sees.
Embedding lookups, norms, softmaxes and the mHC Sinkhorn iterations are not counted.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from deepseek_v4.config import Config

# Dense peak FLOP/s per chip, vendor numbers, by a substring of `jax.Device.device_kind` (lower case).
# Keys are tried in order; bf16 tensor-core numbers unless noted.
PEAK_FLOPS_BF16 = (
    ("h200", 989e12),
    ("h100", 989e12),
    ("h800", 989e12),
    ("a100", 312e12),
    ("b200", 2250e12),
    ("v5p", 459e12),
    ("v5 lite", 197e12),
    ("v5e", 197e12),
    ("v6", 918e12),
    ("v4", 275e12),
)


def _layer_matmul_params(cfg: Config, ratio: int) -> dict[str, int]:
    """Weights one token multiplies in one V4 block (attention + MoE + its two mHC sites).

    Hash-routed layers count the router too: they still compute its scores for the gate weights.
    """
    d, q, n, h, o, g = (cfg.hidden_size, cfg.q_lora_rank, cfg.num_attention_heads, cfg.head_dim,
                        cfg.o_lora_rank, cfg.o_groups)
    attn = d * q + q * n * h + d * h + n * h * o + g * o * d  # wq_a, wq_b, wkv, wo_a (grouped), wo_b
    if ratio:
        c = 2 if ratio == cfg.csa_ratio else 1
        attn += 2 * d * c * h  # compressor wkv + wgate
    if ratio == cfg.csa_ratio:
        ni, hi = cfg.index_n_heads, cfg.index_head_dim
        attn += q * ni * hi + d * ni + 2 * d * 2 * hi  # indexer wq_b, weights_proj, its compressor
    mhc = 2 * cfg.hc_mult * d * cfg.hc_dim  # hc_attn.fn + hc_ffn.fn
    f = cfg.moe_intermediate_size
    moe = d * cfg.n_routed_experts + 3 * d * f * (cfg.num_experts_per_tok + cfg.n_shared_experts)
    return {"attention": attn, "mhc": mhc, "moe": moe}


def active_matmul_params(cfg: Config) -> dict[str, int]:
    """Matmul weights used per token, by part (the embedding lookup excluded), main model and MTP."""
    parts = {"attention": 0, "mhc": 0, "moe": 0, "head": 0, "mtp_extra": 0}
    for ratio in cfg.layer_ratios:
        for k, v in _layer_matmul_params(cfg, ratio).items():
            parts[k] += v
    d, r = cfg.hidden_size, cfg.hc_mult
    parts["head"] = d * cfg.vocab_size
    parts["mhc"] += r * d * r  # hc_head
    for ratio in cfg.mtp_ratios:
        for k, v in _layer_matmul_params(cfg, ratio).items():
            parts[k] += v
        parts["mtp_extra"] += 2 * d * d + r * d * r + d * cfg.vocab_size  # e_proj, h_proj, hc_head, head
    return parts


def _mean_keys(seq_len: int, window: int, ratio: int, topk: int | None) -> tuple[float, float]:
    """Average over query positions of (keys attended, compressed entries visible) for one layer."""
    t = np.arange(seq_len, dtype=np.float64)
    keys = np.minimum(t + 1, window)
    visible = np.floor((t + 1) / ratio) if ratio else np.zeros_like(t)
    chosen = np.minimum(visible, topk) if topk is not None else visible
    return float(np.mean(keys + chosen)), float(np.mean(visible))


def attention_flops_per_token(cfg: Config, seq_len: int, *, sparse_attention: bool = True) -> float:
    """Forward attention-score FLOPs per token (QK^T, PV and the CSA indexer scores), main model and MTP.

    Assumes one document fills the row (causal attention over up to `seq_len` positions).
    """
    n, h = cfg.num_attention_heads, cfg.head_dim
    total = 0.0
    for ratio in cfg.compress_ratios:
        csa = ratio == cfg.csa_ratio
        topk = cfg.index_topk if (csa and sparse_attention) else None
        keys, visible = _mean_keys(seq_len, cfg.sliding_window, ratio, topk)
        total += 4.0 * n * h * keys  # QK^T and PV, 2 FLOPs per multiply-add
        if csa:
            total += 2.0 * cfg.index_n_heads * cfg.index_head_dim * visible  # indexer scores
    return total


def train_flops_per_token(cfg: Config, seq_len: int, *, sparse_attention: bool = True) -> float:
    """Model FLOPs of one training token: 6 * active matmul params + 3 * forward attention FLOPs."""
    params = sum(active_matmul_params(cfg).values())
    return 6.0 * params + 3.0 * attention_flops_per_token(cfg, seq_len, sparse_attention=sparse_attention)


def measure_matmul_peak(dtype: Any = jnp.float32, size: int | None = None, seconds: float = 1.0) -> float:
    """Measured FLOP/s of a square matmul on the default device (the best of repeated timed runs)."""
    dev = jax.devices()[0]
    if size is None:
        size = 1024 if dev.platform == "cpu" else 8192
    a = jnp.ones((size, size), dtype) * 0.5
    b = jnp.ones((size, size), dtype) * 0.25
    f = jax.jit(lambda x, y: x @ y)
    f(a, b).block_until_ready()
    best = math.inf
    deadline = time.perf_counter() + seconds
    reps = 0
    while reps < 3 or time.perf_counter() < deadline:
        t0 = time.perf_counter()
        f(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t0)
        reps += 1
    return 2.0 * size**3 / best


def default_peak_flops(device: jax.Device | None = None) -> tuple[float, str]:
    """Peak FLOP/s for MFU and where it came from: the vendor table for accelerators, a measurement on CPU."""
    device = device or jax.devices()[0]
    kind = device.device_kind.lower()
    for key, value in PEAK_FLOPS_BF16:
        if key in kind:
            return value, f"{device.device_kind} bf16 dense (vendor)"
    return measure_matmul_peak(), f"{device.device_kind} measured f32 matmul"


class MetricsWriter:
    """Appends one JSON object per line to `<workdir>/metrics.jsonl` and mirrors scalars to TensorBoard.

    On resume from step S, lines with step > S (written after the checkpoint by a run that died) move to
    `metrics_discarded.jsonl`, so the main file describes exactly one timeline.
    """

    def __init__(self, workdir: str, *, resume_step: int | None = None, tensorboard: bool = True):
        self.path = os.path.join(workdir, "metrics.jsonl")
        if resume_step is not None:
            self._drop_after(resume_step)
        elif os.path.exists(self.path):
            self._drop_after(-1)
        self._workdir, self._tensorboard = workdir, tensorboard
        self._open(resume_step)

    def _open(self, resume_step: int | None) -> None:
        self._file = open(self.path, "a", encoding="utf-8")
        self._tb = None
        if self._tensorboard:
            from tensorboardX import SummaryWriter

            purge = None if resume_step is None else resume_step + 1
            self._tb = SummaryWriter(os.path.join(self._workdir, "tensorboard"), purge_step=purge, flush_secs=30)

    def rewind(self, step: int) -> None:
        """Continue from `step` (a rollback): later records move to `metrics_discarded.jsonl`, as on resume."""
        self.close()
        self._drop_after(step)
        self._open(step)

    def _drop_after(self, step: int) -> None:
        if not os.path.exists(self.path):
            return
        keep, drop = [], []
        with open(self.path, encoding="utf-8") as f:
            for line in f:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    drop.append(line if line.endswith("\n") else line + "\n")  # a line cut short by a kill
                    continue
                (keep if record.get("step", -1) <= step else drop).append(line)
        if not drop:
            return
        with open(os.path.join(os.path.dirname(self.path), "metrics_discarded.jsonl"), "a", encoding="utf-8") as f:
            f.writelines(drop)
        tmp = self.path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(keep)
        os.replace(tmp, self.path)

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        """Write one record; list values (per-layer statistics) go to TensorBoard as one scalar per entry."""
        record = {"step": int(step), **{k: _jsonable(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in record.items():
                if k == "step":
                    continue
                if isinstance(v, list):
                    for i, x in enumerate(v):
                        self._tb.add_scalar(f"{k}/{i}", x, step)
                elif isinstance(v, (int, float)):
                    self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def _jsonable(v: Any) -> Any:
    a = np.asarray(v)
    if a.ndim == 0:
        x = a.item()
        if isinstance(x, float):
            return x if math.isfinite(x) else None  # strict JSON has no NaN / Infinity
        return x
    return [_jsonable(x) for x in a.reshape(-1)]


def read_metrics(workdir_or_file: str) -> list[dict[str, Any]]:
    """All records of a metrics.jsonl (the file or its workdir); a truncated last line is skipped."""
    path = workdir_or_file
    if os.path.isdir(path):
        path = os.path.join(path, "metrics.jsonl")
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records
