"""Time the grouped expert matmul for bf16, FP8 and MXFP4 weights: reference vs Pallas, in one run.

    python -m tools.bench_expert_matmul [--json] [--backward] [--iters=5]

Default shapes are V4-Flash's expert w1 scaled down for a CPU: hidden 4096/8 = 512, expert hidden
2048/8 = 256, 256/16 = 16 experts, top-6 of 256 tokens (M = 1536 rows, random routing). On CPU the Pallas
kernels run in the Pallas *interpreter*: those timings measure the interpreter (about a millisecond per grid
step), not kernel speed, and say nothing about GPU/TPU performance; they are recorded to catch regressions in
the interpreted path that the tests use. On a GPU/TPU the native kernel is compiled. Results (with ratios to
the reference measured in the same run) are appended to experiments/LOG.md.
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from deepseek_v4 import quant
from pallas_kernels.expert_matmul import BlockSizes, expert_matmul
from tools import roofline, timing


FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command line's flags, defined only when this module runs as the program (absl flags are
    process-global, and other programs and the tests import this module)."""
    flags.DEFINE_bool("json", False, "print the results as JSON")
    flags.DEFINE_bool("backward", False, "also time forward + backward (VJP w.r.t. tokens)")
    flags.DEFINE_integer("iters", 5, "timed calls per case (median reported)")
    flags.DEFINE_integer("tokens", 256, "tokens routed (rows M = tokens * topk)")
    flags.DEFINE_integer("topk", 6, "experts per token")
    flags.DEFINE_integer("d", 512, "hidden size K (V4-Flash: 4096)")
    flags.DEFINE_integer("f", 256, "expert hidden size N (V4-Flash: 2048)")
    flags.DEFINE_integer("experts", 16, "experts E (V4-Flash: 256)")
    flags.DEFINE_string("log", "experiments/LOG.md", "markdown log to append to ('' to skip)")


FORMATS = ("bf16", "fp8", "mxfp4")


def _impls(platform: str) -> list[tuple[str, bool]]:
    """(impl, interpret) pairs that can run here."""
    if platform == "gpu":
        return [("reference", False), ("pallas_gpu", False)]
    if platform == "tpu":
        return [("reference", False), ("pallas_tpu", False)]
    return [("reference", False), ("pallas_gpu", True), ("pallas_tpu", True)]


