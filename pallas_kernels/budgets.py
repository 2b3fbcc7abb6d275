"""On-chip memory of the kernels at a given shape, and the default block sizes that fit (docs/kernels.md, "Block
sizes at the real shapes").

The numbers are the dominant terms of each program's working set, bfloat16 operands (2 bytes), float32
accumulators (4 bytes); they are estimates written down from the kernels' tile shapes, not measurements:
* GPU (Triton, one program = one CTA): dot operands are staged in shared memory, loop-streamed tiles once per
  pipeline stage; accumulators live in registers. The H200 (sm_90) gives a CTA at most 227 KiB of shared
  memory and a thread at most 255 registers; we budget 128 registers per thread for the [R, H] float32
  accumulator (R = block_q * N query rows per program) and leave the rest to the compiler.
* TPU (Mosaic, one grid step): every BlockSpec'd input and output is double-buffered in VMEM, scratch
  accumulators are single; [R, 1] columns occupy a full 128-lane tile. The budget is the default scoped VMEM
  limit of a v5e core, 16 MiB (v5p / v6e default to 32 MiB).
`attention_block_sizes` keeps a kernel's `BlockSizes()` defaults where they fit (every shape the tests use)
and shrinks them for V4's 64-128 heads of dimension 512: on GPU, streamed tiles and pipeline stages shrink and
the warps grow; on TPU, queries per grid step shrink.
"""

from __future__ import annotations

import dataclasses

KIB, MIB = 1024, 1024 * 1024
H200_SHARED_MEMORY = 227 * KIB
GPU_ACC_REGISTERS_PER_THREAD = 128
GPU_MAX_WARPS = 16
TPU_SCOPED_VMEM = 16 * MIB
LANES = 128
BF16, F32 = 2, 4


@dataclasses.dataclass(frozen=True)
class KernelShape:
    """The per-device shapes the kernels see in one model (heads = query heads on one device)."""

    name: str
    heads: int
    head_dim: int
    window: int
    csa_ratio: int
    hca_ratio: int
    topk: int
    index_heads: int
    index_head_dim: int
    hidden: int
    expert_hidden: int
    local_experts: int  # routed experts of one device under an 8-way expert split


