"""Time and memory of sparse / dense attention and the lightning indexer against full-mask attention.

    python -m tools.bench_attention [--seq_lens=16384,131072] [--impl=reference] [--kinds=...] [--json]

Kinds: sparse (CSA layers: window + top-k entries, ratio --csa_ratio), dense (HCA layers: window + every
admissible entry, ratio --hca_ratio), full_mask (forward, "_fwd") and with the backward ("_fwdbwd"), and
indexer (scores + top-k, forward only). `full_mask` is the baseline measured in the same run: full
[T, T + C] masked attention (window + the same selected entries as `sparse`, one softmax with sink), what a
framework without a sparse kernel does. Its memory is quadratic, so it only runs where it fits
--full_mask_max_gib: first by an estimate made before anything is allocated or compiled, then by the compiled
peak; skipped lengths are reported with the reason. Widths default to a CPU-sized model (N=2, H=64);
window, ratios and top-k are V4-Flash's. The sparse kind's selected entries are spread evenly over each
query's history (the selection pattern affects only gather locality; the indexer is timed separately).

Peak bytes are XLA's compiled buffer assignment (arguments + outputs + temporaries), identical in
meaning on every backend. Each kind reports its time at every length and its scaling ratio
time(T_max) / time(T_min) next to the length ratio (linear = the length ratio, quadratic = its square).
Results are appended to experiments/LOG.md (--log='' to skip).
"""

from __future__ import annotations

import datetime
import functools
import json
import os
import subprocess

import jax
import jax.numpy as jnp
from absl import app, flags
from tqdm import tqdm

from pallas_kernels.dense_attention import dense_attention
from pallas_kernels.lightning_indexer import lightning_indexer
from pallas_kernels.sparse_attention import sparse_attention
from tools import timing

KINDS = ("sparse_fwd", "sparse_fwdbwd", "dense_fwd", "dense_fwdbwd", "full_mask_fwd", "full_mask_fwdbwd", "indexer")


FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command line's flags, defined only when this module runs as the program (absl flags are
    process-global, and other programs and the tests import this module)."""
    flags.DEFINE_list("seq_lens", ["16384", "131072"], "sequence lengths T")
    flags.DEFINE_enum(
        "impl",
        None,
        ["reference", "pallas", "pallas_gpu", "pallas_tpu"],
        "implementation of the sparse/dense attention and indexer entry points (default: best available)",
    )
    flags.DEFINE_bool("interpret", False, "run Pallas in interpret mode (needed on CPU; slow)")
    flags.DEFINE_list("kinds", list(KINDS), f"what to time, from {','.join(KINDS)}")
    flags.DEFINE_list("indexer_seq_lens", [], "lengths for the indexer (default: --seq_lens)")
    flags.DEFINE_list(
        "full_mask_seq_lens", [], "lengths for the full-mask baseline (default: --seq_lens)"
    )
    flags.DEFINE_integer("batch", 1, "batch size B")
    flags.DEFINE_integer("heads", 2, "query heads N (V4-Flash: 64)")
    flags.DEFINE_integer("head_dim", 64, "head dim H (V4-Flash: 512)")
    flags.DEFINE_integer("window", 128, "sliding window")
    flags.DEFINE_integer("csa_ratio", 4, "CSA compression ratio")
    flags.DEFINE_integer("hca_ratio", 128, "HCA compression ratio")
    flags.DEFINE_integer("topk", 512, "selected entries per query of the sparse kind (V4-Flash: 512)")
    flags.DEFINE_integer("index_heads", 4, "indexer heads NI (V4: 64)")
    flags.DEFINE_integer("index_head_dim", 32, "indexer head dim HI (V4: 128)")
    flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "dtype of q, kv and entries")
    flags.DEFINE_integer("repeats", 1, "timed calls after the compile call (median reported)")
    flags.DEFINE_float(
        "full_mask_max_gib", 6.0, "skip a full-mask run whose compiled peak exceeds this"
    )
    flags.DEFINE_bool("json", False, "print the result rows as JSON")
    flags.DEFINE_string("log", "experiments/LOG.md", "markdown log to append to ('' to skip)")


def _inputs(T: int, ratio: int):
    """Random q, kv, entries, sink; one document per row."""
    B, N, H = FLAGS.batch, FLAGS.heads, FLAGS.head_dim
    dtype = jnp.dtype(FLAGS.dtype)
    keys = jax.random.split(jax.random.key(T), 4)
    C = T // ratio
    return {
        "q": jax.random.normal(keys[0], (B, T, N, H), dtype),
        "kv": jax.random.normal(keys[1], (B, T, H), dtype),
        "entries": jax.random.normal(keys[2], (B, C, H), dtype),
        "sink": jax.random.normal(keys[3], (N,), jnp.float32),
        "segment_ids": jnp.ones((B, T), jnp.int32),
        "entry_segment": jnp.ones((B, C), jnp.int32),
    }


def spread_topk(B: int, T: int, ratio: int, K: int) -> jax.Array:
    """K distinct admissible entries per query, spread evenly over its history; -1 where fewer exist.

    Shapes:
      -> [B, T, K] int32.
    """
    n = (jnp.arange(T, dtype=jnp.int32) + 1) // ratio  # admissible entries of query t
    k = jnp.arange(K, dtype=jnp.int32)
    step = jnp.where(n[:, None] > K, (k[None, :] * n[:, None]) // K, k[None, :])
    idx = jnp.where(k[None, :] < n[:, None], n[:, None] - 1 - step, -1)
    return jnp.broadcast_to(idx, (B, T, K))


def full_mask_attention(q, kv, entries, sink, key_mask):
    """Baseline: softmax with sink over all T + C keys under a full [B, T, T + C] mask."""
    keys = jnp.concatenate([kv, entries], axis=1)
    z = jnp.einsum("btnh,bsh->btns", q, keys, preferred_element_type=jnp.float32) * q.shape[-1] ** -0.5
    z = jnp.where(key_mask[:, :, None, :], z, -jnp.inf)
    s = sink[:, None]
    m = jax.lax.stop_gradient(jnp.maximum(z.max(-1, keepdims=True), s))
    e = jnp.exp(z - m)
    p = e / (e.sum(-1, keepdims=True) + jnp.exp(s - m))
    return jnp.einsum("btns,bsh->btnh", p.astype(keys.dtype), keys).astype(q.dtype)


def full_mask(T: int, window: int, topk_idx) -> jax.Array:
    """[B, T, T + C] mask of the sparse rule (single document): window plus the selected entries."""
    t = jnp.arange(T)
    win = (t[None, :] <= t[:, None]) & (t[None, :] > t[:, None] - window)
    C = T // FLAGS.csa_ratio
    sel = jnp.zeros(topk_idx.shape[:2] + (C + 1,), bool)
    sel = jax.vmap(lambda s, i: s.at[jnp.arange(T)[:, None], jnp.where(i >= 0, i, C)].set(True))(sel, topk_idx)
    return jnp.concatenate([jnp.broadcast_to(win, topk_idx.shape[:1] + win.shape), sel[..., :C]], axis=-1)


def _with_backward(fn):
    """fn(q, kv, entries, sink) -> out  becomes  (q, kv, entries, sink) -> (out, grads)."""

    def run(q, kv, entries, sink):
        out, vjp = jax.vjp(fn, q, kv, entries, sink)
        return out, vjp(jnp.ones_like(out))

    return run


def _with_backward_extra(fn):
    """fn(q, kv, entries, sink, extra) -> out  becomes  (..., extra) -> (out, grads w.r.t. the first four)."""

    def run(q, kv, entries, sink, extra):
        out, vjp = jax.vjp(lambda *a: fn(*a, extra), q, kv, entries, sink)
        return out, vjp(jnp.ones_like(out))

    return run


def full_mask_estimate(T: int) -> int:
    """Bytes the full-mask baseline needs at least, before anything is allocated or compiled: the bool
    [B, T, T + C] mask plus three float32 [B, T, N, T + C] score/probability tensors (forward or backward)."""
    keys = T + T // FLAGS.csa_ratio
    return FLAGS.batch * T * keys * (1 + 3 * 4 * FLAGS.heads)


def _case(kind: str, T: int):
    """(jitted function, args) for one measurement."""
    impl, interpret = FLAGS.impl, FLAGS.interpret or None
    window, K = FLAGS.window, FLAGS.topk
    base = kind.rsplit("_", 1)[0]
    if base in ("sparse", "full_mask"):
        x = _inputs(T, FLAGS.csa_ratio)
        topk = spread_topk(FLAGS.batch, T, FLAGS.csa_ratio, K)
        if base == "sparse":
            fn = functools.partial(
                sparse_attention,
                topk_idx=topk,
                segment_ids=x["segment_ids"],
                window=window,
                impl=impl,
                interpret=interpret,
            )
            attn = lambda q, kv, e, s: fn(q, kv, e, sink=s)
        else:  # the mask is built inside the jitted function, so the compiled peak accounts for it
            call = lambda q, kv, e, s, topk: full_mask_attention(q, kv, e, s, full_mask(T, window, topk))
            if not kind.endswith("_fwd"):
                call = _with_backward_extra(call)
            return jax.jit(call), (x["q"], x["kv"], x["entries"], x["sink"], topk)
    elif base == "dense":
        x = _inputs(T, FLAGS.hca_ratio)
        fn = functools.partial(
            dense_attention,
            entry_segment=x["entry_segment"],
            segment_ids=x["segment_ids"],
            ratio=FLAGS.hca_ratio,
            window=window,
            impl=impl,
            interpret=interpret,
        )
        attn = lambda q, kv, e, s: fn(q, kv, e, sink=s)
    else:
        B, NI, HI, C = FLAGS.batch, FLAGS.index_heads, FLAGS.index_head_dim, T // FLAGS.csa_ratio
        keys = jax.random.split(jax.random.key(T), 3)
        dtype = jnp.dtype(FLAGS.dtype)
        args = (
            jax.random.normal(keys[0], (B, T, NI, HI), dtype),
            jax.random.normal(keys[1], (B, C, HI), dtype),
            jax.random.normal(keys[2], (B, T, NI), dtype),
            jnp.ones((B, C), jnp.int32),
            jnp.ones((B, T), jnp.int32),
        )
        fn = functools.partial(lightning_indexer, ratio=FLAGS.csa_ratio, topk=K, impl=impl, interpret=interpret)
        return jax.jit(fn), args
    call = attn if kind.endswith("_fwd") else _with_backward(attn)
    return jax.jit(call), (x["q"], x["kv"], x["entries"], x["sink"])


def _peak_bytes(compiled) -> int:
    m = compiled.memory_analysis()
    if m is None:
        return -1
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes)


def measure(kind: str, T: int) -> dict:
    limit = FLAGS.full_mask_max_gib * 2**30
    if kind.startswith("full_mask") and full_mask_estimate(T) > limit:  # decided before allocating anything
        need = full_mask_estimate(T)
        return {"impl": FLAGS.impl or "default", "kind": kind, "seq_len": T, "peak_bytes": need, "seconds": None,
                "cpu_seconds": None, "skipped": f"estimated {need / 2**30:.1f} GiB > --full_mask_max_gib"}
    fn, args = _case(kind, T)
    compiled = fn.lower(*args).compile()
    peak = _peak_bytes(compiled)
    row = {"impl": FLAGS.impl or "default", "kind": kind, "seq_len": T, "peak_bytes": peak}
    if kind.startswith("full_mask") and peak > limit:
        return dict(row, seconds=None, cpu_seconds=None, skipped=f"needs {peak / 2**30:.1f} GiB")
    times = timing.time_calls(lambda: compiled(*args), FLAGS.repeats)  # after one warm-up call
    return dict(row, seconds=float(times.median_s), cpu_seconds=float(times.median_cpu_s))


def _ratios(rows: list[dict]) -> list[str]:
    """Per kind: time(T) / time(T_min) for every measured T, next to the length ratio; sparse vs full mask."""
    lines = []
    for kind in dict.fromkeys(r["kind"] for r in rows):
        done = sorted((r for r in rows if r["kind"] == kind and r["seconds"]), key=lambda r: r["seq_len"])
        for hi in done[1:]:
            lo, n = done[0], hi["seq_len"] / done[0]["seq_len"]
            lines.append(
                f"{kind}: time({hi['seq_len']}) / time({lo['seq_len']}) = {hi['seconds'] / lo['seconds']:.2f} "
                f"(CPU time {hi['cpu_seconds'] / lo['cpu_seconds']:.2f}); length x{n:.0f}: linear "
                f"{n:.0f}, quadratic {n * n:.0f}"
            )
    by_t = {(r["kind"], r["seq_len"]): r for r in rows if r["seconds"]}
    for (kind, T), r in sorted(by_t.items()):
        d = by_t.get(("full_mask" + kind[len("sparse") :], T)) if kind.startswith("sparse") else None
        if d:
            lines.append(
                f"{kind} at T={T}: full_mask / sparse time = {d['seconds'] / r['seconds']:.2f}, "
                f"peak memory = {d['peak_bytes'] / r['peak_bytes']:.2f}"
            )
    return lines


def _commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _markdown(rows: list[dict], ratios: list[str], meta: dict) -> str:
    head = (
        f"\n## {meta['date']} attention benchmark (commit {meta['commit']}, {meta['platform']}, "
        f"{meta['cpus']} CPUs, load average {meta['load']:.1f} at start)\n\n"
        f"`python -m tools.bench_attention {meta['argv']}` - B={meta['B']}, N={meta['N']}, H={meta['H']}, "
        f"window {meta['window']}, CSA m={meta['csa_ratio']} top-{meta['topk']}, HCA m={meta['hca_ratio']}, "
        f"indexer NI={meta['NI']} HI={meta['HI']}, {meta['dtype']}, impl {meta['impl']}.\n\n"
        "| kind | T | seconds | CPU seconds | peak MiB |\n|---|---|---|---|---|\n"
    )
    body = "".join(
        f"| {r['kind']} | {r['seq_len']} | "
        + (f"{r['seconds']:.3f} | {r['cpu_seconds']:.3f}" if r["seconds"] else f"skipped ({r['skipped']}) | -")
        + f" | {r['peak_bytes'] / 2**20:.0f} |\n"
        for r in rows
    )
    return head + body + "\n" + "".join(f"- {line}\n" for line in ratios)


def main(argv):
    del argv
    bad = [k for k in FLAGS.kinds if k not in KINDS]
    if bad:
        raise SystemExit(f"unknown --kinds {bad}; choose from {', '.join(KINDS)}")
    try:
        lens = [int(v) for v in FLAGS.seq_lens]
        idx_lens = [int(v) for v in FLAGS.indexer_seq_lens] or lens
        full_mask_lens = [int(v) for v in FLAGS.full_mask_seq_lens] or lens
    except ValueError as e:
        raise SystemExit(f"--seq_lens / --indexer_seq_lens / --full_mask_seq_lens must be integers: {e}") from None
    plan = [
        (k, T)
        for k in FLAGS.kinds
        for T in (idx_lens if k == "indexer" else full_mask_lens if k.startswith("full_mask") else lens)
    ]
    load = os.getloadavg()[0]
    rows = []
    bar = tqdm(plan, desc="attention bench", unit="case")
    for kind, T in bar:
        bar.set_postfix_str(f"{kind} T={T}")
        try:
            rows.append(measure(kind, T))
        except ValueError as e:  # e.g. a Pallas request that cannot run on this platform
            raise SystemExit(f"{kind} at T={T}: {e}") from None
    ratios = _ratios(rows)
    meta = {
        "date": datetime.date.today().isoformat(),
        "commit": _commit(),
        "platform": jax.default_backend(),
        "cpus": os.cpu_count(),
        "load": load,
        "argv": " ".join(os.sys.argv[1:]),
        "B": FLAGS.batch,
        "N": FLAGS.heads,
        "H": FLAGS.head_dim,
        "window": FLAGS.window,
        "csa_ratio": FLAGS.csa_ratio,
        "topk": FLAGS.topk,
        "hca_ratio": FLAGS.hca_ratio,
        "NI": FLAGS.index_heads,
        "HI": FLAGS.index_head_dim,
        "dtype": FLAGS.dtype,
        "impl": FLAGS.impl or "default",
    }
    if FLAGS.json:
        print(json.dumps(rows, indent=1))
    else:
        for r in rows:
            t = f"{r['seconds']:.3f} s" if r["seconds"] else f"skipped ({r['skipped']})"
            print(f"{r['kind']:>14} T={r['seq_len']:>7}: {t:>24}  peak {r['peak_bytes'] / 2**20:9.0f} MiB")
        print("\n".join(ratios))
    if FLAGS.log:
        os.makedirs(os.path.dirname(FLAGS.log) or ".", exist_ok=True)
        with open(FLAGS.log, "a", encoding="utf-8") as f:  # one append: never rewrites other entries
            f.write(_markdown(rows, ratios, meta))
        print(f"appended to {FLAGS.log}")


if __name__ == "__main__":
    define_flags()
    app.run(main)
