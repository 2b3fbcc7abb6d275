r"""Where a train step's time goes: each component of the model timed alone, forward and forward + backward.

  python -m tools.profile_step --shape=mid
  python -m tools.profile_step --config=tiny --batch_size=2 --seq_len=64 --calls=1

Every row is one component jitted on its own, on the activations shapes of the configured batch (random values;
the routing of the MoE rows comes from a real router on random inputs), timed as the median of `--calls` calls
after one compiling call. "x" is how many times a step runs the component; the totals multiply by it. FLOPs are
XLA's count of the compiled forward + backward (`cost_analysis`); GFLOP/s = FLOPs / fwd+bwd time. The sum of the
rows is compared with the measured whole train step (fwd + bwd + AdamW + clip, as `tools.bench_train`). Norms,
residual adds and the layer scan are not rows: the gap between the sum and the step is theirs plus XLA's
cross-component fusion and scheduling. Under `remat_policy=full` the step also recomputes each layer's forward.
"""

from __future__ import annotations

import collections
import sys

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

from deepseek_v4 import DeepseekV4, attention, loss, metrics, mhc, moe, train
from deepseek_v4 import layers as layers_lib
from sharding import expert_parallel
from tools import bench_shapes, timing

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command line's flags, defined only when this module runs as the program (absl flags are
    process-global, and other programs and the tests import this module)."""
    bench_shapes.define_flags()
    flags.DEFINE_integer("calls", 3, "Timed calls per component (median).")
    flags.DEFINE_integer("steps", 3, "Timed whole train steps (median), after one warm-up; 0 skips the whole step.")


Row = collections.namedtuple("Row", "name count fwd_s fwd_bwd_s flops")


def _flops(compiled) -> float:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    return float((cost or {}).get("flops", 0.0))


def _sum_floats(tree) -> jax.Array:
    leaves = [jnp.sum(x.astype(jnp.float32)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
    return sum(leaves, jnp.zeros((), jnp.float32))


def time_component(fn, diff_args, const_args, calls: int) -> tuple[float, float, float]:
    """(forward s, forward + backward s, fwd+bwd FLOPs) of fn(*diff_args, *const_args), each jitted alone.

    The backward differentiates the sum of fn's float outputs with respect to every float leaf of `diff_args`.
    """
    def fwd(d, c):
        return fn(*d, *c)

    def fwd_bwd(d, c):
        return jax.grad(lambda dd: _sum_floats(fn(*dd, *c)))(d)

    out = []
    for f in (fwd, fwd_bwd):
        compiled = jax.jit(f).lower(diff_args, const_args).compile()
        times = timing.time_calls(lambda: compiled(diff_args, const_args), repeats=calls)  # after one untimed call
        out.append((times.median_s, _flops(compiled)))
    return out[0][0], out[1][0], out[1][1]


def _module_fn(module):
    """(fn(params, *args) -> module(*args), params): the module's float parameters as a differentiable tree."""
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)
    return (lambda p, *args: nnx.merge(graphdef, p, rest)(*args)), params


