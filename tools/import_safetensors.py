r"""Import official or exported DeepSeek-V4 safetensors as a step-0 training checkpoint.

    python -m tools.import_safetensors --hf_dir=export/tiny --workdir=runs/tiny_ft [--mesh=data=2,expert=4]

Reads `config.json` and the `.safetensors` files of --hf_dir in any of the three formats (bf16; fp8 with
`.scale` siblings; fp4 experts as packed int8 + scales), checks every name and shape against the config
(missing and unexpected tensors are listed in one error), dequantises, and writes
`<workdir>/checkpoints/0/` in the layout of `experiments.pretrain`: the model variables sharded for --mesh,
a fresh optimizer state (--optimizer), step 0, no data-iterator state (the run starts its data from the
beginning). It prints the `experiments.pretrain` command that resumes from it.

The model comes from config.json. Config fields that config.json cannot carry (compute dtype, remat policy,
MoE implementation, ...) come from --config=PRESET (default nano, i.e. the Config defaults); any Config field
flag (the same flags as experiments.pretrain, e.g. --param_dtype=bfloat16) overrides both.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
from absl import app, flags
from absl import logging as absl_logging
from flax import nnx
from tqdm import tqdm

from deepseek_v4 import DeepseekV4, train
from deepseek_v4 import checkpoint as ckpt_lib
from deepseek_v4.config import PRESETS, Config
from experiments import flags as config_flags
from experiments import init_weights
from experiments.init_weights import read_config
from sharding import mesh as mesh_lib

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command-line flags (defined only when run as a program, so tests can import this module)."""
    flags.DEFINE_string("hf_dir", None, "Directory with config.json and *.safetensors.")
    flags.DEFINE_string("workdir", None, "Run directory to create (must hold no checkpoints).")
    flags.DEFINE_string("mesh", "", "Device mesh, e.g. data=2,expert=4 (default: data over all devices).")
    flags.DEFINE_enum("optimizer", "muon", ["muon", "adamw"],
                      "Optimizer whose fresh state is written (the --optimizer the pretrain run will use).")
    flags.DEFINE_integer("seed", 0, "The run's base RNG seed (the --seed the pretrain run will use).")
    config_flags.define_config_flags()
    flags.DEFINE_bool("progress", True, "Show a progress bar.")
    flags.mark_flags_as_required(["hf_dir", "workdir"])


def _flag_value(v: Any) -> str:
    if isinstance(v, (list, tuple)):
        return ",".join(str(x) for x in v)
    return str(v).lower() if isinstance(v, bool) else str(v)


def resume_command(cfg: Config, preset: str, workdir: str, optimizer: str, seed: int) -> str:
    """The `experiments.pretrain` command line whose Config equals `cfg`: `preset` plus the differing fields."""
    mine = cfg.to_dict()
    base = PRESETS[preset].to_dict()
    parts = ["python -m experiments.pretrain", f"--workdir={workdir}", f"--config={preset}"]
    parts += [f"--{k}={_flag_value(v)}" for k, v in mine.items() if base[k] != v]
    if optimizer != "muon":
        parts.append(f"--optimizer={optimizer}")
    if seed:
        parts.append(f"--seed={seed}")
    return " ".join(parts)


def import_run(hf_dir: str, workdir: str, *, preset: str = "nano", mesh: str = "",
               devices: Sequence[jax.Device] | None = None, optimizer: str = "muon", seed: int = 0,
               progress: bool = True, **config_overrides: Any) -> dict[str, Any]:
    """Write `<workdir>/checkpoints/0` from the files of `hf_dir`; returns a summary (config, seconds, command).

    The Config is `read_config(hf_dir, preset, **config_overrides)`; `mesh` is a --mesh string over `devices`
    (default: all devices).

    Raises:
      ValueError: bad directories, files that do not match the config, a bad mesh, existing checkpoints.
    """
    if not os.path.isdir(hf_dir):
        raise ValueError(f"--hf_dir={hf_dir} is not a directory")
    workdir = os.path.abspath(workdir)
    ckpt_dir = os.path.join(workdir, "checkpoints")
    if os.path.isdir(ckpt_dir) and os.listdir(ckpt_dir):
        raise ValueError(f"{ckpt_dir} is not empty; import into a new --workdir")
    cfg = read_config(hf_dir, preset, **config_overrides)
    device_mesh = mesh_lib.make_mesh(mesh or None, devices)
    settings = train.TrainSettings(optimizer=optimizer)
    t0 = time.perf_counter()
    with jax.set_mesh(device_mesh):
        # The state a fresh pretraining run with these settings plans, so its structure is exactly what it restores.
        plan = train.plan_state(lambda: DeepseekV4(cfg, rngs=nnx.Rngs(seed)), settings, device_mesh)
        total = sum(p.size for p in jax.tree.leaves((plan.abstract.params, plan.abstract.extras)))
        bar = tqdm(total=total, unit="param", unit_scale=True, desc="import", disable=not progress, file=sys.stderr)
        state = init_weights.load_from_hf(plan, hf_dir, cfg, seed, progress=bar.update)
        bar.close()
    ckpt = ckpt_lib.Checkpointer(ckpt_dir, async_save=False)
    try:
        ckpt.save(0, state, config=cfg, meta={"imported_from": os.path.abspath(hf_dir), "mesh": dict(device_mesh.shape),
                                              "settings": {"optimizer": optimizer, "seed": seed}})
    finally:
        ckpt.close()
    tmp = os.path.join(workdir, "config.json.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(cfg.to_dict(), f, indent=2, sort_keys=True)
    os.replace(tmp, os.path.join(workdir, "config.json"))
    return {"config": cfg, "parameters": total, "seconds": time.perf_counter() - t0,
            "command": resume_command(cfg, preset, workdir, optimizer, seed)}


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if not FLAGS["verbosity"].present:  # Orbax logs every save at INFO
        absl_logging.set_verbosity(absl_logging.WARNING)
    try:
        s = import_run(FLAGS.hf_dir, FLAGS.workdir, preset=FLAGS.config, mesh=FLAGS.mesh, optimizer=FLAGS.optimizer,
                       seed=FLAGS.seed, progress=FLAGS.progress, **config_flags.config_overrides())
    except (ValueError, OSError) as e:
        sys.exit(f"import_safetensors: error: {e}")
    except KeyboardInterrupt:
        sys.exit("import_safetensors: interrupted; no checkpoint was completed")
    print(f"imported {s['parameters']:,} values into {os.path.abspath(FLAGS.workdir)}/checkpoints/0 "
          f"in {s['seconds']:.1f} s\nresume with:\n  {s['command']}")


if __name__ == "__main__":
    define_flags()
    app.run(main)
