"""Time the routed-expert dispatch with each local expert FFN: padded batched einsum vs grouped expert matmul.

    python -m tools.bench_moe_dispatch [--mesh=expert=4] [--tokens=2048] [--json]

Runs `sharding.expert_parallel.routed_experts` forward + backward (gradients w.r.t. tokens, gates and the three
expert weights) on random top-k routing, once with `local_ffn="padded"` and once with `local_ffn="grouped"`, on
the given mesh (default: the host's devices split over "expert") or none (`--mesh=`). Default shapes are the
"mid" benchmark's MoE: hidden 512, 32 experts of width 512, top-4, 2048 tokens. On CPU the grouped path runs
`jax.lax.ragged_dot`, on GPU/TPU the Pallas grouped kernel. Prints the median seconds per call of each and their
ratio.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from sharding import expert_parallel
from sharding import mesh as mesh_lib
from tools import timing


FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command line's flags, defined only when this module runs as the program (absl flags are
    process-global, and other programs and the tests import this module)."""
    flags.DEFINE_string("mesh", None, "mesh spec, e.g. expert=4 or data=2,expert=4; '' = no mesh "
                        "(default: every device on 'expert')")
    flags.DEFINE_integer("tokens", 2048, "tokens routed")
    flags.DEFINE_integer("d", 512, "hidden size")
    flags.DEFINE_integer("f", 512, "expert hidden size")
    flags.DEFINE_integer("experts", 32, "routed experts")
    flags.DEFINE_integer("topk", 4, "experts per token")
    flags.DEFINE_integer("iters", 3, "timed calls per case (median reported)")
    flags.DEFINE_bool("json", False, "print the results as JSON")


def inputs(t: int, d: int, f: int, e: int, k: int, dtype=jnp.float32):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(t, d)), dtype)
    idx = jnp.asarray(np.argsort(rng.normal(size=(t, e)), axis=1)[:, :k], jnp.int32)
    gate = jnp.asarray(rng.uniform(size=(t, k)), jnp.float32)
    w1, w3 = (jnp.asarray(0.05 * rng.normal(size=(e, d, f)), dtype) for _ in range(2))
    w2 = jnp.asarray(0.05 * rng.normal(size=(e, f, d)), dtype)
    return x, idx, gate, w1, w3, w2


def step_fn(mesh, local_ffn: str):
    """jit(value_and_grad) of sum(routed_experts(...)**2) w.r.t. x, gate, w1, w3, w2."""
    def loss(x, gate, w1, w3, w2, idx):
        y, _ = expert_parallel.routed_experts(x, idx, gate, w1, w3, w2, swiglu_limit=10.0, mesh=mesh,
                                              local_ffn=local_ffn)
        return jnp.sum(jnp.square(y.astype(jnp.float32)))

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4)))


def compare(mesh, t: int, d: int, f: int, e: int, k: int, iters: int, dtype=jnp.float32) -> dict:
    """Median seconds per forward + backward of each local FFN, and grouped / padded."""
    x, idx, gate, w1, w3, w2 = inputs(t, d, f, e, k, dtype)
    out = {"tokens": t, "d": d, "f": f, "experts": e, "topk": k, "dtype": jnp.dtype(dtype).name,
           "mesh": None if mesh is None else dict(mesh.shape), "backend": jax.default_backend()}
    for local_ffn in ("padded", "grouped"):
        fn = step_fn(mesh, local_ffn)
        out[f"{local_ffn}_s"] = timing.time_calls(lambda: fn(x, gate, w1, w3, w2, idx), iters).median_s
    out["grouped_over_padded"] = out["grouped_s"] / out["padded_s"]
    return out


def main(argv):
    del argv
    spec = FLAGS.mesh if FLAGS.mesh is not None else f"expert={jax.device_count()}"
    mesh = mesh_lib.make_mesh(spec) if spec else None
    res = compare(mesh, FLAGS.tokens, FLAGS.d, FLAGS.f, FLAGS.experts, FLAGS.topk, FLAGS.iters)
    if FLAGS.json:
        print(json.dumps(res))
    else:
        print(f"mesh {res['mesh']}, {res['tokens']} tokens x top-{res['topk']} of {res['experts']} experts "
              f"(d={res['d']}, f={res['f']}), fwd+bwd: padded {res['padded_s'] * 1e3:.1f} ms, grouped "
              f"{res['grouped_s'] * 1e3:.1f} ms, grouped/padded {res['grouped_over_padded']:.2f}")


if __name__ == "__main__":
    define_flags()
    app.run(main)
