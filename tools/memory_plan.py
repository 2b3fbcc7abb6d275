"""Per-device memory of a training run, and how many chips of which kind a preset needs.

    python -m tools.memory_plan --config=flash --mesh=fsdp=32,expert=64 --batch_size=2048 --seq_len=4096
    python -m tools.memory_plan --config=pro --recommend --seq_len=4096

The model, run and training flags are those of `experiments.pretrain` (`--config` and every Config field,
`--mesh --batch_size --seq_len --optimizer --loss_chunk --loss_impl`), with a large run's defaults: flash,
4096-token sequences, and --batch_size unset = one sequence per data shard.

The computation lives in `deepseek_v4.memory` (its docstring lists the terms); every training run uses it to check
that it fits before compiling.

`--recommend` assumes one sequence of `--seq_len` tokens per data shard and microbatch (a larger global batch uses
gradient accumulation, which does not change the peak) and searches power-of-two chip counts; for each it tries
meshes (fsdp, expert, context, tensor): no tensor parallelism if possible, then the least context parallelism
(long sequences need it), then the most expert parallelism that fits
(expert weights stay put, tokens travel by all-to-all; the dense weights are FSDP-sharded over the rest).
"""

from __future__ import annotations

import math
import sys

from absl import app, flags

from deepseek_v4 import train
from deepseek_v4 import memory
from deepseek_v4.memory import CHIPS, format_plan, model_variables, plan, recommend, state_bytes  # noqa: F401
from experiments import flags as config_flags
from experiments.run import RunSettings
from sharding import mesh as mesh_lib

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command line's flags, defined only when this module runs as the program (absl flags are
    process-global, and other programs and the tests import this module)."""
    config_flags.define_config_flags(default_preset="flash")
    config_flags.define_settings_flags(RunSettings, names=("mesh", "batch_size", "seq_len"),
                                       defaults={"batch_size": None, "seq_len": 4096})
    config_flags.define_settings_flags(train.TrainSettings, names=("optimizer", "loss_chunk", "loss_impl"))
    flags.adopt_module_key_flags(config_flags)  # --help lists them
    flags.DEFINE_integer("devices", None, "Device count (needed when --mesh has a -1; default: the mesh's product).")
    flags.DEFINE_float("capacity_factor", None, "MoE capacity factor (unset: dropless).")
    flags.DEFINE_bool("recommend", False, "Find the fewest chips of each kind and a mesh for --config.")
    flags.DEFINE_bool("long_context_table", False, "Print the README's table: flash and pro at 4K to 1M tokens per "
                      "sequence on H200 and TPU v5p (chips, mesh, per-device bytes, activation share).")


def main(argv):
    if len(argv) > 1:
        sys.exit(f"error: unexpected arguments: {' '.join(argv[1:])}")
    try:
        cfg = config_flags.config_from_flags()
        variables = model_variables(cfg)
        kwargs = dict(optimizer=FLAGS.optimizer, capacity_factor=FLAGS.capacity_factor, loss_chunk=FLAGS.loss_chunk,
                      loss_impl=FLAGS.loss_impl, variables=variables)
        n_params = sum(math.prod(v.shape) for v in variables if v.trainable)
        print(f"{FLAGS.config}: {n_params:,} parameters ({cfg.param_dtype}), compute {cfg.dtype}, remat "
              f"{cfg.remat_policy}, optimizer {FLAGS.optimizer}, MoE "
              f"{'dropless' if FLAGS.capacity_factor is None else f'capacity factor {FLAGS.capacity_factor}'}")
        if FLAGS.long_context_table:
            print(memory.long_context_table(optimizer=FLAGS.optimizer, capacity_factor=FLAGS.capacity_factor,
                                            loss_chunk=FLAGS.loss_chunk, loss_impl=FLAGS.loss_impl))
            return
        if FLAGS.recommend:
            for chip in CHIPS:
                p = recommend(cfg, chip, FLAGS.seq_len, **kwargs)
                if p is None:
                    print(f"{chip.name}: does not fit on up to 65536 chips")
                    continue
                print(f"{chip.name}: {math.prod(p.sizes.values())} chips, --mesh="
                      f"{','.join(f'{k}={v}' for k, v in p.sizes.items() if v > 1)}")
                print(format_plan(p))
            return
        if not FLAGS.mesh and FLAGS.devices is None:
            sys.exit("error: give --mesh (and --devices if it has a -1), or --recommend")
        spec = FLAGS.mesh or "data=-1"
        devices = FLAGS.devices
        if devices is None:
            if "-1" in spec:
                sys.exit("error: --mesh has a -1: give --devices")
            devices = _product(spec)
        sizes = mesh_lib.parse_mesh(spec, devices)
        batch = FLAGS.batch_size or sizes["data"] * sizes["fsdp"] * sizes["expert"]
        print(format_plan(plan(cfg, sizes, batch, FLAGS.seq_len, **kwargs)))
    except ValueError as e:
        sys.exit(f"error: {e}")


def _product(spec: str) -> int:
    total = 1
    for part in spec.split(","):
        _, _, value = part.partition("=")
        try:
            total *= int(value)
        except ValueError:
            raise ValueError(f"mesh entry {part!r} is not name=size") from None
    return total


if __name__ == "__main__":
    define_flags()
    app.run(main)
