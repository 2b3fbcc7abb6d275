"""Parameter counts of a config, from abstract shapes only (nothing is allocated), and with `--context` the
inference cost at that context against DeepSeek-V3.2.

    python -m tools.model_stats --config=flash [--json]
    python -m tools.model_stats --config=pro --context=1048576 [--json]

total_params: every trainable parameter of the main model (MTP excluded); total_params_with_mtp: including the
MTP module(s); active_params: parameters touched per token (the routed experts not selected are skipped; the
embedding lookup is excluded, the LM head included), DeepSeek's convention.

With `--context=L`: KV-cache bytes of one sequence holding L tokens and FLOPs of generating one token that sees
L tokens (itself included), for the config and for DeepSeek-V3.2, and their ratios. What is counted is stated
at `kv_cache_bytes` and `decode_flops` below and in the README ("Inference efficiency").
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys

import jax
from absl import app, flags
from flax import nnx

from deepseek_v4 import DeepseekV4, get_config
from deepseek_v4.config import Config
from sharding import paths

FLAGS = flags.FLAGS


def define_flags() -> None:
    # Defined only when run as a program, so importing model_stats() never claims global flag names.
    flags.DEFINE_string("config", "flash", "Preset name (flash, pro, tiny, nano).")
    flags.DEFINE_bool("json", False, "Print one JSON object instead of a table.")
    flags.DEFINE_integer("context", None, "Also report KV-cache bytes and FLOPs per generated token at this many "
                         "tokens of context, against DeepSeek-V3.2.")


def param_counts(cfg: Config) -> dict[str, int]:
    """Parameter counts by group, computed with nnx.eval_shape."""
    abstract = nnx.eval_shape(lambda: DeepseekV4(cfg, rngs=nnx.Rngs(0)))
    params = nnx.state(abstract, nnx.Param)
    counts = {"embed": 0, "routed_experts": 0, "mtp": 0, "other": 0}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        keys = paths.path_keys(path)
        n = math.prod(leaf.shape)
        if keys[0] == "mtp":
            counts["mtp"] += n
        elif keys[0] == "embed":
            counts["embed"] += n
        elif "experts" in keys:
            counts["routed_experts"] += n
        else:
            counts["other"] += n
    return counts


def model_stats(cfg: Config) -> dict[str, int]:
    c = param_counts(cfg)
    total = c["embed"] + c["routed_experts"] + c["other"]
    active = c["other"] + c["routed_experts"] * cfg.num_experts_per_tok // cfg.n_routed_experts
    return {"total_params": total, "total_params_with_mtp": total + c["mtp"], "active_params": active}


# ---- inference cost at a context length ---------------------------------------------------------------------
#
# KV cache: what one sequence holding L tokens keeps, in the release's storage formats.
#   V4 attention entry (sliding-window key=value, CSA and HCA compressed entries): the head_dim - rope channels in
#   FP8 E4M3 with one 1-byte UE8M0 scale per 64 values, the rope channels in BF16 (448 + 7 + 128 = 583 B for
#   Flash/Pro; vLLM's layout pads it to 584). V4 indexer key: MXFP4, 4 bits per value plus one 1-byte scale per 32
#   values (64 + 4 = 68 B). Compressor tails (the rows of a window not yet pooled; CSA also keeps the previous
#   window's overlap halves): float32 kv and gate buffers, fixed size per layer.
#   V3.2 per token and layer: the MLA latent in FP8 with one float32 scale per 128 values plus the rope key in
#   BF16 (512 + 16 + 128 = 656 B), and the indexer key in FP8 with one float32 scale (128 + 4 = 132 B).
# FLOPs of one generated token that sees L tokens (2 per multiply-add):
#   projections: 2 x active parameters (every weight matrix the token passes: attention and compressor
#     projections, indexer projections, mHC, router, shared and the selected routed experts, the LM head).
#   attention: QK and PV products over the keys a query sees: V4 per head 2 x 2 x head_dim per key (window +
#     selected CSA entries, or window + every HCA entry); V3.2 absorbed MLA 2 x (512 + 64) + 2 x 512 per key and
#     head over min(L, 2048) selected tokens.
#   indexer: 2 x index_n_heads x (index_head_dim + 1) per scored key (q.k per head, then the weighted head sum):
#     V4 scores the L/4 CSA entries of each CSA layer, V3.2 all L tokens in every layer.
#   Not counted: softmax, norms, RoPE, top-k selection, compressor pooling (each < 0.1% here).
#   fp8_equivalent: the precision each term runs in, weighted by tensor-core rate relative to FP8: projections
#   FP8 (x1; V4's FP4 experts multiply at the FP8 rate), attention BF16 (x2), indexer FP8 in V3.2 (x1) and FP4 in
#   V4 (x0.5). DeepSeek reports its comparison in "equivalent FP8 FLOPs" without the weights; these reproduce it.

@dataclasses.dataclass(frozen=True)
class MlaDsaConfig:
    """The DeepSeek-V3.2 shapes that set its inference cost (its published config.json; MLA + DSA)."""

    vocab_size: int = 129280
    hidden_size: int = 7168
    num_hidden_layers: int = 61
    num_attention_heads: int = 128
    q_lora_rank: int = 1536
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    first_k_dense_replace: int = 3
    intermediate_size: int = 18432
    moe_intermediate_size: int = 2048
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    num_experts_per_tok: int = 8
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 2048


DEEPSEEK_V32 = MlaDsaConfig()

FP8_E4M3_BYTES, BF16_BYTES, FP32_BYTES = 1, 2, 4
RATE_VS_FP8 = {"fp8": 1.0, "bf16": 2.0, "fp4": 0.5}  # cost of one FLOP in FP8 FLOPs


def v4_entry_bytes(cfg: Config) -> int:
    """One V4 key=value entry: FP8 non-rope channels + UE8M0 scale per 64 + BF16 rope channels (583 B)."""
    nope = cfg.head_dim - cfg.qk_rope_head_dim
    return nope * FP8_E4M3_BYTES + math.ceil(nope / 64) + cfg.qk_rope_head_dim * BF16_BYTES


def v4_indexer_key_bytes(cfg: Config) -> int:
    """One MXFP4 indexer key: 4 bits per value + one 1-byte scale per 32 values (68 B)."""
    return cfg.index_head_dim // 2 + math.ceil(cfg.index_head_dim / 32)


def v32_latent_bytes(c: MlaDsaConfig) -> int:
    """One V3.2 MLA cache row: FP8 latent + float32 scale per 128 + BF16 rope key (656 B)."""
    scales = math.ceil(c.kv_lora_rank / 128) * FP32_BYTES
    return c.kv_lora_rank * FP8_E4M3_BYTES + scales + c.qk_rope_head_dim * BF16_BYTES


def v32_indexer_key_bytes(c: MlaDsaConfig) -> int:
    """One V3.2 indexer key: FP8 + one float32 scale per 128 values (132 B)."""
    return c.index_head_dim * FP8_E4M3_BYTES + math.ceil(c.index_head_dim / 128) * FP32_BYTES


def _check_context(context: int) -> None:
    if isinstance(context, bool) or not isinstance(context, int) or context < 1:
        raise ValueError(f"context must be a positive number of tokens, got {context!r}")


def kv_cache_bytes(cfg: Config, context: int) -> dict[str, int]:
    """KV-cache bytes of one V4 sequence holding `context` tokens, main model only (the MTP draft layer excluded)."""
    _check_context(context)
    entry, out = v4_entry_bytes(cfg), dict.fromkeys(
        ("sliding_window", "csa_entries", "indexer_keys", "hca_entries", "compressor_tails"), 0)
    for ratio in cfg.layer_ratios:
        out["sliding_window"] += min(context, cfg.sliding_window) * entry  # every layer has the window branch
        if ratio == cfg.csa_ratio:
            n = context // ratio
            out["csa_entries"] += n * entry
            out["indexer_keys"] += n * v4_indexer_key_bytes(cfg)
            # kv and gate: the previous window's overlap halves (m x c) + this window's rows (m x 2c), for the
            # attention compressor (c = head_dim) and the indexer's (c = index_head_dim).
            out["compressor_tails"] += 2 * 3 * ratio * (cfg.head_dim + cfg.index_head_dim) * FP32_BYTES
        elif ratio == cfg.hca_ratio:
            out["hca_entries"] += context // ratio * entry
            out["compressor_tails"] += 2 * ratio * cfg.head_dim * FP32_BYTES  # kv and gate rows of one window
    out["total"] = sum(out.values())
    return out


def v32_kv_cache_bytes(c: MlaDsaConfig, context: int) -> dict[str, int]:
    """KV-cache bytes of one DeepSeek-V3.2 sequence holding `context` tokens (every layer keeps every token)."""
    _check_context(context)
    out = {"mla_latents": c.num_hidden_layers * context * v32_latent_bytes(c),
           "indexer_keys": c.num_hidden_layers * context * v32_indexer_key_bytes(c)}
    out["total"] = sum(out.values())
    return out


def v32_active_params(c: MlaDsaConfig) -> int:
    """DeepSeek-V3.2 parameters touched per token (embedding excluded, LM head included, MTP excluded)."""
    d, n = c.hidden_size, c.num_attention_heads
    attention = (d * c.q_lora_rank + c.q_lora_rank + c.q_lora_rank * n * (c.qk_nope_head_dim + c.qk_rope_head_dim)
                 + d * (c.kv_lora_rank + c.qk_rope_head_dim) + c.kv_lora_rank
                 + c.kv_lora_rank * n * (c.qk_nope_head_dim + c.v_head_dim) + n * c.v_head_dim * d)
    indexer = c.q_lora_rank * c.index_n_heads * c.index_head_dim + d * c.index_head_dim + 2 * c.index_head_dim \
        + d * c.index_n_heads
    dense_ffn = 3 * d * c.intermediate_size
    moe_ffn = d * c.n_routed_experts + 3 * d * c.moe_intermediate_size * (c.num_experts_per_tok + c.n_shared_experts)
    n_moe = c.num_hidden_layers - c.first_k_dense_replace
    per_layer = attention + indexer + 2 * d  # + the two RMSNorm weights
    return (c.num_hidden_layers * per_layer + c.first_k_dense_replace * dense_ffn + n_moe * moe_ffn
            + d + c.vocab_size * d)


def _with_totals(terms: dict[str, int], precision: dict[str, str]) -> dict[str, float]:
    out: dict[str, float] = dict(terms)
    out["total"] = sum(terms.values())
    out["fp8_equivalent"] = sum(v * RATE_VS_FP8[precision[k]] for k, v in terms.items())
    return out


def decode_flops(cfg: Config, context: int, active_params: int | None = None) -> dict[str, float]:
    """FLOPs of one V4 token that sees `context` tokens (itself included); MTP not run."""
    _check_context(context)
    active = model_stats(cfg)["active_params"] if active_params is None else active_params
    attention = indexer = 0
    for ratio in cfg.layer_ratios:
        keys = min(context, cfg.sliding_window)
        if ratio == cfg.csa_ratio:
            entries = context // ratio
            keys += min(cfg.index_topk, entries)
            indexer += 2 * cfg.index_n_heads * (cfg.index_head_dim + 1) * entries
        elif ratio == cfg.hca_ratio:
            keys += context // ratio
        attention += 2 * 2 * cfg.head_dim * cfg.num_attention_heads * keys
    return _with_totals({"projections": 2 * active, "attention": attention, "indexer": indexer},
                        {"projections": "fp8", "attention": "bf16", "indexer": "fp4"})


def v32_decode_flops(c: MlaDsaConfig, context: int) -> dict[str, float]:
    """FLOPs of one DeepSeek-V3.2 token that sees `context` tokens (absorbed MLA over the top-k, indexer over all)."""
    _check_context(context)
    per_key = 2 * (c.kv_lora_rank + c.qk_rope_head_dim) + 2 * c.kv_lora_rank
    attention = c.num_hidden_layers * c.num_attention_heads * per_key * min(context, c.index_topk)
    indexer = c.num_hidden_layers * 2 * c.index_n_heads * (c.index_head_dim + 1) * context
    return _with_totals({"projections": 2 * v32_active_params(c), "attention": attention, "indexer": indexer},
                        {"projections": "fp8", "attention": "bf16", "indexer": "fp8"})


def compare_with_v32(cfg: Config, context: int, active_params: int | None = None) -> dict[str, dict]:
    """KV bytes and decode FLOPs of `cfg` and of DeepSeek-V3.2 at `context`, and the ratios ours / V3.2."""
    if context > cfg.max_position_embeddings:
        raise ValueError(f"context {context} exceeds the config's max_position_embeddings "
                         f"({cfg.max_position_embeddings})")
    ours = {"kv_cache_bytes": kv_cache_bytes(cfg, context), "decode_flops": decode_flops(cfg, context, active_params)}
    v32 = {"kv_cache_bytes": v32_kv_cache_bytes(DEEPSEEK_V32, context),
           "decode_flops": v32_decode_flops(DEEPSEEK_V32, context)}
    ratios = {"kv_cache": ours["kv_cache_bytes"]["total"] / v32["kv_cache_bytes"]["total"],
              "flops": ours["decode_flops"]["total"] / v32["decode_flops"]["total"],
              "flops_fp8_equivalent": ours["decode_flops"]["fp8_equivalent"] / v32["decode_flops"]["fp8_equivalent"]}
    return {"context": context, "ours": ours, "deepseek_v32": v32, "ratios": ratios}


def format_comparison(comparison: dict[str, dict], name: str) -> str:
    """The comparison as a text table: one row per model, one column per quantity."""
    rows = [(f"deepseek-v4 {name}", comparison["ours"]), ("deepseek-v3.2", comparison["deepseek_v32"])]
    head = (f"{'at context ' + format(comparison['context'], ',d'):<22} {'KV cache GB':>12} {'decode GFLOP':>13} "
            f"{'FP8-equiv GFLOP':>16}   {'projections':>11} {'attention':>9} {'indexer':>9}  (GFLOP)")
    lines = [head]
    for label, r in rows:
        kv, fl = r["kv_cache_bytes"]["total"], r["decode_flops"]
        lines.append(f"{label:<22} {kv / 1e9:>12.3f} {fl['total'] / 1e9:>13.1f} {fl['fp8_equivalent'] / 1e9:>16.1f}"
                     f"   {fl['projections'] / 1e9:>11.1f} {fl['attention'] / 1e9:>9.1f} {fl['indexer'] / 1e9:>9.1f}")
    ratio = comparison["ratios"]
    lines.append(f"{'ratio v4 / v3.2':<22} {ratio['kv_cache']:>12.1%} {ratio['flops']:>13.1%} "
                 f"{ratio['flops_fp8_equivalent']:>16.1%}")
    parts = comparison["ours"]["kv_cache_bytes"]
    lines.append("v4 KV cache by part (MB): " + ", ".join(f"{k} {v / 1e6:,.1f}" for k, v in parts.items()
                                                          if k != "total"))
    return "\n".join(lines)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    try:
        cfg = get_config(FLAGS.config)
    except ValueError as e:
        sys.exit(f"error: {e}")
    stats = model_stats(cfg)
    comparison = None
    if FLAGS.context is not None:
        try:
            comparison = compare_with_v32(cfg, FLAGS.context, active_params=stats["active_params"])
        except ValueError as e:
            sys.exit(f"error: {e}")
    if FLAGS.json:
        print(json.dumps(stats if comparison is None else {**stats, "inference": comparison}))
        return
    for k, v in stats.items():
        print(f"{k:>24}: {v:>18,d}  ({v / 1e9:,.2f} B)")
    if comparison is not None:
        print()
        print(format_comparison(comparison, FLAGS.config))


if __name__ == "__main__":
    define_flags()
    app.run(main)
