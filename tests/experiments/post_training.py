"""The model the post-training entry-point tests share (test_sft.py, test_distill.py, test_grpo.py), and its
untrained source checkpoints.

One structure for all of them (two tiny layers: a hash-routed CSA layer, a learned-routed HCA layer and the
sliding-window MTP layer; the real vocabulary, which chat prompts need): a cold test session compiles the program
that creates the source state once, whichever of the files runs first.
"""

import dataclasses
import os

import jax
import jax.numpy as jnp
from flax import nnx

from deepseek_v4 import DeepseekV4, get_config, train
from deepseek_v4 import checkpoint as ckpt_lib
from sharding import mesh as mesh_lib

CFG = get_config("tiny", num_hidden_layers=2, compress_ratios=(4, 16, 0), num_hash_layers=1)


def write_untrained_runs(cfg, step: int, path: str, negated_path: str | None = None):
    """Write one untrained checkpoint of `cfg` (AdamW state, seeded 1, saved at `step`) into the run directory
    `path`, and optionally the same state with its weights negated into `negated_path` (one state built and
    compiled, not two). Returns the state's params on the host."""
    settings = train.TrainSettings(optimizer="adamw")
    mesh = mesh_lib.make_mesh("data=1", jax.devices()[:1])

    def build():
        return DeepseekV4(cfg, rngs=nnx.Rngs(1))

    with jax.set_mesh(mesh):
        plan = train.plan_state(build, settings, mesh)
        _, state = train.create_state(build, plan.tx, 1, plan.shardings, graphdef=plan.graphdef)
    runs = [(path, state)]
    if negated_path is not None:
        runs.append((negated_path, dataclasses.replace(state, params=jax.tree.map(jnp.negative, state.params))))
    for directory, s in runs:
        ckpt = ckpt_lib.Checkpointer(os.path.join(directory, "checkpoints"), async_save=False)
        ckpt.save(step, s, config=cfg, meta={"settings": settings.to_dict()})
        ckpt.close()
    return jax.device_get(state.params)
