"""Parameter counts of a config, from abstract shapes only (nothing is allocated).

    python -m tools.model_stats --config=flash [--json]

total_params: every trainable parameter of the main model (MTP excluded); total_params_with_mtp: including the
MTP module(s); active_params: parameters touched per token (the routed experts not selected are skipped; the
embedding lookup is excluded, the LM head included), DeepSeek's convention.
"""

from __future__ import annotations

import json
import math
import sys

import jax
from absl import app, flags
from flax import nnx

from deepseek_v4 import DeepseekV4, get_config
from deepseek_v4.config import Config

FLAGS = flags.FLAGS


def _define_flags() -> None:
    # Defined only when run as a program, so importing model_stats() never claims global flag names.
    flags.DEFINE_string("config", "flash", "Preset name (flash, pro, tiny, nano).")
    flags.DEFINE_bool("json", False, "Print one JSON object instead of a table.")


def param_counts(cfg: Config) -> dict[str, int]:
    """Parameter counts by group, computed with nnx.eval_shape."""
    abstract = nnx.eval_shape(lambda: DeepseekV4(cfg, rngs=nnx.Rngs(0)))
    params = nnx.state(abstract, nnx.Param)
    counts = {"embed": 0, "routed_experts": 0, "mtp": 0, "other": 0}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        keys = [str(getattr(k, "key", getattr(k, "idx", k))) for k in path]
        n = math.prod(leaf.shape)
        if keys[0] == "mtp":
            counts["mtp"] += n
        elif keys[0] == "embed":
            counts["embed"] += n
        elif "experts" in keys:
            counts["routed_experts"] += n
        else:
            counts["other"] += n
    return counts


def model_stats(cfg: Config) -> dict[str, int]:
    c = param_counts(cfg)
    total = c["embed"] + c["routed_experts"] + c["other"]
    active = c["other"] + c["routed_experts"] * cfg.num_experts_per_tok // cfg.n_routed_experts
    return {"total_params": total, "total_params_with_mtp": total + c["mtp"], "active_params": active}


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    try:
        cfg = get_config(FLAGS.config)
    except ValueError as e:
        sys.exit(f"error: {e}")
    stats = model_stats(cfg)
    if FLAGS.json:
        print(json.dumps(stats))
        return
    for k, v in stats.items():
        print(f"{k:>24}: {v:>18,d}  ({v / 1e9:,.2f} B)")


if __name__ == "__main__":
    _define_flags()
    app.run(main)
