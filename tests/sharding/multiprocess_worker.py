"""One process of a multi-process CPU run: a sharded expert-parallel forward and backward plus a psum.

Launched by `test_multiprocess.py` as N processes with 8/N CPU devices each (gloo collectives); the test runs
`compute` in its own single 8-device process and compares. Run by hand:

    python -m tests.sharding.multiprocess_worker --coordinator=localhost:12345 --num_processes=2 \
        --process_id=0 --local_devices=4 --out=/tmp/mp.npz      # and the same with --process_id=1
"""

from __future__ import annotations

import argparse
import os

MESH = "data=2,expert=4"
T, D, F, E, K = 64, 16, 8, 8, 2


def compute(mesh) -> dict:
    """Global arrays assembled from host data (each process supplies only its shards), loss, grads and a psum.

    One jitted function (the outputs are replicated, so no further compile is needed to read them back).
    Returns host numpy arrays of the full results.
    """
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from sharding import expert_parallel, rules

    rng = np.random.default_rng(7)
    host = {
        "x": rng.normal(size=(T, D)).astype(np.float32),
        "idx": np.argsort(rng.normal(size=(T, E)), axis=1)[:, :K].astype(np.int32),
        "w": rng.uniform(size=(T, K)).astype(np.float32),
        "w1": (0.3 * rng.normal(size=(E, D, F))).astype(np.float32),
        "w3": (0.3 * rng.normal(size=(E, D, F))).astype(np.float32),
        "w2": (0.3 * rng.normal(size=(E, F, D))).astype(np.float32),
        "ranks": np.arange(mesh.size, dtype=np.float32),
    }
    logical = {"x": ("batch", None), "idx": ("batch", None), "w": ("batch", None),
               "w1": ("experts", "embed", "expert_mlp"), "w3": ("experts", "embed", "expert_mlp"),
               "w2": ("experts", "expert_mlp", "embed")}
    shardings = {k: rules.named_sharding(ax, mesh, "activation" if k in ("x", "idx", "w") else "param",
                                         shape=host[k].shape) for k, ax in logical.items()}
    shardings["ranks"] = NamedSharding(mesh, P(mesh.axis_names))
    args = {k: jax.make_array_from_callback(v.shape, shardings[k], lambda i, v=v: v[i]) for k, v in host.items()}

    def loss(x, w, w1, w3, w2, idx):
        y, dropped = expert_parallel.routed_experts(x, idx, w, w1, w3, w2, swiglu_limit=1.0, mesh=mesh)
        return jnp.sum(jnp.sin(y)), (y, dropped)

    def step(a):
        (value, (y, dropped)), grads = jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4), has_aux=True)(
            a["x"], a["w"], a["w1"], a["w3"], a["w2"], a["idx"])
        psum = jax.shard_map(lambda v: jax.lax.psum(v, mesh.axis_names), mesh=mesh, in_specs=P(mesh.axis_names),
                             out_specs=P())(a["ranks"])
        out = {"loss": value, "y": y, "dropped": dropped, "psum": psum}
        out.update({f"grad_{k}": g for k, g in zip(("x", "w", "w1", "w3", "w2"), grads)})
        return out

    out = jax.jit(step, out_shardings=NamedSharding(mesh, P()))(args)
    return {k: np.asarray(v.addressable_data(0)) for k, v in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--coordinator", required=True)
    parser.add_argument("--num_processes", type=int, required=True)
    parser.add_argument("--process_id", type=int, required=True)
    parser.add_argument("--local_devices", type=int, required=True)
    parser.add_argument("--out", required=True)
    a = parser.parse_args()
    # The device count on top of the codegen flags `launch` passes (tests.conftest.CODEGEN_FLAGS).
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={a.local_devices}"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax
    import numpy as np

    from sharding import mesh as mesh_lib

    mesh_lib.init_distributed(a.coordinator, a.num_processes, a.process_id)
    assert jax.process_count() == a.num_processes and jax.local_device_count() == a.local_devices
    result = compute(mesh_lib.make_mesh(MESH))
    if jax.process_index() == 0:
        tmp = a.out + ".tmp.npz"
        np.savez(tmp, **result)
        os.replace(tmp, a.out)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()
