"""Benchmark shapes shared by `tools.bench_train` and `tools.profile_step`: `--shape` presets, the start of both
programs (`step_shape_from_command_line`) and the timed whole train step (`bench_train_step`, timed by
`timed_steps`, which `tools.bench_train` also uses for transformers' step).

A shape is a config preset plus field overrides plus a batch (rows x tokens). Explicit config flags and
`--batch_size` / `--seq_len` override the shape; `--config` names the base preset when no `--shape` is given.

  nano: the nano preset, batch 4 x 256 (embedding/head-bound: the real vocabulary dominates).
  mid:  a V4-shaped model whose trunk carries the FLOPs (D 512, 8 layers of every kind, 32 experts top-4),
        batch 4 x 512.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from absl import logging as absl_logging
from flax import nnx

from deepseek_v4 import DeepseekV4
from deepseek_v4 import config as config_lib
from deepseek_v4 import train
from experiments import flags as config_flags
from tools import timing

SHAPES: dict[str, tuple[str, dict, int, int]] = {
    "nano": ("nano", {}, 4, 256),
    "mid": ("nano", dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, head_dim=128,
                         qk_rope_head_dim=32, q_lora_rank=256, o_groups=4, o_lora_rank=256,
                         compress_ratios=(0, 0, 4, 128, 4, 128, 4, 128, 0), csa_ratio=4, hca_ratio=128,
                         sliding_window=128, index_n_heads=8, index_head_dim=64, index_topk=128,
                         n_routed_experts=32, num_experts_per_tok=4, moe_intermediate_size=512, num_hash_layers=2,
                         max_position_embeddings=4096, original_max_position_embeddings=1024,
                         rope_scaling_factor=4.0), 4, 512),
}

LR = 1e-4


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """`--shape`, `--batch_size`, `--seq_len` and the config flags (`--config` plus one per field)."""
    config_flags.define_config_flags(flag_values)
    flags.DEFINE_enum("shape", None, list(SHAPES), "Benchmark shape (config + batch); default: --config with "
                      "batch 4 x 256. Explicit config and batch flags override it.", flag_values=flag_values)
    flags.DEFINE_integer("batch_size", None, "Rows per step (default: the shape's, else 4).", flag_values=flag_values)
    flags.DEFINE_integer("seq_len", None, "Tokens per row (default: the shape's, else 256).", flag_values=flag_values)


def config_and_batch(flag_values: flags.FlagValues = flags.FLAGS) -> tuple[config_lib.Config, int, int, str]:
    """(config, batch rows, tokens per row, a name) from the flags; MTP is dropped unless `mtp` says otherwise.

    Raises:
      ValueError: a bad value, or both --shape and --config given.
    """
    shape = flag_values["shape"].value
    overrides = config_flags.config_overrides(flag_values)
    if shape is not None:
        if flag_values[config_flags.CONFIG_FLAG].present:
            raise ValueError("give --shape or --config, not both (field flags override a shape)")
        base, shape_overrides, b, t = SHAPES[shape]
        cfg = config_lib.get_config(base, **{**shape_overrides, **overrides})
        name = f"shape {shape}"
    else:
        cfg = config_flags.config_from_flags(flag_values)
        b, t = 4, 256
        name = f"config {flag_values[config_flags.CONFIG_FLAG].value}"
    b = flag_values["batch_size"].value or b
    t = flag_values["seq_len"].value or t
    if b < 1 or t < 1:
        raise ValueError(f"--batch_size and --seq_len must be >= 1, got {b} and {t}")
    keep_mtp = "mtp" in flag_values and flag_values["mtp"].value
    if not keep_mtp and cfg.num_nextn_predict_layers:
        cfg = cfg.replace(num_nextn_predict_layers=0, compress_ratios=cfg.layer_ratios)
    return cfg, b, t, name


def step_shape_from_command_line(argv: list[str], check: Callable[[], None] | None = None,
                                 ) -> tuple[config_lib.Config, int, int, str]:
    """The start of a step benchmark: (config, batch rows, tokens per row, a name) from the flags.

    Positional arguments are refused, absl logs warnings only, and `check()` (the program's own flag checks) runs
    after `config_and_batch`; a ValueError from either ends the program with a one-line error and exit status 2.
    """
    if len(argv) > 1:
        print(f"error: unexpected arguments: {' '.join(argv[1:])}", file=sys.stderr)
        sys.exit(2)
    absl_logging.set_verbosity(absl_logging.WARNING)
    try:
        shape = config_and_batch()
        if check is not None:
            check()
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    return shape


def random_batch(cfg: config_lib.Config, b: int, t: int, seed: int = 0) -> dict[str, np.ndarray]:
    """One unpacked batch of random tokens: tokens, targets (shifted), segment_ids (all 1), positions."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(2, cfg.vocab_size, (b, t + 1)).astype(np.int32)
    return {"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": np.ones((b, t), np.int32),
            "positions": np.tile(np.arange(t, dtype=np.int32), (b, 1))}


def bench_settings() -> train.TrainSettings:
    """AdamW at a constant LR with global-norm clipping: the step transformers' side also runs."""
    return train.TrainSettings(steps=1000, warmup_steps=0, learning_rate=LR, optimizer="adamw",
                               schedule="constant", weight_decay=0.0, clip_norm=1.0)


def bench_train_step(cfg: config_lib.Config, batch, warmup: int, steps: int) -> dict:
    """Our jitted train step (fwd + bwd + AdamW + clip) of a new model (seed 0) on `batch`, `warmup` calls (the
    first compiles) then `steps` timed ones: median seconds, times, first-call seconds, first loss."""
    model = DeepseekV4(cfg, rngs=nnx.Rngs(0))
    s = bench_settings()
    tx = train.make_optimizer(s)
    graphdef, state = train.init_state(model, tx, seed=0)
    fn = train.make_train_step(graphdef, cfg, tx, s, phase="sparse")
    batch = jax.tree.map(jnp.asarray, batch)
    box = {"state": state, "loss": []}

    def step():
        box["state"], m = fn(box["state"], batch)
        box["loss"].append(float(m["loss"]))  # float() waits for the step

    return timed_steps(step, warmup, steps) | {"first_loss": box["loss"][0]}


def timed_steps(step: Callable[[], object], warmup: int, steps: int) -> dict:
    """Time `step()`: its first call alone (compilation, when it compiles), `warmup - 1` more untimed calls, then
    `steps` timed ones: {"median_s", "times" (each timed call), "compile_s" (the first call)}."""
    first = timing.time_calls(step, repeats=1, warmup=0)
    timed = timing.time_calls(step, repeats=steps, warmup=max(warmup - 1, 0))
    return {"median_s": timed.median_s, "times": list(timed.wall_s), "compile_s": first.wall_s[0]}
