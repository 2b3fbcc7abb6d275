"""Sharding: the mesh (`mesh`), the logical-axis table (`rules`) and expert parallelism (`expert_parallel`).

Typical use in a trainer:

    sharding.init_distributed(coordinator_address, num_processes, process_id)   # before touching devices
    mesh = sharding.make_mesh("data=2,expert=4")
    model = sharding.shard_model(lambda: DeepseekV4(cfg, rngs=nnx.Rngs(0)), mesh)
    sharding.print_summary(model, mesh)
    with jax.set_mesh(mesh):
        ...  # jit the train step; the model calls rules.constrain and expert_parallel.routed_experts
"""

from sharding import expert_parallel, mesh, rules
from sharding.expert_parallel import routed_experts
from sharding.mesh import AXES, init_distributed, make_mesh, parse_mesh
from sharding.rules import constrain, named_sharding, param_shardings, print_summary, shard_model, spec, summary

__all__ = [
    "AXES", "constrain", "expert_parallel", "init_distributed", "make_mesh", "mesh", "named_sharding",
    "param_shardings", "parse_mesh", "print_summary", "routed_experts", "rules", "shard_model", "spec", "summary",
]
