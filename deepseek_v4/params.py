"""What each parameter of the model is, declared once: one row per parameter kind, and the one path formatter.

`PARAMS` has one `ParamKind` per parameter (or non-trainable variable) of a layer, of an MTP module or of the
model root, named by its dotted path inside that scope (`attn.wq_b`). A row states:

* **route**: the optimizer that trains it (V4 report section 2.4): "muon" (orthogonalised per logical matrix,
  `matrix`), "adamw", or "frozen" (a non-trainable `RouterBias` / `HashTable`, which no optimizer sees);
* **official** name and layout **transform** of the official checkpoints (docs/checkpoints.md): our weights
  are [in, out], the official ones [out, in] ("linear"); multi-head projections [in, N, H] are flattened over
  heads ("heads", [N*H, in]); the grouped output projection [G, I, O] is stored [G*O, I] ("grouped"); routed
  experts [E, in, out] are one [out, in] tensor per expert ("experts", name with `{e}`); the hash table is
  int64 ("hash"); "id" keeps the array as it is;
* **storage** class of the exports: FP8 (an FP8-class linear: E4M3 in 128x128 blocks in the fp8 and fp4
  formats), EXPERT (a routed expert: FP8 in fp8, MXFP4 in fp4), BF16, F32 or I64 in every format;
* the FP8 **layout** of the quantisation-aware forward (`layers.qweight`) follows from the transform: training
  quantises the blocks of the official [out, in] matrix, so it sees exactly the values an export holds.

Derived from it: `deepseek_v4.optim.route_of` (routes, Muon matrix specs), `deepseek_v4.interop` (names and
transforms of `to_hf` / `from_hf` and of the safetensors plan), `deepseek_v4.export` (stored dtype per format)
and `deepseek_v4.layers.qweight` (QAT layout). The decisions on the cases the V4 report leaves open are written
next to their rows.

Logical axes (the sharding names of each dimension) stay where each parameter is created (`nnx.Param`
metadata in the model modules): the module that chooses a shape names its axes, and the scanned stack adds
its leading "layers" axis there. tests/deepseek_v4/test_params.py checks that every variable of the tiny,
flash and pro presets has exactly one row, with the row's rank, and that every row is used.

Paths: `path_str` is the one formatter of tree key paths as dotted names (`stack.blocks.0.attn.wq_a`);
`path_keys` gives the same entries as a list, as the checkpoints name them on disk.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

from sharding.paths import key_name, path_keys, path_str  # noqa: F401  (re-exported)

# ---- paths: one formatter for the whole project, in the sharding package (below the model) ----------------

# ---- the vocabulary of the table ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MatrixSpec:
    """How one parameter splits into matrices: `batch_dims` leading axes, then `row_dims` row axes, rest columns.

    Example: `wo_a` [G, N*H/G, O] with `MatrixSpec(1, 1)` is G matrices [N*H/G, O]; `wq_b` [Q, N, H] with
    `MatrixSpec(0, 1)` is one matrix [Q, N*H].
    """

    batch_dims: int = 0
    row_dims: int = 1

    def split(self, shape: Sequence[int]) -> tuple[int, int, int]:
        """(matrices, rows, columns) of an array of this shape."""
        if self.batch_dims < 0 or self.row_dims < 1 or len(shape) < self.batch_dims + self.row_dims + 1:
            raise ValueError(f"{self} does not fit a parameter of shape {tuple(shape)}")
        b, r = self.batch_dims, self.batch_dims + self.row_dims
        return math.prod(shape[:b]), math.prod(shape[b:r]), math.prod(shape[r:])


MUON, ADAMW, FROZEN = "muon", "adamw", "frozen"  # routes
FP8, EXPERT, BF16, F32, I64 = "fp8", "expert", "bf16", "f32", "i64"  # storage classes
TRANSFORMS = ("id", "linear", "heads", "grouped", "experts", "hash")
MODEL, LAYER, MTP = "model", "layer", "mtp"  # scopes: the model root, one Block, one MTP module (outside its block)
# The FP8 layout of `layers.qweight` by layout transform (routed experts: leading expert axis, batch).
FP8_LAYOUTS = {"linear": "matrix", "experts": "matrix", "heads": "heads", "grouped": "grouped"}


@dataclasses.dataclass(frozen=True)
class ParamKind:
    """One row of `PARAMS`.

    Attributes:
      path: dotted path inside each of its `scopes` (e.g. "attn.wq_b").
      scopes: where it occurs: MODEL (root), LAYER (inside a Block: under `prefix.{i}.`, `stack.blocks.{j}.`
        with a leading layers axis, `mtp.{k}.block.`), MTP (inside an MTP module, under `mtp.{k}.`).
      ndim: rank of one layer's parameter (the scanned stack adds one leading "layers" axis).
      route: MUON, ADAMW or FROZEN.
      matrix: Muon's view of one layer's parameter as matrices (MUON only).
      official: the official tensor name inside its scope (`layers.{i}.`, `mtp.{k}.`, root); `{e}` = expert.
      transform: the layout transform between ours and the official tensor (one of `TRANSFORMS`).
      storage: FP8, EXPERT, BF16, F32 or I64 (see the module docstring).
      note: a short description, printed by tools/optimizer_plan.py.
    """

    path: str
    scopes: tuple[str, ...]
    ndim: int
    route: str
    matrix: MatrixSpec | None
    official: str
    transform: str
    storage: str
    note: str

    @property
    def fp8_layout(self) -> str | None:
        """The `layers.qweight` layout of an FP8-class or routed-expert weight; None for the others."""
        return FP8_LAYOUTS[self.transform] if self.storage in (FP8, EXPERT) else None


def _adamw(path, ndim, official, transform, storage, note, scopes=(LAYER,)) -> ParamKind:
    return ParamKind(path, scopes, ndim, ADAMW, None, official, transform, storage, note)


def _muon(path, ndim, matrix, official, transform, storage, note, scopes=(LAYER,)) -> ParamKind:
    return ParamKind(path, scopes, ndim, MUON, matrix, official, transform, storage, note)


def _frozen(path, ndim, official, transform, storage, note) -> ParamKind:
    return ParamKind(path, (LAYER,), ndim, FROZEN, None, official, transform, storage, note)


_NORM = "RMSNorm weight"
_HC_STATIC = "mHC static bias S / gate alpha"
_HC_FN = "mHC dynamic projection, one matrix"
_ONE = MatrixSpec(0, 1)  # the whole parameter is one matrix [first axis, the rest]

# Weight decay 0.1 applies to every parameter of both routes, as the V4 report states it. Rows are in the
# order of the official files (layer tensors, then the model root's, then an MTP module's).
PARAMS: tuple[ParamKind, ...] = (
    # ---- inside one layer (Block) ----
    _adamw("attn_norm.scale", 1, "attn_norm.weight", "id", BF16, _NORM),
    _adamw("ffn_norm.scale", 1, "ffn_norm.weight", "id", BF16, _NORM),
    # mHC `fn` [R*D, (2+R)*R] -> Muon as one matrix (pre, post and residual rows together): the report's
    # "everything else" wording; whether V4 splits the three blocks is unknown. `hc_head.fn` [R*D, R] likewise.
    # The static biases (`base`) and gates (`scale`) go to AdamW, as the report says.
    _muon("hc_attn.fn", 2, _ONE, "hc_attn_fn", "linear", F32, _HC_FN),
    _adamw("hc_attn.base", 1, "hc_attn_base", "id", F32, _HC_STATIC),
    _adamw("hc_attn.scale", 1, "hc_attn_scale", "id", F32, _HC_STATIC),
    _muon("hc_ffn.fn", 2, _ONE, "hc_ffn_fn", "linear", F32, _HC_FN),
    _adamw("hc_ffn.base", 1, "hc_ffn_base", "id", F32, _HC_STATIC),
    _adamw("hc_ffn.scale", 1, "hc_ffn_scale", "id", F32, _HC_STATIC),
    _muon("attn.wq_a", 2, _ONE, "attn.wq_a.weight", "linear", FP8, "attention projection"),
    _adamw("attn.q_norm.scale", 1, "attn.q_norm.weight", "id", BF16, _NORM),
    # `attn.wq_b` [Q, N, H] (and the indexer's) -> one matrix [Q, N*H], as in V4 (V4.1's head-wise split would be
    # `MatrixSpec(0, 1)` on a transposed layout; not done).
    _muon("attn.wq_b", 3, _ONE, "attn.wq_b.weight", "heads", FP8, "[Q, N, H] as one matrix [Q, N*H]"),
    _muon("attn.wkv", 2, _ONE, "attn.wkv.weight", "linear", FP8, "attention projection"),
    _adamw("attn.kv_norm.scale", 1, "attn.kv_norm.weight", "id", BF16, _NORM),
    # `attn.wo_a` [G, N*H/G, O] -> Muon, G matrices [N*H/G, O]. The grouped output projection is the
    # block-diagonal map diag(W_1, ..., W_G) from [N*H] to [G*O]; the orthogonal polar factor of a block-diagonal
    # matrix is block-diagonal with the blocks' own polar factors, so orthogonalising the groups one by one is
    # exactly Muon on the whole map, and each group gets the RMS 0.18 scaling of its shape.
    _muon("attn.wo_a", 3, MatrixSpec(1, 1), "attn.wo_a.weight", "grouped", FP8,
          "G group matrices [N*H/G, O] (block-diagonal map)"),
    _muon("attn.wo_b", 2, _ONE, "attn.wo_b.weight", "linear", FP8, "attention projection"),
    # `attn.attn_sink` [N] -> AdamW. One logit per head, a vector: Muon is defined for matrices only, and a vector
    # update orthogonalised is just its sign pattern rescaled.
    _adamw("attn.attn_sink", 1, "attn.attn_sink", "id", F32, "attention sink logits [N] (open case: a vector)"),
    _muon("attn.compressor.wkv", 2, _ONE, "attn.compressor.wkv.weight", "linear", BF16, "compressor projection"),
    _muon("attn.compressor.wgate", 2, _ONE, "attn.compressor.wgate.weight", "linear", BF16, "compressor projection"),
    # `compressor.ape` [m, c*H] -> AdamW. An additive positional bias (one row per position in the compression
    # window), not a linear map of activations: the spectral-norm geometry Muon relies on does not apply. It is a
    # bias like the mHC static biases, which the report sends to AdamW. (Also the indexer's compressor.)
    _adamw("attn.compressor.ape", 2, "attn.compressor.ape", "id", F32,
           "compressor position bias [m, c*H] (open case: a bias)"),
    _adamw("attn.compressor.norm.scale", 1, "attn.compressor.norm.weight", "id", BF16, _NORM),
    _muon("attn.indexer.wq_b", 3, _ONE, "attn.indexer.wq_b.weight", "heads", FP8, "[Q, N, H] as one matrix [Q, N*H]"),
    _muon("attn.indexer.weights_proj", 2, _ONE, "attn.indexer.weights_proj.weight", "linear", BF16,
          "indexer head weights"),
    _muon("attn.indexer.compressor.wkv", 2, _ONE, "attn.indexer.compressor.wkv.weight", "linear", BF16,
          "compressor projection"),
    _muon("attn.indexer.compressor.wgate", 2, _ONE, "attn.indexer.compressor.wgate.weight", "linear", BF16,
          "compressor projection"),
    _adamw("attn.indexer.compressor.ape", 2, "attn.indexer.compressor.ape", "id", F32,
           "compressor position bias [m, c*H] (open case: a bias)"),
    _adamw("attn.indexer.compressor.norm.scale", 1, "attn.indexer.compressor.norm.weight", "id", BF16, _NORM),
    # The router `ffn.gate` [D, E] -> Muon as one matrix (the report's "everything else").
    _muon("ffn.gate", 2, _ONE, "ffn.gate.weight", "linear", BF16, "router weight [D, E]"),
    _frozen("ffn.router_bias", 1, "ffn.gate.bias", "id", F32, "balancing bias (RouterBias; sign update, no gradient)"),
    _frozen("ffn.tid2eid", 2, "ffn.gate.tid2eid", "hash", I64, "hash-routing table (HashTable; fixed)"),
    _muon("ffn.experts.w1", 3, MatrixSpec(1, 1), "ffn.experts.{e}.w1.weight", "experts", EXPERT,
          "routed experts, one matrix per expert"),
    _muon("ffn.experts.w3", 3, MatrixSpec(1, 1), "ffn.experts.{e}.w3.weight", "experts", EXPERT,
          "routed experts, one matrix per expert"),
    _muon("ffn.experts.w2", 3, MatrixSpec(1, 1), "ffn.experts.{e}.w2.weight", "experts", EXPERT,
          "routed experts, one matrix per expert"),
    _muon("ffn.shared.w1", 2, _ONE, "ffn.shared_experts.w1.weight", "linear", FP8, "shared expert"),
    _muon("ffn.shared.w3", 2, _ONE, "ffn.shared_experts.w3.weight", "linear", FP8, "shared expert"),
    _muon("ffn.shared.w2", 2, _ONE, "ffn.shared_experts.w2.weight", "linear", FP8, "shared expert"),
    # ---- the model root and the MTP modules ----
    _adamw("embed", 2, "embed.weight", "id", BF16, "token embedding [V, D]", scopes=(MODEL,)),
    _adamw("head", 2, "head.weight", "linear", BF16, "output head [D, V]", scopes=(MODEL,)),
    # MTP input projections: FP8-class in the exports (the release's dtype is not confirmed), so the training
    # forward (model.MTP) quantises them like every other FP8 GEMM under `quant`.
    _muon("e_proj", 2, _ONE, "e_proj.weight", "linear", FP8, "MTP input projections", scopes=(MTP,)),
    _muon("h_proj", 2, _ONE, "h_proj.weight", "linear", FP8, "MTP input projections", scopes=(MTP,)),
    _adamw("enorm.scale", 1, "enorm.weight", "id", BF16, _NORM, scopes=(MTP,)),
    _adamw("hnorm.scale", 1, "hnorm.weight", "id", BF16, _NORM, scopes=(MTP,)),
    _adamw("norm.scale", 1, "norm.weight", "id", BF16, _NORM, scopes=(MODEL, MTP)),
    _muon("hc_head.fn", 2, _ONE, "hc_head_fn", "linear", F32, _HC_FN, scopes=(MODEL, MTP)),
    _adamw("hc_head.base", 1, "hc_head_base", "id", F32, _HC_STATIC, scopes=(MODEL, MTP)),
    _adamw("hc_head.scale", 1, "hc_head_scale", "id", F32, _HC_STATIC, scopes=(MODEL, MTP)),
)

BY_PATH: dict[str, ParamKind] = {k.path: k for k in PARAMS}


def in_scope(scope: str) -> tuple[ParamKind, ...]:
    """The rows of one scope (MODEL, LAYER or MTP), in table order (the order of the official files)."""
    return tuple(k for k in PARAMS if scope in k.scopes)


def kind_of(path: str) -> ParamKind:
    """The row of the parameter at dotted `path`.

    A row that lives only at the model root (`embed`, `head`) matches the whole path; the others match the
    longest dotted suffix of the path, under any enclosing modules (`prefix.0.`, `stack.blocks.1.`, `mtp.0.block.`,
    or the shorter trees of hand-built tests).

    Raises:
      ValueError: no row matches.
    """
    parts = path.split(".")
    for i in range(len(parts)):
        kind = BY_PATH.get(".".join(parts[i:]))
        if kind is not None and (i == 0 or kind.scopes != (MODEL,)):
            return kind
    raise ValueError(f"parameter {path!r} matches no row of the parameter table deepseek_v4.params.PARAMS")


def quantised(path: str) -> ParamKind:
    """The row of a weight that `layers.qweight` quantises (FP8-class or routed expert), by its path inside its
    scope (e.g. "attn.wq_b").

    Raises:
      ValueError: no such row, or the row is stored unquantised in every format.
    """
    kind = BY_PATH.get(path)
    if kind is None:
        raise ValueError(f"{path!r} is not a parameter path of deepseek_v4.params.PARAMS")
    if kind.fp8_layout is None:
        raise ValueError(f"{path!r} is stored as {kind.storage} in every format; it has no FP8/FP4 layout")
    return kind
