"""Training recipes as data: a table per preset (LR schedule, batch ramp, sequence-length stages, attention phase,
loss weights), resolved into optimizer steps for one run.

A `Recipe` lists `Stage`s keyed on tokens consumed: a stage ends once the run has consumed `until` tokens. Each stage
fixes the row length, the tokens per step (the batch in sequences is `batch_tokens / seq_len`) and the attention
phase of the CSA layers (dense, the indexer warm-up, sparse). `resolve` turns the table into a `Schedule`: the first
step and the step count of every stage, and the `TrainSettings` fields of the whole run (total steps, warm-up, the
decay start, where sparse attention begins). The LR schedule runs over optimizer steps; stage boundaries and the
decay start are placed at the step where the token count reaches them.

Flags given on the command line replace recipe fields and are reported (`Schedule.overrides`); a flag that the
stages fix (`steps`, `seq_len`, `batch_size`, `sparse_attention_after`) may only repeat the stages' own value.
Numbers DeepSeek did not publish are chosen here and say so (`source`); see docs/training.md.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

ATTENTION_PHASES = ("dense", "indexer_warmup", "sparse")
PAPER = "V4 paper"


@dataclasses.dataclass(frozen=True)
class Stage:
    """One row of a recipe: train until `until` tokens consumed (counted from the start of the run)."""

    name: str
    until: int  # tokens consumed at the end of the stage
    seq_len: int
    batch_tokens: int  # tokens per optimizer step (a multiple of seq_len)
    attention: str  # one of ATTENTION_PHASES
    source: str  # where the stage's numbers come from ("V4 paper", or "chosen: why")

    @property
    def batch_size(self) -> int:
        return self.batch_tokens // self.seq_len


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A pretraining recipe: the model preset it is written for, the optimization, and the stages."""

    name: str
    preset: str
    learning_rate: float
    final_lr_fraction: float
    warmup_steps: int
    decay_tokens: int  # the LR decays (half-cosine, `wsd`) over the last decay_tokens tokens
    mtp_weight: float
    mtp_weight_after_decay: float
    bias_speed: float
    balance_weight: float
    stages: tuple[Stage, ...]
    sources: dict[str, str]  # field -> where its value comes from

    @property
    def tokens(self) -> int:
        return self.stages[-1].until


def _t(x: float) -> int:
    return int(round(x * 1e12))


def _b(x: float) -> int:
    return int(round(x * 1e9))


_RAMP = "chosen: V4 does not publish the ramp's shape; V3 ramped over its first 469B tokens"
_SPLIT = "chosen: the split of the dense phase between 4K and 16K is not published"
_WARMUP = "chosen: the warm-up's length is not published (V3.2: 1000 steps)"
_LONG = "chosen: the share of 64K and 1M is not published"


