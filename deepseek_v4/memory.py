"""Per-device memory of a training step, from abstract shapes: what `tools.memory_plan` prints and what every run
checks against its devices before compiling.

Everything comes from abstract shapes (`nnx.eval_shape`) and `sharding/rules.py`: nothing is allocated, so flash
and pro plan on a laptop, for any mesh size (the mesh is abstract too).
Terms, per device:
  params      every model variable, in its dtype, split as the rules table splits it.
  optimizer   muon: one float32 momentum per Muon parameter (hidden and expert matrices) plus AdamW's two moments
              (parameter dtype) for the rest (embedding, head, norms, mHC biases, sinks); adamw: two moments for
              every parameter. Routes from `deepseek_v4.optim.route_of`, sharded like the parameters.
  gradients   one parameter-sized buffer (parameter dtype), reduce-scattered to the parameter layout.
  updates     the optimizer's update, one float32 parameter-sized buffer; it exists only after the backward pass.
  activations remat policy "full" (flash, pro): every scanned unit, unrolled prefix layer and MTP block keeps
              only its input, the streams x[B, T, R, D] in the compute dtype; during the backward pass one of them
              is recomputed at a time (the largest working set is added once).
              Policy "none": every layer keeps all its activations. Per-layer activations are the tensors the
              backward pass reads (inputs of matmuls, norms, gates), counted per token in `layer_token_bytes`;
              attention is assumed to run as a kernel that keeps q, k/v, the output and a log-sum-exp per head,
              never the [N, window + top-k] probabilities (the pure-JAX reference keeps them: add
              N * (window + top-k) * 4 bytes per token and CSA layer when running it). MoE: the dropless mode keeps
              only its inputs and replays its rounds in the backward pass; the capacity mode keeps its buffers.
  fsdp        the FSDP working copy: the largest unit (a block's weights, the embedding or the head) all-gathered
              over "fsdp", and its gradient before the reduce-scatter.
  context     with a `context` axis (context parallelism) each device holds 1/context of every sequence's
              tokens, so every per-token term above divides by it; one layer at a time also holds the entries
              all-gathered over `context` (every compressed entry of the sequence, [T/m, H], and CSA's indexer keys
              [T/4, HI] float32) and their gradient.
  loss        one chunk of float32 logits (the chunk runs over the global tokens; a device holds its batch share).
              --loss_impl=remat (default): logits, softmax and gradient, 3 x [chunk / batch shards, V / tensor];
              fused: the logits and their gradient, 2 x [...], plus the float32 head-gradient accumulator
              [D, V / tensor] when there is no FSDP (with FSDP it is the unreduced head gradient counted under fsdp).
  extra       XLA workspace and fragmentation: 10% of the rest, and the plan must fit in 90% of the chip's memory.
Phases: params, optimizer and gradients are held through the whole step; the other terms belong to one of two
phases that do not overlap, and the larger one counts: the backward pass (activations, the FSDP working copy,
the context gather, the loss chunk; XLA's peak of a tiny step falls in the loss's backward) or the optimizer
update (`updates`, once the activations are gone). Adding both over-counted by up to 22% where the state is
replicated (context=8 on tiny, docs/sharding.md).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os

import jax
import numpy as np
from flax import nnx
from jax.sharding import AbstractMesh, AxisType

from deepseek_v4 import optim
from deepseek_v4.config import Config
from deepseek_v4.model import DeepseekV4, layer_plan
from deepseek_v4.params import path_str
from sharding import mesh as mesh_lib
from sharding import rules

@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    hbm: float  # bytes
    key: str = ""  # how a flag names it (--chip=v5p)
    peak_flops: float = 0.0  # dense bf16 FLOP/s (vendor)


CHIPS = (Chip("H200", 141e9, "h200", 989e12), Chip("TPU v5p", 95e9, "v5p", 459e12),
         Chip("TPU v6e", 32e9, "v6e", 918e12))


def chip_named(key: str) -> Chip:
    """The chip a flag names ("h200", "v5p", "v6e"). Raises a one-line ValueError for another name."""
    for c in CHIPS:
        if c.key == key.lower():
            return c
    raise ValueError(f"unknown chip {key!r}; choose one of {', '.join(c.key for c in CHIPS)}")


USABLE = 0.9  # fraction of a chip's memory a plan may use
WORKSPACE = 0.1  # XLA workspace and fragmentation, as a fraction of the counted bytes
LOGIT_BUFFERS = {"fused": 2, "remat": 3}  # float32 [chunk, V] buffers alive at once (see "loss" above)


def _itemsize(dtype) -> int:
    return np.dtype(dtype).itemsize


def abstract_mesh(sizes: dict[str, int]) -> AbstractMesh:
    axes = mesh_lib.AXES
    return AbstractMesh(tuple(sizes.get(a, 1) for a in axes), axes, axis_types=(AxisType.Auto,) * len(axes))


@dataclasses.dataclass(frozen=True)
class Variable:
    path: str
    shape: tuple[int, ...]
    dtype: np.dtype
    logical_axes: tuple | None
    trainable: bool


def model_variables(cfg: Config) -> list[Variable]:
    """Every variable of the model, from `nnx.eval_shape` (nothing allocated)."""
    return variables_of(nnx.state(nnx.eval_shape(lambda: DeepseekV4(cfg, rngs=nnx.Rngs(0)))))


def variables_of(*states: nnx.State) -> list[Variable]:
    """The variables of abstract model states (e.g. the params and extras a train state plan holds)."""
    out = []
    pairs = [pv for state in states
             for pv in jax.tree_util.tree_flatten_with_path(state, is_leaf=lambda v: isinstance(v, nnx.Variable))[0]]
    for path, var in pairs:
        v = var.get_value()
        axes = getattr(var, "logical_axes", None)
        out.append(Variable(path_str(path), tuple(v.shape), np.dtype(v.dtype), None if axes is None
                            else tuple(axes), isinstance(var, nnx.Param)))
    return out


@functools.lru_cache(maxsize=1 << 16)
def _shard_elements(shape: tuple[int, ...], logical_axes: tuple | None, sizes: tuple[tuple[str, int], ...]) -> int:
    """Elements of one device's shard of an array on a mesh of these (axis, size) pairs. Cached: `recommend` plans
    thousands of meshes over the same few hundred (shape, axes) pairs."""
    if logical_axes is None:
        return math.prod(shape)
    mesh_sizes = dict(sizes)
    s = rules.spec(logical_axes, "param", shape=shape, mesh=abstract_mesh(mesh_sizes))
    split = [math.prod(mesh_sizes[a] for a in rules.axes_of(e)) for e in s] + [1] * (len(shape) - len(s))
    return math.prod(n // k for n, k in zip(shape, split))


@functools.lru_cache(maxsize=1 << 14)
def _on_muon(path: str, shape: tuple[int, ...]) -> bool:
    return optim.route_of(path, shape).route == optim.MUON


def _block_of(path: str) -> str:
    """The unit a weight is all-gathered with: `prefix.3`, `mtp.0`, `stack` (one scanned layer), or the path."""
    parts = path.split(".")
    return ".".join(parts[:2]) if parts[0] in ("prefix", "mtp") else parts[0]


def state_bytes(variables: list[Variable], sizes: dict[str, int], optimizer: str,
                scanned_repeats: int = 1) -> dict[str, int]:
    """Per-device bytes of parameters (+ non-trainable variables), optimizer state, gradients, updates, and the
    FSDP working copy: the largest unit gathered at once (a block's weights, the embedding or the head) all-gathered
    over "fsdp", plus its unreduced gradient before the reduce-scatter."""
    mesh = tuple(sorted(sizes.items()))
    no_fsdp = tuple(sorted({**sizes, "fsdp": 1}.items()))
    out = {"params": 0, "optimizer": 0, "gradients": 0, "updates": 0}
    gathered: dict[str, float] = {}
    for v in variables:
        n = _shard_elements(v.shape, v.logical_axes, mesh)
        out["params"] += n * v.dtype.itemsize
        if not v.trainable:
            continue
        out["gradients"] += n * v.dtype.itemsize
        out["updates"] += n * 4
        muon = optimizer == "muon" and _on_muon(v.path, v.shape)
        out["optimizer"] += n * 4 if muon else 2 * n * v.dtype.itemsize
        if sizes["fsdp"] > 1:
            block = _block_of(v.path)
            full = _shard_elements(v.shape, v.logical_axes, no_fsdp) * v.dtype.itemsize / (scanned_repeats if block == "stack" else 1)
            gathered[block] = gathered.get(block, 0.0) + full
    out["fsdp gathered"] = int(2 * max(gathered.values(), default=0.0))
    return out


def moe_rows_per_token(cfg: Config, tokens_per_device: int, capacity_factor: float | None) -> float:
    """Rows of the MoE dispatch buffer per local token: E * C / Tl (one round when dropless)."""
    e, k = cfg.n_routed_experts, cfg.num_experts_per_tok
    c = max(1, min(tokens_per_device, math.ceil((capacity_factor or 1.0) * tokens_per_device * k / e)))
    return e * c / tokens_per_device


def layer_token_bytes(cfg: Config, ratio: int, sizes: dict[str, int], seq_len: int, moe_rows: float,
                      dropless: bool) -> tuple[float, float]:
    """(kept, working) bytes per token of one layer: what the backward pass reads, and the transient peak of the
    MoE exchange (its buffers in flight). See the module docstring for what is counted."""
    dt, f32 = _itemsize(cfg.dtype), 4
    r, d = cfg.hc_mult, cfg.hidden_size
    n, h, q, g, o = cfg.num_attention_heads, cfg.head_dim, cfg.q_lora_rank, cfg.o_groups, cfg.o_lora_rank
    tp = sizes["tensor"]
    heads_tp = tp if n % tp == 0 else 1
    f_tp = tp if cfg.moe_intermediate_size % tp == 0 else 1
    mhc = 2 * (r * d * dt + r * d * f32 + 2 * cfg.hc_sinkhorn_iters * r * r * f32 + (cfg.hc_dim + 2 * r) * f32)
    attn = d * (f32 + dt) + 2 * q * dt + (4 * n * h * dt + n * f32) / heads_tp + 2 * h * dt + g * o * dt + d * dt
    if ratio:
        attn += 2 * (2 if ratio == cfg.csa_ratio else 1) * h * dt  # compressor kv and gate projections
    if ratio == cfg.csa_ratio:
        ni, hi = cfg.index_n_heads, cfg.index_head_dim
        attn += ni * hi * dt + ni * dt + 4 * hi * dt + cfg.index_topk * 4
        attn += seq_len / ratio * f32  # indexer scores against every compressed entry (its KL loss)
    fs = cfg.moe_intermediate_size * cfg.n_shared_experts
    moe = d * (f32 + dt) + 3 * cfg.n_routed_experts * f32 + 3 * fs * dt + d * dt
    moe += cfg.num_experts_per_tok * (3 * 4 + d * f32)  # routing (expert, rank, gate) and combined rows
    buffers = moe_rows * (2 * d + 3 * cfg.moe_intermediate_size / f_tp) * dt
    kept = mhc + attn + moe + (0 if dropless else buffers)
    return kept, 2 * buffers


def activation_bytes(cfg: Config, sizes: dict[str, int], batch_size: int, seq_len: int,
                     capacity_factor: float | None, loss_chunk: int, loss_impl: str = "remat") -> dict[str, float]:
    """Per-device activation bytes by term (see the module docstring)."""
    shards = sizes["data"] * sizes["fsdp"] * sizes["expert"]
    if batch_size % shards:
        raise ValueError(f"batch_size {batch_size} is not divisible by data*fsdp*expert = {shards}")
    context = sizes.get("context", 1)
    if seq_len % (2 * context):
        raise ValueError(f"seq_len {seq_len} is not divisible by 2 x context = {2 * context}")
    tokens = batch_size // shards * seq_len // context
    rows = moe_rows_per_token(cfg, tokens, capacity_factor)
    dropless = capacity_factor is None
    dt = _itemsize(cfg.dtype)
    prefix, unit, repeats = layer_plan(cfg)
    ratios = cfg.layer_ratios
    per_layer = [layer_token_bytes(cfg, rr, sizes, seq_len, rows, dropless) for rr in ratios]
    mtp = [layer_token_bytes(cfg, rr, sizes, seq_len, rows, dropless) for rr in cfg.mtp_ratios]
    stream = cfg.hc_mult * cfg.hidden_size * dt
    unrolled = per_layer[:prefix] + mtp
    scanned = per_layer[prefix:]
    if cfg.remat_policy == "full":
        # Every block is recomputed in the backward: kept are the streams entering each unrolled block and each
        # scanned unit; one block (or unit) at a time is rebuilt.
        kept = (len(unrolled) + repeats) * stream
        recompute = max([sum(k for k, _ in scanned[:unit])] + [k for k, _ in unrolled])
    else:
        kept = sum(k for k, _ in unrolled + scanned)
        recompute = 0.0
    working = max(w for _, w in per_layer + mtp)
    edges = (cfg.hidden_size * dt + stream) * (1 + len(mtp)) + 2 * cfg.hidden_size * 4  # embed, expand, final hidden
    # The loss chunks the global token axis; each device holds its batch shards' rows of a chunk.
    chunk = math.ceil(min(loss_chunk, batch_size * seq_len) / (shards * context))
    vocab = cfg.vocab_size // sizes["tensor"] if cfg.vocab_size % sizes["tensor"] == 0 else cfg.vocab_size
    gathered = 0.0
    if context > 1:  # one layer's entries (and indexer keys) gathered over context, and their gradient
        per_seq = [seq_len / rr * (cfg.head_dim * dt + (cfg.index_head_dim * 4 if rr == cfg.csa_ratio else 0))
                   for rr in set(ratios) | set(cfg.mtp_ratios) if rr]
        gathered = 2 * max(per_seq, default=0.0) * batch_size // shards
    return {
        "context gather": gathered,
        "activations kept": kept * tokens,
        "unit recompute": recompute * tokens,
        "moe buffers": working * tokens,
        "edges": edges * tokens,
        "loss chunk": LOGIT_BUFFERS[loss_impl] * chunk * vocab * 4
        + (cfg.hidden_size * vocab * 4 if loss_impl == "fused" and sizes["fsdp"] == 1 else 0),
    }


@dataclasses.dataclass(frozen=True)
class Plan:
    sizes: dict[str, int]
    tokens_per_device: int
    terms: dict[str, float]

    def phases(self) -> tuple[float, float, float]:
        """(held, backward, update) bytes: the state held through the step and the two phases' own terms."""
        held = sum(v for k, v in self.terms.items() if k in HELD_TERMS)
        update = sum(v for k, v in self.terms.items() if k in UPDATE_TERMS)
        return held, sum(self.terms.values()) - held - update, update

    @property
    def counted(self) -> float:
        """Bytes at the step's peak: the held state plus the larger phase (see "Phases" in the module docstring)."""
        held, backward, update = self.phases()
        return held + max(backward, update)

    @property
    def peak_phase(self) -> str:
        """"backward" or "update": the phase that `counted` takes."""
        _, backward, update = self.phases()
        return "update" if update > backward else "backward"

    @property
    def total(self) -> float:
        return self.counted * (1 + WORKSPACE)


def plan(cfg: Config, sizes: dict[str, int], batch_size: int, seq_len: int, *, optimizer: str = "muon",
         capacity_factor: float | None = None, loss_chunk: int = 1024, loss_impl: str = "remat",
         variables: list[Variable] | None = None) -> Plan:
    """The per-device memory plan of one training step.

    Args:
      cfg: the model config.
      sizes: mesh axis sizes (`sharding.mesh.parse_mesh`).
      batch_size: global sequences per microbatch; seq_len: tokens per sequence.
      optimizer: "muon" or "adamw"; capacity_factor: None = dropless MoE; loss_chunk: tokens per logits chunk;
      loss_impl: the cross entropy's "fused" or "remat" gradients.
      variables: `model_variables(cfg)`, to reuse across plans.

    Returns:
      A `Plan` with the bytes of each term; `total` adds the workspace allowance.
    """
    variables = variables if variables is not None else model_variables(cfg)
    terms: dict[str, float] = dict(state_bytes(variables, sizes, optimizer, max(layer_plan(cfg)[2], 1)))
    terms.update(activation_bytes(cfg, sizes, batch_size, seq_len, capacity_factor, loss_chunk, loss_impl))
    shards = sizes["data"] * sizes["fsdp"] * sizes["expert"]
    return Plan(dict(sizes), batch_size // shards * seq_len // sizes.get("context", 1), terms)


def meshes_for(cfg: Config, devices: int, seq_len: int | None = None) -> list[dict[str, int]]:
    """Meshes over exactly `devices` devices, in order of preference: tensor 1, 2, 4 (tensor parallelism costs an
    all-reduce per matmul), then context 1, 2, 4, ... (a sequence split over that many devices; only with
    `seq_len`, and only where its length allows the two-chunk layout), then the most expert parallelism (expert
    dividing E and the device count), the rest on fsdp."""
    out = []
    for tp in (1, 2, 4):
        if devices % tp or cfg.num_attention_heads % tp:
            continue
        for cp in (2**i for i in range(int(math.log2(devices // tp)) + 1)):
            if (devices // tp) % cp or (cp > 1 and (seq_len is None
                                                    or seq_len % (2 * cp * max(cfg.layer_ratios + (1,))))):
                break
            rest = devices // tp // cp
            experts = [x for x in (2**i for i in range(int(math.log2(rest)) + 1))
                       if cfg.n_routed_experts % x == 0 and rest % x == 0]
            for x in sorted(experts, reverse=True):
                out.append({"data": 1, "fsdp": rest // x, "expert": x, "context": cp, "tensor": tp})
    return out


def fitting_mesh(cfg: Config, devices: int, hbm: float, batch_size: int, seq_len: int, *, optimizer: str = "muon",
                 loss_chunk: int = 1024, loss_impl: str = "remat", variables=None,
                 step_batch: int | None = None) -> Plan | None:
    """The first mesh of `meshes_for(cfg, devices)` on which a microbatch of `batch_size` sequences (at least one
    per data shard: it is rounded up to a multiple of the shards) fits in `USABLE * hbm`; None if none does.
    `step_batch`: only meshes whose data shards divide this many sequences (a step's batch) are tried."""
    variables = variables if variables is not None else model_variables(cfg)
    for sizes in meshes_for(cfg, devices, seq_len):
        shards = sizes["data"] * sizes["fsdp"] * sizes["expert"]
        if step_batch is not None and step_batch % shards:
            continue
        p = plan(cfg, sizes, -(-batch_size // shards) * shards, seq_len, optimizer=optimizer, loss_chunk=loss_chunk,
                 loss_impl=loss_impl, variables=variables)
        if p.total <= USABLE * hbm:
            return p
    return None


def device_memory(device: jax.Device) -> tuple[float, str]:
    """Bytes one device can hold and where the number came from: the runtime's limit on accelerators; on CPU the
    machine's physical memory shared by its local devices."""
    stats = device.memory_stats() if device.platform != "cpu" else None
    if stats and stats.get("bytes_limit"):
        return float(stats["bytes_limit"]), f"{device.device_kind} memory"
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return total / max(jax.local_device_count(), 1), f"host memory / {jax.local_device_count()} CPU device(s)"


def fmt_mesh(sizes: dict[str, int]) -> str:
    """A mesh as --mesh takes it (axes of size 1 left out)."""
    return ",".join(f"{k}={v}" for k, v in sizes.items() if v > 1) or "data=1"


def recommend(cfg: Config, chip: Chip, seq_len: int, *, optimizer: str = "muon",
              capacity_factor: float | None = None, loss_chunk: int = 1024, loss_impl: str = "remat", variables=None,
              max_chips: int = 65536) -> Plan | None:
    """The smallest power-of-two chip count (>= 8) with a fitting mesh (`meshes_for`'s order), one sequence per
    context group."""
    variables = variables if variables is not None else model_variables(cfg)
    n = 8
    while n <= max_chips:
        for sizes in meshes_for(cfg, n, seq_len):
            p = plan(cfg, sizes, n // sizes["tensor"] // sizes["context"], seq_len, optimizer=optimizer, capacity_factor=capacity_factor,
                     loss_chunk=loss_chunk, loss_impl=loss_impl, variables=variables)
            if p.total <= USABLE * chip.hbm:
                return p
        n *= 2
    return None


STATE_TERMS = ("params", "optimizer", "gradients", "updates", "fsdp gathered")
HELD_TERMS = ("params", "optimizer", "gradients")  # alive through the whole step
UPDATE_TERMS = ("updates",)  # the optimizer update phase; every other term belongs to the backward phase
TABLE_LENGTHS = (4096, 16384, 65536, 1048576)


def activation_share(p: Plan) -> float:
    """The fraction of the counted bytes that are not model or optimizer state (activations, buffers, loss)."""
    return sum(v for k, v in p.terms.items() if k not in STATE_TERMS) / p.counted


def long_context_table(presets=("flash", "pro"), lengths=TABLE_LENGTHS, chips=CHIPS[:2], **kwargs) -> str:
    """A markdown table of `recommend` for each preset, sequence length and chip."""
    from deepseek_v4 import get_config

    lines = ["| config | tokens/seq | chip | chips | mesh | per device | activation share |",
             "|---|---:|---|---:|---|---:|---:|"]
    for name in presets:
        cfg = get_config(name)
        variables = model_variables(cfg)
        for length in lengths:
            for chip in chips:
                p = recommend(cfg, chip, length, variables=variables, **kwargs)
                if p is None:
                    lines.append(f"| {name} | {length:,} | {chip.name} | - | does not fit | - | - |")
                    continue
                lines.append(f"| {name} | {length:,} | {chip.name} | {math.prod(p.sizes.values()):,} | "
                             f"{fmt_mesh(p.sizes)} | {p.total / 1e9:.1f} GB | {100 * activation_share(p):.0f}% |")
    return "\n".join(lines)


def _gb(x: float) -> str:
    return f"{x / 1e9:9.2f} GB"


def format_plan(p: Plan) -> str:
    lines = [f"mesh {','.join(f'{k}={v}' for k, v in p.sizes.items())}, {p.tokens_per_device:,} tokens per device"]
    for k, v in p.terms.items():
        lines.append(f"  {k:<18}{_gb(v)}")
    lines.append(f"  {'peak':<18}{_gb(p.counted)} (held state + the {p.peak_phase} phase)")
    lines.append(f"  {'workspace (10%)':<18}{_gb(p.total - p.counted)}")
    lines.append(f"  {'total':<18}{_gb(p.total)}")
    for c in CHIPS:
        verdict = "fits" if p.total <= USABLE * c.hbm else "does not fit"
        lines.append(f"  {c.name} ({c.hbm / 1e9:.0f} GB): {verdict} (uses {100 * p.total / c.hbm:.0f}%)")
    return "\n".join(lines)