def _weights(fmt: str, e: int, k: int, n: int):
    w = (np.random.default_rng(0).standard_normal((e, k, n)) * 0.02).astype(np.float32)  # [E, K, N]
    if fmt == "bf16":
        return jnp.asarray(w, jnp.bfloat16), None
    if fmt == "fp8":
        q, s = quant.quantize_fp8_blocks(w)
        return jnp.asarray(q), jnp.asarray(s)
    p, s = quant.quantize_mxfp4(w, axis=-2)
    return jnp.asarray(p), jnp.asarray(s)


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _markdown(results: list[dict], meta: dict) -> str:
    lines = [
        (f"\n## {meta['date']} expert_matmul benchmark (commit {meta['commit']}, {meta['platform']}, "
         f"{meta['cpus']} CPUs, load average {meta['load']:.1f} at start)"),
        "",
        (f"`python -m tools.bench_expert_matmul` - M={meta['m']} (tokens {meta['tokens']} x top-{meta['topk']}), "
         f"K={meta['k']}, N={meta['n']}, E={meta['e']}, bf16 tokens, median of {meta['iters']} calls."),
    ]
    if meta["platform"] == "cpu":
        lines.append("Pallas rows run in the Pallas interpreter on CPU: interpreter cost, NOT kernel speed.")
    lines += ["", "| weights | pass | impl | wall ms | x reference | CPU ms | x reference | compile+first s |",
              "|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['weights']} | {r['pass']} | {r['impl']}{' (interpret)' if r['interpret'] else ''} | "
                     f"{r['ms']:.1f} | {r['ratio']:.2f} | {r['cpu_ms']:.1f} | {r['cpu_ratio']:.2f} | "
                     f"{r['first_s']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv):
    del argv
    platform = jax.default_backend()
    m, k, n, e = FLAGS.tokens * FLAGS.topk, FLAGS.d, FLAGS.f, FLAGS.experts
    rng = np.random.default_rng(1)
    group_sizes = jnp.asarray(rng.multinomial(m, np.full(e, 1.0 / e)), jnp.int32)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    ct = jnp.asarray(rng.standard_normal((m, n)), jnp.bfloat16)
    impls = _impls(platform)
    passes = ["fwd", "fwd+bwd"] if FLAGS.backward else ["fwd"]
    cases = [(f, p, i, interp) for f in FORMATS for p in passes for i, interp in impls]
    results, start, load = [], time.perf_counter(), os.getloadavg()[0]
    for idx, (fmt, pas, impl, interpret) in enumerate(cases):
        w, s = _weights(fmt, e, k, n)

        def call(x, w, s, gs, impl=impl, interpret=interpret):
            return expert_matmul(x, w, gs, s, impl=impl, interpret=interpret or None, block_sizes=BlockSizes())

        if pas == "fwd":
            fn = jax.jit(call)
            args = (x, w, s, group_sizes)
        else:
            fn = jax.jit(lambda x, w, s, gs, ct, call=call: jax.vjp(lambda x: call(x, w, s, gs), x)[1](ct))
            args = (x, w, s, group_sizes, ct)
        times = timing.time_calls(lambda: fn(*args), FLAGS.iters)  # first: compile + first call
        first, steady, cpu = times.first_s, times.median_s, times.median_cpu_s
        ref = next((r for r in results if (r["weights"], r["pass"], r["impl"]) == (fmt, pas, "reference")),
                   {"ms": steady * 1e3, "cpu_ms": cpu * 1e3})
        results.append({"weights": fmt, "pass": pas, "impl": impl, "interpret": interpret, "ms": steady * 1e3,
                        "ratio": steady * 1e3 / ref["ms"], "cpu_ms": cpu * 1e3, "cpu_ratio": cpu * 1e3 / ref["cpu_ms"],
                        "first_s": first})
        done = idx + 1
        elapsed = time.perf_counter() - start
        print(f"[{done}/{len(cases)}] {fmt:5s} {pas:7s} {impl:10s}{' (interpret)' if interpret else '':13s} "
              f"{steady * 1e3:9.1f} ms (CPU {cpu * 1e3:8.1f} ms)  x{results[-1]['ratio']:.2f} vs reference   "
              f"elapsed {elapsed:.0f}s, ETA {elapsed / done * (len(cases) - done):.0f}s", flush=True)
    meta = {"date": datetime.date.today().isoformat(), "commit": _commit(), "platform": platform,
            "cpus": os.cpu_count(), "load": load, "m": m, "k": k, "n": n, "e": e, "tokens": FLAGS.tokens,
            "topk": FLAGS.topk, "iters": FLAGS.iters}
    if platform == "cpu":
        print("NOTE: Pallas timings on CPU are the Pallas interpreter, not kernel speed.")
    flash = roofline.grouped_matmul(FLAGS.tokens * FLAGS.topk, 4096, 2048, 256, "bf16")
    print(f"(for scale: the same token count at full V4-Flash w1 shapes on an H200 is {flash.bound}-bound, "
          f">= {flash.seconds * 1e6:.0f} us for bf16 weights; see python -m tools.roofline)")
    if FLAGS.log:
        os.makedirs(os.path.dirname(FLAGS.log) or ".", exist_ok=True)
        with open(FLAGS.log, "a", encoding="utf-8") as f:  # one append: never rewrites other entries
            f.write(_markdown(results, meta))
        print(f"appended to {FLAGS.log}")
    if FLAGS.json:
        print(json.dumps({"meta": meta, "results": results}, indent=2))


if __name__ == "__main__":
    define_flags()
    app.run(main)