# V4-Flash / V4-Pro (config presets "flash" / "pro"; a test checks the numbers against them).
FLASH = KernelShape("flash", 64, 512, 128, 4, 128, 512, 64, 128, 4096, 2048, 256 // 8)
PRO = KernelShape("pro", 128, 512, 128, 4, 128, 1024, 64, 128, 7168, 3072, 384 // 8)


def _rows(bs, n: int) -> int:
    """Query rows R = block_q * N of one forward/dq program (GPU: block_q None = smallest with R >= 16)."""
    block_q = bs.block_q if bs.block_q is not None else max(1, -(-16 // n))
    return block_q * n


def _stream(bs) -> int:
    """The larger streamed tile (keys of the window, compressed or selected entries) per loop step."""
    return max(bs.block_kv, getattr(bs, "block_e", 0), getattr(bs, "block_k", 0))


def gpu_attention_bytes(bs, n: int, h: int) -> dict[str, int]:
    """Shared memory per CTA of the forward, dq and window-gradient programs, and accumulator registers per
    thread, for the GPU attention `BlockSizes` bs (dense or sparse; the sparse kernel gathers its selected
    entries as a [block_k, H] tile like the dense one loads compressed entries)."""
    r = _rows(bs, n)
    r_dkv = (bs.block_q_dkv * n) if bs.block_q_dkv is not None else r
    stages = bs.num_stages
    fwd = r * h * BF16 + stages * _stream(bs) * h * BF16  # q resident, key / entry tiles streamed
    dq = 2 * r * h * BF16 + stages * _stream(bs) * h * BF16  # q and do resident
    dkv = bs.block_kv_dkv * h * BF16 + stages * 2 * r_dkv * h * BF16  # keys resident, q and do streamed
    regs = max(r, bs.block_kv_dkv) * h // (32 * bs.num_warps)  # float32 accumulator per thread
    return {"shared_memory": max(fwd, dq, dkv), "acc_registers_per_thread": regs}


def tpu_attention_bytes(bs, n: int, h: int) -> int:
    """VMEM of one grid step of the forward / dq kernels (the larger), for TPU attention `BlockSizes` bs."""
    r = bs.block_q * n
    tile = _stream(bs)
    blocks = 2 * (2 * r * h * BF16 + 2 * r * LANES * F32 + tile * h * BF16)  # q, do/o, lse, delta; keys
    scratch = r * h * F32 + 2 * r * LANES * F32 + 2 * r * tile * F32  # acc, m, l; scores and probabilities
    return blocks + scratch


def expert_matmul_bytes(block_m: int, block_k: int, block_n: int, platform: str, stages: int = 2) -> int:
    """Shared memory (GPU, `stages` pipelined x and w tiles) or VMEM (TPU, double-buffered tiles plus the
    float32 accumulator) of one grouped-matmul program; FP8/MXFP4 tiles are smaller than the bfloat16 ones."""
    tiles = (block_m * block_k + block_k * block_n) * BF16
    if platform == "cuda":
        return stages * tiles
    return 2 * (tiles + block_m * block_n * BF16) + block_m * block_n * F32


def indexer_bytes(block_q: int, block_c: int, index_head_dim: int, platform: str) -> int:
    """One scoring program: a query tile [block_q, HI] of one head at a time, an entry tile [block_c, HI], the
    head-summed [block_q, block_c] float32 scores (GPU: registers; TPU: the output block)."""
    tiles = (block_q + block_c) * index_head_dim * BF16
    if platform == "cuda":
        return 2 * tiles
    return 2 * (tiles + block_q * block_c * F32) + block_q * block_c * F32


def _fits_gpu(bs, n, h) -> bool:
    use = gpu_attention_bytes(bs, n, h)
    return use["shared_memory"] <= H200_SHARED_MEMORY and use["acc_registers_per_thread"] <= \
        GPU_ACC_REGISTERS_PER_THREAD


def attention_block_sizes(block_sizes_cls, platform: str, n: int, h: int):
    """The default `BlockSizes` of a dense / sparse attention kernel at N heads of dimension H.

    `BlockSizes()` where it fits; else (GPU) more warps until the accumulator fits its register budget, then
    halved streamed tiles (down to 16) and one pipeline stage, and (TPU) halved queries per grid step (down to
    one). Returns the smallest setting tried when nothing fits (the kernel then reports the overflow when it is
    compiled).
    """
    bs = block_sizes_cls()
    if platform in ("gpu", "cuda", "rocm"):
        if _fits_gpu(bs, n, h):
            return bs
        warps = bs.num_warps
        while warps < GPU_MAX_WARPS and max(_rows(bs, n), bs.block_kv_dkv) * h // (32 * warps) > \
                GPU_ACC_REGISTERS_PER_THREAD:
            warps *= 2
        bs = dataclasses.replace(bs, num_warps=warps)
        tiles = [f for f in ("block_kv", "block_e", "block_k", "block_kv_dkv") if hasattr(bs, f)]
        while not _fits_gpu(bs, n, h):
            if bs.num_stages > 1 and gpu_attention_bytes(dataclasses.replace(bs, num_stages=1), n, h)[
                    "shared_memory"] <= H200_SHARED_MEMORY:
                bs = dataclasses.replace(bs, num_stages=1)
                continue
            if min(getattr(bs, f) for f in tiles) <= 16:
                break
            bs = dataclasses.replace(bs, **{f: getattr(bs, f) // 2 for f in tiles})
        return bs
    while tpu_attention_bytes(bs, n, h) > TPU_SCOPED_VMEM and bs.block_q > 1:
        half = bs.block_q // 2
        bs = dataclasses.replace(bs, block_q=half, block_q_dkv=min(bs.block_q_dkv, half))
    return bs


def report(shape: KernelShape, n_heads: int | None = None) -> list[dict]:
    """On-chip bytes of every kernel family's default block sizes at `shape` (heads: `n_heads` if given), per
    platform: rows of {kernel, platform, bytes, limit, blocks}."""
    from pallas_kernels.dense_attention import pallas_gpu as dense_gpu
    from pallas_kernels.dense_attention import pallas_tpu as dense_tpu
    from pallas_kernels.expert_matmul.common import BlockSizes as ExpertBlocks
    from pallas_kernels.lightning_indexer import pallas_gpu as indexer_gpu
    from pallas_kernels.lightning_indexer import pallas_tpu as indexer_tpu
    from pallas_kernels.sparse_attention import pallas_gpu as sparse_gpu
    from pallas_kernels.sparse_attention import pallas_tpu as sparse_tpu

    n, h = n_heads or shape.heads, shape.head_dim
    rows = []
    for kernel, gpu_mod, tpu_mod in (("dense_attention", dense_gpu, dense_tpu),
                                     ("sparse_attention", sparse_gpu, sparse_tpu)):
        g = attention_block_sizes(gpu_mod.BlockSizes, "cuda", n, h)
        use = gpu_attention_bytes(g, n, h)
        rows.append({"kernel": kernel, "platform": "cuda", "bytes": use["shared_memory"],
                     "acc_registers_per_thread": use["acc_registers_per_thread"], "limit": H200_SHARED_MEMORY,
                     "blocks": dataclasses.asdict(g)})
        t = attention_block_sizes(tpu_mod.BlockSizes, "tpu", n, h)
        rows.append({"kernel": kernel, "platform": "tpu", "bytes": tpu_attention_bytes(t, n, h),
                     "limit": TPU_SCOPED_VMEM, "blocks": dataclasses.asdict(t)})
    for platform, mod in (("cuda", indexer_gpu), ("tpu", indexer_tpu)):
        b = mod.BlockSizes()
        rows.append({"kernel": "lightning_indexer", "platform": platform,
                     "bytes": indexer_bytes(b.block_q, b.block_c, shape.index_head_dim, platform),
                     "limit": H200_SHARED_MEMORY if platform == "cuda" else TPU_SCOPED_VMEM,
                     "blocks": dataclasses.asdict(b)})
    e = ExpertBlocks()
    for platform in ("cuda", "tpu"):
        rows.append({"kernel": "expert_matmul", "platform": platform,
                     "bytes": expert_matmul_bytes(e.block_m, e.block_k, e.block_n, platform),
                     "limit": H200_SHARED_MEMORY if platform == "cuda" else TPU_SCOPED_VMEM,
                     "blocks": dataclasses.asdict(e)})
    return rows
