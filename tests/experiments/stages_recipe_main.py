"""`python -m experiments.pretrain` with one more recipe, `stages`: the stage kinds of nano in nine short steps.

The stage-transition tests run this instead of `--recipe=nano`: the same entry point, flags and run loop, but
rows of 32 and 64 tokens and four stages (a batch ramp; a batch change; a longer row with the indexer warm-up;
sparse attention), so the run compiles four small train steps instead of six long ones.
"""

from absl import app

from deepseek_v4 import recipes

_TEST = "chosen: the smallest stages that cross every kind of boundary"
STAGES = recipes.Recipe(
    name="stages", preset="nano", learning_rate=1e-2, final_lr_fraction=0.1, warmup_steps=2,
    decay_tokens=256, mtp_weight=0.3, mtp_weight_after_decay=0.1, bias_speed=1e-3, balance_weight=1e-4,
    stages=(
        recipes.Stage("ramp", 128, 32, 64, "dense", _TEST),  # steps 0-1, 2 rows
        recipes.Stage("32", 384, 32, 128, "dense", _TEST),  # steps 2-3, 4 rows: the batch changes
        recipes.Stage("64 warm-up", 512, 64, 128, "indexer_warmup", _TEST),  # step 4: longer rows, warm-up
        recipes.Stage("64", 1024, 64, 128, "sparse", _TEST),  # steps 5-8: sparse attention
    ),
    sources={k: _TEST for k in ("learning_rate", "decay_tokens", "bias_speed")},
)

if __name__ == "__main__":
    recipes.RECIPES[STAGES.name] = STAGES  # before define_flags() defines --recipe
    from experiments import pretrain

    pretrain.define_flags()  # --recipe's help lists the recipe added above
    app.run(pretrain.main)
