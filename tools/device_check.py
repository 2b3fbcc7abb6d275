"""One accelerator check: kernel tests natively, every kernel against its XLA reference, a ~1B-active train step.

    python -m tools.device_check [--out=FILE.json] [--tests=auto|yes|no] [--size=auto|small|full]

On a GPU/TPU (`--size=full`, the default there; about 10 minutes on one H200):
  1. the kernel tests run natively: `pytest tests/pallas_kernels tests/deepseek_v4/test_fp8_gemm.py` (their
     `interpret` fixture is False for this platform's kernels);
  2. each kernel family is timed against its XLA reference at V4-Flash widths: CSA sparse attention and the
     dense phase at 32K tokens (forward + backward), the lightning indexer, the grouped expert matmul with
     bf16 / FP8 / MXFP4 weights and FP8 x FP8 (FP8 tokens too), and the FP8 linear against a bf16 matmul; with
     achieved TFLOP/s and GB/s (FLOPs and bytes are the estimates written in each case) and, on a chip
     `tools.roofline` knows, the fraction of its roofline bound;
  3. a train step (fwd + bwd + AdamW + clip) of a V4-shaped config with ~1.2B active matmul parameters (D 2048,
     12 layers: 2 sliding then CSA/HCA pairs, 32 heads of 512, 32 experts top-6 of width 1024, index top-k 512),
     batch 4 x 4096, in bf16 and with `quant=fp8`, with MFU against the chip's bf16 peak.
On CPU (`--size=small`, the default there) the same steps run at toy shapes with the Pallas kernels in interpret
mode and a one-layer (CSA) cut of the tiny config (the tests are skipped unless `--tests=yes`): CI proves the
script works, not speed.
Everything goes to one JSON object (printed, and written to `--out`); a step that fails records its error and
the script goes on.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import subprocess
import sys
import time
import traceback

import jax
import jax.numpy as jnp
from absl import app, flags

from experiments import entry
from tools import timing


FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command line's flags, defined only when this module runs as the program (absl flags are
    process-global, and other programs and the tests import this module)."""
    flags.DEFINE_string("out", None, "write the JSON result here (it is printed either way)")
    flags.DEFINE_enum("tests", "auto", ["auto", "yes", "no"], "run the kernel tests (auto: not on CPU)")
    flags.DEFINE_enum("size", "auto", ["auto", "small", "full"], "shapes (auto: full on GPU/TPU, small on CPU)")
    flags.DEFINE_integer("iters", None, "timed calls per case (default: 5 full, 1 small)")
    flags.DEFINE_integer("train_steps", None, "timed train steps per precision (default: 3 full, 1 small)")


TEST_PATHS = ("tests/pallas_kernels", "tests/deepseek_v4/test_fp8_gemm.py")


@dataclasses.dataclass(frozen=True)
class Sizes:
    """Shapes of one run."""

    tokens: int  # attention / indexer rows (one sequence)
    heads: int
    head_dim: int
    topk: int
    index_heads: int
    index_head_dim: int
    expert_rows: int  # routed (token, expert) rows of the grouped matmul
    hidden: int
    expert_hidden: int
    experts: int
    linear_rows: int
    train_batch: tuple[int, int]


FULL = Sizes(tokens=32768, heads=64, head_dim=512, topk=512, index_heads=64, index_head_dim=128,
             expert_rows=65536, hidden=4096, expert_hidden=2048, experts=32, linear_rows=16384,
             train_batch=(4, 4096))
SMALL = Sizes(tokens=256, heads=2, head_dim=64, topk=16, index_heads=2, index_head_dim=32, expert_rows=256,
              hidden=128, expert_hidden=128, experts=4, linear_rows=64, train_batch=(1, 64))

