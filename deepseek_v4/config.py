"""The model configuration: one frozen, flat dataclass, presets by name, JSON round trip.

Field names follow the published DeepSeek-V4 `config.json` where one exists (docs/model.md, "Configuration").
`compress_ratios` lists one entry per layer plus one per MTP layer: 0 = sliding window only,
`csa_ratio` = compressed sparse attention (CSA), `hca_ratio` = heavily compressed attention (HCA).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

VOCAB_SIZE = 129280  # rows of the real V4 tokenizer's embedding (tokenizer.json holds 129,283 entries)


@dataclasses.dataclass(frozen=True)
class Config:
    """DeepSeek-V4 model hyper-parameters. Derived values are properties, never stored twice."""

    # Vocabulary and widths.
    vocab_size: int = VOCAB_SIZE
    hidden_size: int = 4096
    num_hidden_layers: int = 43
    num_attention_heads: int = 64
    head_dim: int = 512
    qk_rope_head_dim: int = 64
    q_lora_rank: int = 1024
    o_groups: int = 8
    o_lora_rank: int = 1024
    # Attention pattern: per layer (then per MTP layer) 0 / csa_ratio / hca_ratio.
    compress_ratios: tuple[int, ...] = (0, 0) + (4, 128) * 20 + (4, 0)
    csa_ratio: int = 4
    hca_ratio: int = 128
    sliding_window: int = 128
    # Lightning indexer (CSA layers).
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 512
    # Mixture of experts.
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    num_experts_per_tok: int = 6
    moe_intermediate_size: int = 2048
    num_hash_layers: int = 3
    routed_scaling_factor: float = 1.5
    swiglu_limit: float = 10.0
    # Manifold-constrained hyper-connections.
    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    # Norms and positions.
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    compress_rope_theta: float = 160000.0
    rope_scaling_factor: float = 16.0
    original_max_position_embeddings: int = 65536
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    max_position_embeddings: int = 1048576
    # Multi-token prediction.
    num_nextn_predict_layers: int = 1
    # Token ids.
    bos_token_id: int = 0
    eos_token_id: int = 1
    # Numerics: parameters are stored in `param_dtype`, matmuls run in `dtype` (norms, mHC, router,
    # softmax and the LM head always run in float32).
    dtype: str = "float32"
    param_dtype: str = "float32"
    initializer_range: float = 0.02
    # Activation memory: "none" keeps every activation for the backward; "full" recomputes each layer in the
    # backward (scanned units, the unrolled prefix layers and the MTP block alike; only the residual streams
    # entering each one are kept).
    remat_policy: str = "none"
    # Low-precision training (docs/training.md): "none"; "fp8" = FP8 e4m3 emulation of every FP8 GEMM of the
    # release (128x128 weight blocks, 1x128 activation tiles); "fp4" = "fp8" plus MXFP4 QAT of the routed experts
    # and of the indexer's query/key path (for continued training / post-training).
    quant: str = "none"
    # Routed-expert computation (deepseek_v4/moe.py:routed_experts), the one default for every preset and platform:
    # "padded" sorts tokens by expert into [E, T*K/E, D] buffers and runs batched matmuls in as many rounds as the
    # busiest expert needs (dropless; fastest measured on CPU); "grouped" runs the ragged grouped expert matmul
    # (Pallas on GPU/TPU, no padding; stored FP8/MXFP4 expert weights under `quant`); both also run under expert
    # parallelism (the all-to-all dispatch); "dense" evaluates every expert on every token (E/K times the work;
    # raises on a mesh that splits the experts).
    moe_impl: str = "padded"
    # Attention and lightning-indexer kernels (pallas_kernels, docs/kernels.md): "auto" = the Pallas kernel of the
    # platform on GPU/TPU, the pure-JAX reference on CPU; "reference" = the pure-JAX reference everywhere (the
    # fallback when a kernel fails to compile); "pallas" = the platform's Pallas kernel (a CPU run raises).
    attention_impl: str = "auto"

    def __post_init__(self):
        object.__setattr__(self, "compress_ratios", tuple(int(r) for r in self.compress_ratios))
        validate(self)

    # ---- derived values -------------------------------------------------------------------------
    @property
    def layer_ratios(self) -> tuple[int, ...]:
        """Compress ratio of each main-model layer (the MTP slots excluded)."""
        return self.compress_ratios[: self.num_hidden_layers]

    @property
    def mtp_ratios(self) -> tuple[int, ...]:
        return self.compress_ratios[self.num_hidden_layers :]

    @property
    def nope_head_dim(self) -> int:
        return self.head_dim - self.qk_rope_head_dim

    @property
    def hc_dim(self) -> int:
        """Width of one mHC projection: pre (n) + post (n) + residual (n*n)."""
        return (2 + self.hc_mult) * self.hc_mult

    @property
    def o_group_width(self) -> int:
        """Input width of one output-projection group: heads per group * head_dim."""
        return self.num_attention_heads * self.head_dim // self.o_groups

    def layer_kind(self, ratio: int) -> str:
        return {0: "sliding", self.csa_ratio: "csa", self.hca_ratio: "hca"}[ratio]

    # ---- serialisation --------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["compress_ratios"] = list(self.compress_ratios)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Config":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown config field(s): {', '.join(unknown)}")
        return cls(**d)

    @classmethod
    def from_json(cls, s: str) -> "Config":
        return cls.from_dict(json.loads(s))

    def replace(self, **overrides: Any) -> "Config":
        return _replace(self, overrides)


def setting(default: Any, help_text: str, **metadata: Any) -> Any:
    """A field of a settings dataclass whose default and description live in one place (the entry points generate
    their flags from these fields: experiments/flags.py)."""
    return dataclasses.field(default=default, metadata={"help": help_text, **metadata})


def _fail(msg: str):
    raise ValueError(msg)


def validate(c: Config) -> None:
    """Raise a one-line ValueError for values that cannot work."""
    pos = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "head_dim", "q_lora_rank",
           "o_groups", "o_lora_rank", "sliding_window", "index_n_heads", "index_head_dim", "n_routed_experts",
           "num_experts_per_tok", "moe_intermediate_size", "hc_mult", "hc_sinkhorn_iters", "csa_ratio", "hca_ratio")
    for name in pos:
        if getattr(c, name) <= 0:
            _fail(f"{name} must be positive, got {getattr(c, name)}")
    for name in ("n_shared_experts", "num_hash_layers", "num_nextn_predict_layers", "index_topk"):
        if getattr(c, name) < 0:
            _fail(f"{name} must be >= 0, got {getattr(c, name)}")
    if c.qk_rope_head_dim % 2 or not 0 < c.qk_rope_head_dim <= c.head_dim:
        _fail(f"qk_rope_head_dim must be even and in (0, head_dim={c.head_dim}], got {c.qk_rope_head_dim}")
    if c.index_head_dim < c.qk_rope_head_dim:
        _fail(f"index_head_dim ({c.index_head_dim}) must be >= qk_rope_head_dim ({c.qk_rope_head_dim})")
    if c.num_attention_heads % c.o_groups:
        _fail(f"num_attention_heads ({c.num_attention_heads}) must be divisible by o_groups ({c.o_groups})")
    if c.num_experts_per_tok > c.n_routed_experts:
        _fail(f"num_experts_per_tok ({c.num_experts_per_tok}) cannot exceed n_routed_experts ({c.n_routed_experts})")
    if c.num_hash_layers > c.num_hidden_layers:
        _fail(f"num_hash_layers ({c.num_hash_layers}) cannot exceed num_hidden_layers ({c.num_hidden_layers})")
    if not c.csa_ratio < c.hca_ratio:
        _fail(f"csa_ratio ({c.csa_ratio}) must be smaller than hca_ratio ({c.hca_ratio})")
    want = c.num_hidden_layers + c.num_nextn_predict_layers
    if len(c.compress_ratios) != want:
        _fail(f"compress_ratios needs num_hidden_layers + num_nextn_predict_layers = {want} entries, "
              f"got {len(c.compress_ratios)}")
    bad = sorted({r for r in c.compress_ratios if r not in (0, c.csa_ratio, c.hca_ratio)})
    if bad:
        _fail(f"compress_ratios entries must be 0, csa_ratio={c.csa_ratio} or hca_ratio={c.hca_ratio}; got {bad}")
    if any(r != 0 for r in c.mtp_ratios):
        _fail("the MTP layers are sliding-window only: their compress_ratios entries must be 0")
    if c.hc_mult < 1 or c.sliding_window < 1:
        _fail("hc_mult and sliding_window must be >= 1")
    for name in ("dtype", "param_dtype"):
        if getattr(c, name) not in ("float32", "bfloat16"):
            _fail(f"{name} must be 'float32' or 'bfloat16', got {getattr(c, name)!r}")
    if c.quant not in ("none", "fp8", "fp4"):
        _fail(f"quant must be 'none', 'fp8' or 'fp4', got {c.quant!r}")
    if c.quant == "fp4" and (c.hidden_size % 32 or c.moe_intermediate_size % 32 or c.index_head_dim % 32):
        _fail("quant='fp4' needs hidden_size, moe_intermediate_size and index_head_dim divisible by 32 (MXFP4 blocks)")
    if c.moe_impl not in ("padded", "grouped", "dense"):
        _fail(f"moe_impl must be 'padded', 'grouped' or 'dense', got {c.moe_impl!r}")
    if c.attention_impl not in ("auto", "reference", "pallas"):
        _fail(f"attention_impl must be 'auto', 'reference' or 'pallas', got {c.attention_impl!r}")
    if c.remat_policy not in ("none", "full"):
        _fail(f"remat_policy must be 'none' or 'full', got {c.remat_policy!r}")
    if c.rms_norm_eps <= 0 or c.hc_eps <= 0:
        _fail("rms_norm_eps and hc_eps must be positive")


FLASH = Config(dtype="bfloat16", param_dtype="float32", remat_policy="full")

PRO = Config(
    hidden_size=7168,
    num_hidden_layers=61,
    num_attention_heads=128,
    q_lora_rank=1536,
    o_groups=16,
    compress_ratios=(128, 128) + (4, 128) * 29 + (4, 0),
    index_topk=1024,
    n_routed_experts=384,
    moe_intermediate_size=3072,
    routed_scaling_factor=2.5,
    dtype="bfloat16",
    remat_policy="full",
)

# Every layer kind (sliding, CSA, HCA), hash-routed and learned-routed MoE, MTP; HCA ratio 16 so a
# short test sequence already has HCA entries. Keeps the real vocabulary.
TINY = Config(
    hidden_size=64,
    num_hidden_layers=6,
    num_attention_heads=4,
    head_dim=64,
    qk_rope_head_dim=16,
    q_lora_rank=32,
    o_groups=2,
    o_lora_rank=32,
    compress_ratios=(0, 4, 16, 4, 16, 4, 0),
    csa_ratio=4,
    hca_ratio=16,
    sliding_window=16,
    index_n_heads=16,  # enough heads that an all-zero ReLU index score (a top-k tie) is improbable in tests
    index_head_dim=32,
    index_topk=8,
    n_routed_experts=8,
    num_experts_per_tok=2,
    moe_intermediate_size=32,
    num_hash_layers=2,
    routed_scaling_factor=1.5,
    original_max_position_embeddings=64,
    rope_scaling_factor=4.0,
    max_position_embeddings=256,
)

# A V4-shaped model that trains on 2 CPU cores: ~37M parameters, most of them the real-vocabulary
# embedding and head.
NANO = Config(
    hidden_size=128,
    num_hidden_layers=6,
    num_attention_heads=4,
    head_dim=64,
    qk_rope_head_dim=16,
    q_lora_rank=64,
    o_groups=2,
    o_lora_rank=64,
    compress_ratios=(0, 4, 32, 4, 32, 4, 0),
    csa_ratio=4,
    hca_ratio=32,
    sliding_window=64,
    index_n_heads=4,
    index_head_dim=32,
    index_topk=16,
    n_routed_experts=8,
    num_experts_per_tok=2,
    moe_intermediate_size=128,
    num_hash_layers=2,
    original_max_position_embeddings=256,
    rope_scaling_factor=4.0,
    max_position_embeddings=1024,
)

PRESETS: dict[str, Config] = {"flash": FLASH, "pro": PRO, "tiny": TINY, "nano": NANO}


def _replace(base: Config, overrides: dict[str, Any]) -> Config:
    known = {f.name for f in dataclasses.fields(Config)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown config field(s): {', '.join(unknown)}")
    return dataclasses.replace(base, **overrides)


def get_config(name: str, **overrides: Any) -> Config:
    """A preset by name (`flash`, `pro`, `tiny`, `nano`), with field overrides."""
    if name not in PRESETS:
        raise ValueError(f"unknown config preset {name!r}; choose one of {', '.join(PRESETS)}")
    return _replace(PRESETS[name], overrides)