def components(model: DeepseekV4, cfg, b: int, t: int, calls: int) -> list[Row]:
    """Time every component of `model` on a [b, t] batch; see the module docstring."""
    key = jax.random.key(1)
    ks = iter(jax.random.split(key, 16))
    dt = layers_lib.dtype_of(cfg.dtype)
    d, r, n_layers = cfg.hidden_size, cfg.hc_mult, cfg.num_hidden_layers
    tokens = jax.random.randint(next(ks), (b, t), 2, cfg.vocab_size, jnp.int32)
    seg = jnp.ones((b, t), jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    streams = jax.random.normal(next(ks), (b, t, r, d), dt)
    normed = jax.random.normal(next(ks), (b, t, d), dt)
    rows = []

    def add(name, count, fn, diff, const=()):
        fwd, fwd_bwd, flops = time_component(fn, tuple(diff), tuple(const), calls)
        rows.append(Row(name, count, fwd, fwd_bwd, flops))
        print(f"  {name}: fwd {fwd * 1e3:.1f} ms, fwd+bwd {fwd_bwd * 1e3:.1f} ms", flush=True)

    add("embedding", 1, lambda e, tok: jnp.broadcast_to(jnp.take(e, tok, axis=0).astype(dt)[:, :, None, :],
                                                        (b, t, r, d)), [model.embed[...]], [tokens])
    blocks = _blocks(model)
    first = blocks[0]
    hc_fn, hc_params = _module_fn(first.hc_attn)
    add("mHC weights (incl. Sinkhorn)", 2 * n_layers, hc_fn, [hc_params, streams])
    pre, post, comb = first.hc_attn(streams)
    add("mHC collapse", 2 * n_layers, mhc.collapse, [streams, pre])
    add("mHC update", 2 * n_layers, mhc.update, [streams, comb, post, normed])
    by_kind = collections.Counter(cfg.layer_kind(x) for x in cfg.layer_ratios)
    for kind in ("sliding", "csa", "hca"):
        if by_kind[kind]:
            block = next(bl for bl in blocks if bl.attn.kind == kind)
            fn, params = _module_fn(block.attn)
            add(f"attention {kind}", by_kind[kind],
                lambda p, x, tok, sg, ps, fn=fn: fn(p, x, attention.Context(tok, sg, ps, True, True)),
                [params, normed], [tokens, seg, pos])
    _moe_rows(blocks, cfg, normed, add)
    mask = loss.token_mask(seg)

    def head_loss(hh, norm, head, x):
        hidden = nnx.merge(*hh)(x)
        hidden = layers_lib.rms_norm(hidden, norm, cfg.rms_norm_eps)
        return loss.chunked_cross_entropy(hidden, head, tokens, mask, chunk_size=bench_shapes.bench_settings()
                                          .loss_chunk, impl=bench_shapes.bench_settings().loss_impl)

    hh_graph, hh_params = nnx.split(model.hc_head)
    add("head + loss (hc_head, norm, chunked CE)", 1,
        lambda p, norm, head, x: head_loss((hh_graph, p), norm, head, x),
        [hh_params, model.norm.scale[...], model.head[...], streams])
    rows.append(_optimizer_row(model, calls))
    print(f"  {rows[-1].name}: {rows[-1].fwd_bwd_s * 1e3:.1f} ms", flush=True)
    return rows


def _blocks(model: DeepseekV4) -> list:
    """The prefix blocks, then the blocks of the first scanned unit (their weights stand for every repeat)."""
    blocks = list(model.prefix)
    if model.repeats:
        graphdef, state = nnx.split(model.stack)
        unit = nnx.merge(graphdef, jax.tree.map(lambda a: a[0], state))
        blocks += list(unit.blocks)
    return blocks


def _moe_rows(blocks, cfg, normed, add) -> None:
    """Router, routed experts (dispatch + expert FFN + combine), the expert FFN alone (x 0: inside the routed
    row), the shared expert."""
    n_layers = cfg.num_hidden_layers
    n_hash = min(cfg.num_hash_layers, n_layers)
    learned = next(bl.ffn for bl in blocks if not bl.ffn.hash_layer) if n_layers > n_hash else blocks[0].ffn
    flat = normed.reshape(-1, cfg.hidden_size)
    e, k = cfg.n_routed_experts, cfg.num_experts_per_tok
    add("MoE router (learned)", n_layers - n_hash,
        lambda g, bias: moe.route(flat, g, bias, None, k, cfg.routed_scaling_factor)[2],
        [learned.gate[...]], [learned.router_bias[...]])
    _, idx, weights = moe.route(flat, learned.gate[...], learned.router_bias[...], None, k,
                                cfg.routed_scaling_factor)
    ex = learned.experts
    w = [ex.w1[...], ex.w3[...], ex.w2[...]]
    mask = jnp.ones((flat.shape[0],), bool)
    add(f"MoE routed experts (moe_impl={cfg.moe_impl})", n_layers,
        lambda x, wt, w1, w3, w2: moe.routed_experts(x, idx, wt, w1, w3, w2, mask, cfg)[0], [flat, weights] + w)
    cap = expert_parallel.capacity(flat.shape[0], e, k, None)
    buf = jax.random.normal(jax.random.key(2), (e, cap, cfg.hidden_size), flat.dtype)
    add(f"  of which expert FFN alone ([E, C={cap}, D] buffers, 1 round)", 0,
        lambda xe, w1, w3, w2: expert_parallel.expert_ffn(xe, w1, w3, w2, cfg.swiglu_limit), [buf] + w)
    if cfg.n_shared_experts:
        sh = learned.shared
        add("MoE shared expert", n_layers,
            lambda x, w1, w3, w2: moe.swiglu(x, w1, w3, w2, cfg.swiglu_limit),
            [flat, sh.w1[...], sh.w3[...], sh.w2[...]])


def _optimizer_row(model: DeepseekV4, calls: int) -> Row:
    """AdamW + global-norm clipping on the full parameter tree (gradients = random-free ones)."""
    tx = train.make_optimizer(bench_shapes.bench_settings())
    params = nnx.state(model, nnx.Param)
    opt_state = tx.init(params)
    grads = jax.tree.map(lambda p: jnp.full_like(p, 1e-3), params)

    def update(g, o, p):
        u, o = tx.update(g, o, p)
        return o, jax.tree.map(jnp.add, p, u)

    # The state is donated and carried from call to call, as in the train step.
    compiled = jax.jit(update, donate_argnums=(1, 2)).lower(grads, opt_state, params).compile()
    box = [opt_state, params]

    def call():
        box[:] = compiled(grads, *box)
        return box

    times = timing.time_calls(call, repeats=calls)  # after one untimed call
    return Row("optimizer (AdamW + clip)", 1, 0.0, times.median_s, _flops(compiled))


def table(rows: list[Row], step_s: float | None) -> str:
    """The markdown table of `rows` plus the sum and, when measured, the whole step."""
    out = ["| component | x | fwd ms | fwd+bwd ms | fwd+bwd GFLOP | GFLOP/s | total ms (x * fwd+bwd) | share |",
           "|---|---|---|---|---|---|---|---|"]
    total = sum(r.count * r.fwd_bwd_s for r in rows)
    ref = step_s or total
    for r in rows:
        rate = r.flops / r.fwd_bwd_s / 1e9 if r.fwd_bwd_s > 0 else 0.0
        tot = r.count * r.fwd_bwd_s
        out.append(f"| {r.name} | {r.count} | {r.fwd_s * 1e3:.1f} | {r.fwd_bwd_s * 1e3:.1f} | {r.flops / 1e9:.2f} | "
                   f"{rate:.1f} | {tot * 1e3:.1f} | {100 * tot / ref:.0f}% |")
    flops = sum(r.count * r.flops for r in rows)
    out.append(f"| sum of rows | | | | {flops / 1e9:.1f} | {flops / total / 1e9:.1f} | {total * 1e3:.1f} | "
               f"{100 * total / ref:.0f}% |")
    if step_s:
        out.append(f"| measured whole train step | | | | | | {step_s * 1e3:.1f} | 100% |")
    return "\n".join(out)


def _check_flags() -> None:
    if FLAGS.calls < 1 or FLAGS.steps < 0:
        raise ValueError(f"--calls must be >= 1 and --steps >= 0, got {FLAGS.calls} and {FLAGS.steps}")


def profile(cfg, b: int, t: int, name: str, calls: int, steps: int) -> bool:
    """Print the components table of `cfg` on a [b, t] batch (`calls` timed calls per component; `steps` timed
    whole train steps, 0: none) and the MFU line; False if a row's time is not finite."""
    device = jax.devices()[0]
    print(f"device: {device.device_kind}; {name} without MTP; batch {b} x {t}; moe_impl={cfg.moe_impl}, "
          f"remat_policy={cfg.remat_policy}", flush=True)
    peak = metrics.measure_matmul_peak(jnp.float32, None, seconds=1.0)
    print(f"measured f32 matmul peak: {peak / 1e9:.1f} GFLOP/s", flush=True)
    model = DeepseekV4(cfg, rngs=nnx.Rngs(0))
    rows = components(model, cfg, b, t, calls)
    step_s = None
    if steps:
        batch = bench_shapes.random_batch(cfg, b, t)
        step = bench_shapes.bench_train_step(cfg, batch, 1, steps)
        step_s = step["median_s"]
        print(f"  whole train step: {step_s * 1e3:.0f} ms (compile + first {step['compile_s']:.1f} s)", flush=True)
    print(table(rows, step_s))
    model_flops = metrics.train_flops_per_token(cfg, t) * b * t
    print(f"model FLOPs per step (6 N + attention): {model_flops / 1e9:.1f} GFLOP"
          + (f"; MFU {100 * model_flops / step_s / peak:.1f}% of the measured peak" if step_s else ""))
    return bool(np.isfinite(sum(r.fwd_bwd_s for r in rows)))


def main(argv: list[str]) -> None:
    cfg, b, t, name = bench_shapes.step_shape_from_command_line(argv, check=_check_flags)
    if not profile(cfg, b, t, name, FLAGS.calls, FLAGS.steps):
        sys.exit(1)


if __name__ == "__main__":
    define_flags()
    app.run(main)