# The ~1.2B-active V4-shaped model of the full run (overrides of the nano preset).
TRAIN_MODEL = dict(hidden_size=2048, num_hidden_layers=12, num_attention_heads=32, head_dim=512, qk_rope_head_dim=64,
                   q_lora_rank=768, o_groups=4, o_lora_rank=512, compress_ratios=(0, 0) + (4, 128) * 5,
                   num_nextn_predict_layers=0, csa_ratio=4, hca_ratio=128, sliding_window=128, index_n_heads=32,
                   index_head_dim=128, index_topk=512, n_routed_experts=32, num_experts_per_tok=6,
                   moe_intermediate_size=1024, num_hash_layers=2, max_position_embeddings=65536,
                   original_max_position_embeddings=4096, rope_scaling_factor=16.0, dtype="bfloat16",
                   param_dtype="float32", remat_policy="full", moe_impl="grouped")

# The CPU run's model: tiny cut to one CSA layer (learned routing), a small vocabulary: the two train-step compiles
# take ~28 CPU-seconds together (~41 with a sliding hash-routed layer in front).
SMALL_TRAIN_MODEL = dict(num_hidden_layers=1, compress_ratios=(4,), num_nextn_predict_layers=0, num_hash_layers=0,
                         vocab_size=512)


def _hardware():
    from tools import roofline

    kind = jax.devices()[0].device_kind.lower()
    return next((hw for key, hw in roofline.HARDWARE.items() if key in kind), None)


def _rates(seconds: float, flops: float, nbytes: float, compute: str) -> dict:
    out = {"seconds": seconds, "tflops": flops / seconds / 1e12, "gbps": nbytes / seconds / 1e9,
           "flops": flops, "bytes": nbytes}
    hw = _hardware()
    if hw is not None and compute in hw.peak_flops:
        bound = max(flops / hw.peak_flops[compute], nbytes / hw.hbm_bytes_per_s)
        out["roofline_fraction"] = bound / seconds
    return out