def _v4_stages(seq_batch: int, dense_until: int, total: int, warmup_tokens: int, ramp: tuple[int, int]) -> tuple:
    """The V4 stage table for a final batch of `seq_batch` 4K sequences (tokens per step are kept across stages)."""
    bt = seq_batch * 4096
    return (
        Stage("ramp 1/4", ramp[0], 4096, bt // 4, "dense", _RAMP),
        Stage("ramp 1/2", ramp[1], 4096, bt // 2, "dense", _RAMP),
        Stage("4K", dense_until * 3 // 4, 4096, bt, "dense", _SPLIT),
        Stage("16K", dense_until, 16384, bt, "dense", _SPLIT),
        Stage("64K warm-up", dense_until + warmup_tokens, 65536, bt, "indexer_warmup", _WARMUP),
        Stage("64K", total - _t(1), 65536, bt, "sparse", _LONG),
        Stage("1M", total, 1048576, bt, "sparse", _LONG),
    )


_PUBLISHED = {k: PAPER for k in ("learning_rate", "final_lr_fraction", "warmup_steps", "mtp_weight",
                                 "mtp_weight_after_decay", "bias_speed", "balance_weight")}
_DECAY = "chosen: V4 decays 'near the end' by cosine; the length is not published (10% of the tokens here)"

FLASH = Recipe(
    name="flash", preset="flash", learning_rate=2.7e-4, final_lr_fraction=0.1, warmup_steps=2000,
    decay_tokens=_t(3.2), mtp_weight=0.3, mtp_weight_after_decay=0.1, bias_speed=1e-3, balance_weight=1e-4,
    # 18,432 x 4096 = 75.5M tokens per step (paper); 32T tokens (paper); dense for the first 1T (paper).
    stages=_v4_stages(18432, _t(1), _t(32), 1000 * 18432 * 4096, (_b(160), _b(480))),
    sources={**_PUBLISHED, "decay_tokens": _DECAY},
)

PRO = Recipe(
    name="pro", preset="pro", learning_rate=2.0e-4, final_lr_fraction=0.1, warmup_steps=2000,
    decay_tokens=_t(3.3), mtp_weight=0.3, mtp_weight_after_decay=0.1, bias_speed=1e-3, balance_weight=1e-4,
    # 23,040 x 4096 = 94.4M tokens per step (paper); 33T tokens (paper); a longer dense phase than Flash (paper:
    # not how long; 2T chosen).
    stages=_v4_stages(23040, _t(2), _t(33), 1000 * 23040 * 4096, (_b(160), _b(480))),
    sources={**_PUBLISHED, "decay_tokens": _DECAY},
)

_NANO = "chosen: V4's stages scaled to the nano preset on the embedded corpus"
NANO = Recipe(
    name="nano", preset="nano", learning_rate=3e-3, final_lr_fraction=0.1, warmup_steps=4,
    decay_tokens=10240, mtp_weight=0.3, mtp_weight_after_decay=0.1, bias_speed=1e-3, balance_weight=1e-4,
    stages=(
        Stage("ramp", 4096, 128, 512, "dense", _NANO),
        Stage("128", 16384, 128, 1024, "dense", _NANO),
        Stage("256", 24576, 256, 1024, "dense", _NANO),
        Stage("512 warm-up", 26624, 512, 1024, "indexer_warmup", _NANO),
        Stage("512", 40960, 512, 1024, "sparse", _NANO),
        Stage("1K", 49152, 1024, 1024, "sparse", _NANO),
    ),
    sources={"learning_rate": "chosen: the nano run's peak", "warmup_steps": "chosen",
             "decay_tokens": "chosen: the last ~20% of the tokens", **{k: PAPER for k in (
                 "final_lr_fraction", "mtp_weight", "mtp_weight_after_decay", "bias_speed", "balance_weight")}},
)

RECIPES: dict[str, Recipe] = {"nano": NANO, "flash": FLASH, "pro": PRO}


def get_recipe(name: str) -> Recipe:
    """The recipe `name`. Raises a one-line ValueError for an unknown name."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; choose one of {', '.join(RECIPES)}")
    return RECIPES[name]


def validate_recipe(r: Recipe) -> None:
    """Raise a one-line ValueError for a table that cannot run (stages out of order, phases going back, ...)."""
    if not r.stages:
        raise ValueError(f"recipe {r.name}: no stages")
    previous, phase = 0, 0
    for s in r.stages:
        where = f"recipe {r.name}, stage {s.name!r}"
        if s.until <= previous:
            raise ValueError(f"{where}: stages out of order (ends at {s.until:,} tokens, not after {previous:,})")
        if s.seq_len < 1 or s.batch_tokens < s.seq_len or s.batch_tokens % s.seq_len:
            raise ValueError(f"{where}: batch_tokens {s.batch_tokens} is not a positive multiple of seq_len "
                             f"{s.seq_len}")
        if s.attention not in ATTENTION_PHASES:
            raise ValueError(f"{where}: attention {s.attention!r} is not one of {', '.join(ATTENTION_PHASES)}")
        if ATTENTION_PHASES.index(s.attention) < phase:
            raise ValueError(f"{where}: attention goes back to {s.attention!r} (the order is "
                             f"{' -> '.join(ATTENTION_PHASES)})")
        previous, phase = s.until, ATTENTION_PHASES.index(s.attention)
    if not 0 < r.decay_tokens < r.tokens:
        raise ValueError(f"recipe {r.name}: decay_tokens {r.decay_tokens:,} must be in (0, {r.tokens:,})")


# ---- resolution -----------------------------------------------------------------------------------------

# TrainSettings fields a recipe sets (an explicit flag replaces them, reported) and fields its stages fix (an explicit
# flag must repeat the stages' value). RunSettings' seq_len and batch_size are fixed by the stages too.
RECIPE_FIELDS = ("learning_rate", "final_lr_fraction", "warmup_steps", "schedule", "decay_fraction", "mtp_weight",
                 "mtp_weight_after_decay", "bias_speed", "balance_weight")
STAGE_FIELDS = ("steps", "sparse_attention_after", "indexer_warmup_steps", "seq_len", "batch_size")


@dataclasses.dataclass(frozen=True)
class ResolvedStage:
    """A stage in steps. `grad_accum` None: chosen by the run from its memory plan."""

    index: int
    name: str
    seq_len: int
    batch_size: int  # sequences per step
    attention: str
    first_step: int
    steps: int
    first_token: int
    source: str
    grad_accum: int | None = None

    @property
    def end_step(self) -> int:
        return self.first_step + self.steps

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len

    @property
    def end_token(self) -> int:
        return self.first_token + self.steps * self.tokens_per_step


@dataclasses.dataclass(frozen=True)
class Schedule:
    """A recipe resolved for one run: stages in steps, the run's TrainSettings fields, and the overrides applied."""

    recipe: str
    preset: str
    stages: tuple[ResolvedStage, ...]
    settings: dict[str, Any]  # TrainSettings fields
    overrides: dict[str, tuple[Any, Any]]  # flag -> (recipe value, given value)
    sources: dict[str, str]

    @property
    def steps(self) -> int:
        return self.stages[-1].end_step

    def stage_at(self, step: int) -> ResolvedStage:
        """The stage that takes step `step` (0-based; a finished run's last step belongs to the last stage)."""
        for s in self.stages:
            if step < s.end_step:
                return s
        return self.stages[-1]

    def tokens_at(self, step: int) -> int:
        """Tokens consumed after `step` steps."""
        s = self.stage_at(max(step - 1, 0))
        return s.first_token + (step - s.first_step) * s.tokens_per_step

    def with_grad_accum(self, values: list[int]) -> Schedule:
        return dataclasses.replace(self, stages=tuple(dataclasses.replace(s, grad_accum=a)
                                                      for s, a in zip(self.stages, values)))

    def to_dict(self) -> dict[str, Any]:
        return {"recipe": self.recipe, "preset": self.preset, "settings": self.settings,
                "stages": [dataclasses.asdict(s) for s in self.stages],
                "overrides": {k: list(v) for k, v in self.overrides.items()}}

    def table(self) -> str:
        """The resolved schedule as one table (printed at the start of a run)."""
        st = self.settings
        decay_step = self.steps - round(st["decay_fraction"] * self.steps) if st["schedule"] == "wsd" else None
        lines = [f"recipe {self.recipe} (preset {self.preset}): {self.steps:,} steps, "
                 f"{_fmt_tokens(self.stages[-1].end_token)} tokens",
                 f"  {'stage':<12} {'tokens':>17} {'seq_len':>8} {'seqs/step':>9} {'tokens/step':>11} "
                 f"{'steps':>19} {'accum':>5}  {'attention':<14} source"]
        for s in self.stages:
            accum = "auto" if s.grad_accum is None else str(s.grad_accum)
            span = f"{_fmt_tokens(s.first_token)}-{_fmt_tokens(s.end_token)}"
            steps = f"{s.first_step:,}-{s.end_step - 1:,}"
            lines.append(f"  {s.name:<12} {span:>17} {s.seq_len:>8,} {s.batch_size:>9,} "
                         f"{_fmt_tokens(s.tokens_per_step):>11} {steps:>19} {accum:>5}  {s.attention:<14} {s.source}")
        src = self.sources
        lines.append(f"  lr {st['learning_rate']:.3g} -> {st['learning_rate'] * st['final_lr_fraction']:.3g}, "
                     f"{st['schedule']}, warmup {st['warmup_steps']} steps"
                     + (f", decay from step {decay_step:,}" if decay_step is not None else "")
                     + f" [{src.get('learning_rate', '')}; decay: {src.get('decay_tokens', '')}]")
        lines.append(f"  mtp weight {st['mtp_weight']} -> {st['mtp_weight_after_decay']} at the decay, bias speed "
                     f"{st['bias_speed']}, balance weight {st['balance_weight']} [{src.get('bias_speed', '')}]")
        if self.overrides:
            lines.append("  overridden by flags: " + ", ".join(f"--{k}={g} (recipe {r})"
                                                               for k, (r, g) in self.overrides.items()))
        return "\n".join(lines)


def _fmt_tokens(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.4g}{unit}"
    return str(int(n))


def _attention_settings(stages: tuple[ResolvedStage, ...], total: int) -> dict[str, Any]:
    """The TrainSettings fields of the attention phases: the one place they are derived from the stages.

    Sparse attention starts at the first `sparse` stage; the `indexer_warmup` stages (the order of
    `ATTENTION_PHASES` puts them right before it) are the trainer's indexer warm-up: dense attention, only the
    indexers train (`train.csa_phase`), the main optimizer and its LR schedule paused.
    """
    sparse = [s.first_step for s in stages if s.attention == "sparse"]
    return {"sparse_attention_after": sparse[0] if sparse else total,
            "indexer_warmup_steps": sum(s.steps for s in stages if s.attention == "indexer_warmup")}


def resolve(r: Recipe, given: dict[str, Any] | None = None) -> Schedule:
    """The recipe in steps, with the flags in `given` (name -> value, only flags on the command line) applied.

    Raises:
      ValueError: a one-line message for a bad table or a flag that contradicts a stage.
    """
    validate_recipe(r)
    given = dict(given or {})
    stages, step, consumed = [], 0, 0
    for i, s in enumerate(r.stages):
        n = max(1, math.ceil((s.until - consumed) / s.batch_tokens))
        stages.append(ResolvedStage(index=i, name=s.name, seq_len=s.seq_len, batch_size=s.batch_size,
                                    attention=s.attention, first_step=step, steps=n, first_token=consumed,
                                    source=s.source))
        step, consumed = step + n, consumed + n * s.batch_tokens
    if "grad_accum" in given:  # one explicit value for every stage; otherwise the run picks per stage
        stages = [dataclasses.replace(s, grad_accum=given["grad_accum"]) for s in stages]
    stages = tuple(stages)
    total = step
    decay_from = r.tokens - r.decay_tokens
    decay_start = next((s.first_step + max(0, math.ceil((decay_from - s.first_token) / s.tokens_per_step))
                        for s in stages if s.end_token > decay_from), total - 1)
    decay_steps = max(1, total - decay_start)
    attention = _attention_settings(stages, total)
    main_steps = total - attention["indexer_warmup_steps"]  # the main optimizer pauses during the warm-up
    settings = {"steps": total, "learning_rate": r.learning_rate, "final_lr_fraction": r.final_lr_fraction,
                "warmup_steps": r.warmup_steps, "schedule": "wsd", "decay_fraction": decay_steps / main_steps,
                "mtp_weight": r.mtp_weight, "mtp_weight_after_decay": r.mtp_weight_after_decay,
                "bias_speed": r.bias_speed, "balance_weight": r.balance_weight, **attention}
    if r.warmup_steps + decay_steps > main_steps:
        raise ValueError(f"recipe {r.name}: warmup_steps ({r.warmup_steps}) + decay steps ({decay_steps}) exceed "
                         f"the {main_steps} main-optimizer steps of its stages")
    fixed = {"steps": [total], "sparse_attention_after": [settings["sparse_attention_after"]],
             "indexer_warmup_steps": [settings["indexer_warmup_steps"]],
             "seq_len": sorted({s.seq_len for s in stages}), "batch_size": sorted({s.batch_size for s in stages})}
    for name in STAGE_FIELDS:
        if name in given and [given[name]] != fixed[name]:
            values = ", ".join(str(v) for v in fixed[name])
            raise ValueError(f"--{name}={given[name]} contradicts --recipe={r.name}, whose stages give {name} "
                             f"{values}: drop the flag or edit the recipe's stages")
    overrides = {}
    for name in RECIPE_FIELDS:
        if name in given and given[name] != settings[name]:
            overrides[name] = (settings[name], given[name])
            settings[name] = given[name]
    return Schedule(recipe=r.name, preset=r.preset, stages=stages, settings=settings, overrides=overrides,
                    sources=dict(r.sources))