def _attention_case(kind: str, s: Sizes, impl: str, interpret: bool):
    """fwd + bwd of CSA sparse attention or the CSA dense phase; (fn, flops, bytes)."""
    from pallas_kernels.dense_attention import dense_attention
    from pallas_kernels.sparse_attention import sparse_attention

    t, n, h, ratio, window = s.tokens, s.heads, s.head_dim, 4, 128
    c = t // ratio
    k = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(k[0], (1, t, n, h), jnp.bfloat16)
    kv = jax.random.normal(k[1], (1, t, h), jnp.bfloat16)
    entries = jax.random.normal(k[2], (1, c, h), jnp.bfloat16)
    sink = jnp.zeros((n,), jnp.float32)
    seg = jnp.ones((1, t), jnp.int32)
    opts = {"impl": impl} if impl == "reference" else {"impl": impl, "interpret": interpret}
    if kind == "sparse":
        visible = jnp.maximum((jnp.arange(t) + 1) // ratio, 1)[:, None]
        topk = (jax.random.randint(k[3], (1, t, s.topk), 0, 1 << 30) % visible).astype(jnp.int32)
        keys = window + s.topk
        f = lambda q, kv, e, sk: sparse_attention(q, kv, e, topk, sk, seg, window=window, **opts)  # noqa: E731
    else:
        eseg = jnp.ones((1, c), jnp.int32)
        keys = window + c / 2  # a causal query sees half the entries on average
        f = lambda q, kv, e, sk: dense_attention(q, kv, e, eseg, sk, seg, ratio=ratio, window=window,  # noqa: E731
                                                 **opts)

    @jax.jit
    def fwd_bwd(q, kv, e, sk):
        out, vjp = jax.vjp(f, q, kv, e, sk)
        return vjp(out)

    flops = 3.5 * 4 * t * n * h * keys  # forward QK^T and PV (4 t n h keys), backward ~2.5x the forward
    nbytes = 2 * (4 * t * n * h + 3 * (t + c) * h)  # q, o, do, dq; keys, entries and their gradients
    return (lambda: fwd_bwd(q, kv, entries, sink)), flops, nbytes


def _indexer_case(s: Sizes, impl: str, interpret: bool):
    from pallas_kernels.lightning_indexer import lightning_indexer

    t, ratio = s.tokens, 4
    c = t // ratio
    k = jax.random.split(jax.random.key(1), 3)
    qi = jax.random.normal(k[0], (1, t, s.index_heads, s.index_head_dim), jnp.bfloat16)
    ki = jax.random.normal(k[1], (1, c, s.index_head_dim), jnp.bfloat16)
    w = jax.random.normal(k[2], (1, t, s.index_heads), jnp.bfloat16)
    eseg, seg = jnp.ones((1, c), jnp.int32), jnp.ones((1, t), jnp.int32)
    opts = {"impl": impl} if impl == "reference" else {"impl": impl, "interpret": interpret}
    fn = jax.jit(lambda *a: lightning_indexer(*a, ratio=ratio, topk=s.topk, **opts))
    flops = 2 * t * (c / 2) * s.index_heads * s.index_head_dim
    nbytes = 2 * (t * s.index_heads * s.index_head_dim + c * s.index_head_dim) + 4 * t * s.topk
    return (lambda: fn(qi, ki, w, eseg, seg)), flops, nbytes


def _expert_case(s: Sizes, fmt: str, impl: str, interpret: bool):
    from pallas_kernels import formats
    from pallas_kernels.expert_matmul import expert_matmul

    m, d, f, e = s.expert_rows, s.hidden, s.expert_hidden, s.experts
    k = jax.random.split(jax.random.key(2), 2)
    x = jax.random.normal(k[0], (m, d), jnp.bfloat16)
    w = 0.05 * jax.random.normal(k[1], (e, d, f), jnp.float32)
    scale = None
    if fmt == "bf16":
        w, wbytes = w.astype(jnp.bfloat16), 2.0
    elif fmt in ("fp8", "fp8 x fp8"):
        (w, scale), wbytes = formats.quantize_fp8_blocks(w), 1.0
    else:
        (w, scale), wbytes = formats.quantize_mxfp4(w, axis=-2), 0.5
    gs = jnp.full((e,), m // e, jnp.int32)
    opts = {"impl": impl} if impl == "reference" else {"impl": impl, "interpret": interpret}
    if fmt == "fp8 x fp8":  # FP8 activations too: E4M3 1x128 tiles (V4's activation format)
        xq, xs = formats.quantize_act_fp8(x)
        fn8 = jax.jit(lambda x, xs, w, sc, gs: expert_matmul(x, w, gs, sc, lhs_scale=xs, **opts))
        return (lambda: fn8(xq, xs, w, scale, gs)), 2 * m * d * f, m * d + wbytes * e * d * f + 2 * m * f
    fn = jax.jit(lambda x, w, sc, gs: expert_matmul(x, w, gs, sc, **opts))
    return (lambda: fn(x, w, scale, gs)), 2 * m * d * f, 2 * m * d + wbytes * e * d * f + 2 * m * f


def _linear_case(s: Sizes, fp8: bool):
    from deepseek_v4 import fp8_gemm

    m, kdim, n = s.linear_rows, s.hidden, s.hidden
    k = jax.random.split(jax.random.key(3), 2)
    x = jax.random.normal(k[0], (m, kdim), jnp.bfloat16)
    w = 0.05 * jax.random.normal(k[1], (kdim, n), jnp.float32)
    if fp8:
        fn = jax.jit(fp8_gemm.fp8_linear)
        return (lambda: fn(x, w)), 2 * m * kdim * n, m * kdim + kdim * n + 2 * m * n
    wb = w.astype(jnp.bfloat16)
    fn = jax.jit(lambda x, w: x @ w)
    return (lambda: fn(x, wb)), 2 * m * kdim * n, 2 * (m * kdim + kdim * n + m * n)


def _run(name: str, make, compute: str, iters: int) -> dict:
    try:
        fn, flops, nbytes = make()
        times = timing.time_calls(fn, repeats=iters)  # the first call (compilation included) untimed
        return {"case": name, "first_call_s": times.first_s, **_rates(times.median_s, flops, nbytes, compute)}
    except Exception as e:  # noqa: BLE001  (record and go on)
        return {"case": name, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}",
                "trace": traceback.format_exc(limit=3)[-1500:]}


def kernel_benchmarks(s: Sizes, iters: int) -> list[dict]:
    """Each kernel (its Pallas implementation on this platform, interpreted on CPU) and its XLA reference."""
    backend = jax.default_backend()
    native = {"gpu": "pallas_gpu", "cuda": "pallas_gpu", "tpu": "pallas_tpu"}.get(backend)
    kernel, interpret = (native, False) if native else ("pallas_gpu", True)
    rows = []
    for label, impl in ((kernel, kernel), ("reference", "reference")):
        for kind in ("sparse", "dense"):
            rows.append(_run(f"csa_{kind}_attention fwd+bwd [{label}]",
                             lambda kind=kind, impl=impl: _attention_case(kind, s, impl, interpret), "bf16", iters))
        rows.append(_run(f"lightning_indexer [{label}]", lambda impl=impl: _indexer_case(s, impl, interpret), "bf16",
                         iters))
        for fmt in ("bf16", "fp8", "mxfp4", "fp8 x fp8"):
            rows.append(_run(f"expert_matmul {fmt} [{label}]",
                             lambda fmt=fmt, impl=impl: _expert_case(s, fmt, impl, interpret),
                             "fp8" if fmt == "fp8 x fp8" else "bf16", iters))
    rows.append(_run("linear fp8 (fp8_gemm) [xla]", lambda: _linear_case(s, True), "fp8", iters))
    rows.append(_run("linear bf16 [xla]", lambda: _linear_case(s, False), "bf16", iters))
    return rows


def speedups(rows: list[dict]) -> dict[str, float]:
    """Kernel time over reference time per case (reference / kernel: > 1 = the kernel is faster), and the two
    low-precision ratios (FP8 grouped matmul vs bf16; FP8 linear vs bf16)."""
    t = {r["case"]: r["seconds"] for r in rows if "seconds" in r}
    out = {}
    for name, sec in t.items():
        if "[reference]" in name:
            continue
        base = name.rsplit(" [", 1)[0]
        ref = t.get(f"{base} [reference]")
        if ref is not None:
            out[f"{base}: reference / kernel"] = ref / sec
    kern = [n for n in t if n.startswith("expert_matmul bf16 [") and "[reference]" not in n]
    if kern and kern[0].replace("bf16", "fp8") in t:
        out["expert_matmul: bf16 / fp8 time"] = t[kern[0]] / t[kern[0].replace("bf16", "fp8")]
    if kern and kern[0].replace("bf16", "fp8 x fp8") in t:
        out["expert_matmul: bf16 / fp8 x fp8 time"] = t[kern[0]] / t[kern[0].replace("bf16", "fp8 x fp8")]
    if "linear fp8 (fp8_gemm) [xla]" in t and "linear bf16 [xla]" in t:
        out["linear: bf16 / fp8 time"] = t["linear bf16 [xla]"] / t["linear fp8 (fp8_gemm) [xla]"]
    return out


def train_steps(small: bool, steps: int) -> list[dict]:
    """Train-step time, tokens/s and MFU in bf16 and with quant=fp8."""
    from deepseek_v4 import get_config, metrics
    from tools import bench_shapes

    base = get_config("tiny", **SMALL_TRAIN_MODEL) if small else get_config("nano", **TRAIN_MODEL)
    b, t = SMALL.train_batch if small else FULL.train_batch
    peak, peak_source = metrics.default_peak_flops()
    rows = []
    for quant in ("none", "fp8"):
        cfg = base.replace(quant=quant, dtype="bfloat16")
        try:
            r = bench_shapes.bench_train_step(cfg, bench_shapes.random_batch(cfg, b, t), 1, steps)
            tps = b * t / r["median_s"]
            flops_tok = metrics.train_flops_per_token(cfg, t)
            active = sum(metrics.active_matmul_params(cfg).values())
            rows.append({"quant": quant, "batch": [b, t], "active_matmul_params": active,
                         "step_s": r["median_s"], "first_step_s": r["compile_s"], "tokens_per_s": tps,
                         "mfu": tps * flops_tok / peak, "peak_flops": peak, "peak_source": peak_source,
                         "first_loss": r["first_loss"]})
        except Exception as e:  # noqa: BLE001
            rows.append({"quant": quant, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"})
    return rows


GOALS = {  # measured value -> target, on one H200 at the full sizes
    "csa_sparse_attention fwd+bwd: reference / kernel": 3.0,
    "expert_matmul: bf16 / fp8 time": 1.5,
    "train step MFU (bf16)": 0.40,
}


def goals(result: dict) -> dict:
    """Each goal's measured value, target and whether it is met (None where it was not measured)."""
    values = dict(result["speedups"])
    values.update({f"train step MFU ({'bf16' if r['quant'] == 'none' else r['quant']})": r["mfu"]
                   for r in result["train_step"] if "mfu" in r})
    return {name: {"value": values.get(name), "target": target,
                   "met": None if values.get(name) is None else values[name] >= target}
            for name, target in GOALS.items()}


def kernel_tests(timeout_s: int = 300) -> dict:
    """The kernel tests; on a GPU (TPU) the other platform's kernel style is deselected (it would only be
    interpreted there, slowly)."""
    foreign = {"gpu": "pallas_tpu", "cuda": "pallas_tpu", "tpu": "pallas_gpu"}.get(jax.default_backend())
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *TEST_PATHS]
    if foreign:
        cmd += ["-k", f"not {foreign}"]
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
        tail = (p.stdout + p.stderr).strip().splitlines()
        return {"returncode": p.returncode, "summary": tail[-1] if tail else "", "seconds": time.perf_counter() - t0,
                "failures": [ln for ln in tail if ln.startswith("FAILED")][:20]}
    except subprocess.TimeoutExpired:
        return {"returncode": None, "summary": f"timed out after {timeout_s} s", "seconds": timeout_s}


def run(size: str = "auto", tests: str = "auto", iters: int | None = None, train: int | None = None) -> dict:
    backend = jax.default_backend()
    small = size == "small" or (size == "auto" and backend == "cpu")
    sizes = SMALL if small else FULL
    iters = iters if iters is not None else (1 if small else 5)
    train = train if train is not None else (1 if small else 3)
    dev = jax.devices()[0]
    result = {"backend": backend, "device_kind": dev.device_kind, "device_count": jax.device_count(),
              "jax": jax.__version__, "python": platform.python_version(), "size": "small" if small else "full",
              "shapes": dataclasses.asdict(sizes)}
    t0 = time.perf_counter()
    if tests == "yes" or (tests == "auto" and backend != "cpu"):
        result["kernel_tests"] = kernel_tests()
    else:
        result["kernel_tests"] = {"skipped": "CPU run (pass --tests=yes to run them in interpret mode)"}
    result["kernels"] = kernel_benchmarks(sizes, iters)
    result["speedups"] = speedups(result["kernels"])
    result["train_step"] = train_steps(small, train)
    result["goals"] = goals(result)
    result["total_s"] = time.perf_counter() - t0
    return result


def main(argv):
    del argv
    entry.tune_gc()  # compile-heavy: see experiments.entry
    result = run(FLAGS.size, FLAGS.tests, FLAGS.iters, FLAGS.train_steps)
    text = json.dumps(result, indent=1, default=float)
    print(text)
    if FLAGS.out:
        os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
        with open(FLAGS.out, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    errors = [r["case"] for r in result["kernels"] if "error" in r] + [
        r["quant"] for r in result["train_step"] if "error" in r]
    failed_tests = result["kernel_tests"].get("returncode") not in (None, 0) if "returncode" in result[
        "kernel_tests"] else False
    if errors or failed_tests:
        print(f"device_check: errors in {errors}{' and failed kernel tests' if failed_tests else ''}",
              file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    define_flags()
    app.run(main)
