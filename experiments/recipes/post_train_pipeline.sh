#!/usr/bin/env bash
# V4's post-training pipeline, CPU-sized: a pretrained nano checkpoint -> two specialists (SFT + GRPO, one per
# verifiable task) -> one student consolidated from both by on-policy distillation -> every model evaluated on
# every task -> the student exported as safetensors.
#
#   bash experiments/recipes/post_train_pipeline.sh              # everything under runs/post_train
#   SKIP_GRPO=1 bash experiments/recipes/post_train_pipeline.sh  # SFT-only specialists
#
# Stages (each is one ordinary command; re-running the script resumes every run from its newest checkpoint and
# skips the finished ones):
#   1. pretrain     experiments.pretrain, nano config, $PRE_STEPS steps
#   2. chat sets    tools.make_chat_data: arithmetic-only, string-only and mixed non-think dialogues
#   3. specialists  per task: experiments.sft on that task's set, then experiments.grpo on that task
#                   (SKIP_GRPO=1: the SFT run is the specialist)
#   4. student      experiments.sft on the mixed set (the student's starting point), then experiments.distill
#                   from both specialists, weights 0.5 / 0.5, prompts from both tasks
#   5. evaluation   tools.eval_tasks for each model on each task (greedy, non-think): one JSON line each,
#                   collected in $OUT/eval.jsonl
#   6. export       tools.export_safetensors of the student (bf16)
# Sizes are environment variables (defaults below: minutes of CPU per run, far too short to teach nano the tasks;
# the measured accuracies and time are in experiments/LOG.md, "post-train pipeline"); OUT chooses the directory.
set -euo pipefail
cd "$(dirname "$0")/../.."

OUT=${OUT:-runs/post_train}
PY=${PYTHON:-python}
PRE_STEPS=${PRE_STEPS:-40}
SFT_STEPS=${SFT_STEPS:-40}
SFT_BATCH=${SFT_BATCH:-4}
GRPO_STEPS=${GRPO_STEPS:-20}
DISTILL_STEPS=${DISTILL_STEPS:-10}
DISTILL_BATCH=${DISTILL_BATCH:-4}
EVAL_N=${EVAL_N:-20}
SKIP_GRPO=${SKIP_GRPO:-0}
QUIET=(--progress=false --noplot --notensorboard)
TASKS=(arithmetic string)
mkdir -p "$OUT"

# 1. the pretrained nano checkpoint
$PY -m experiments.pretrain --config=nano --steps="$PRE_STEPS" --workdir="$OUT/pretrained" "${QUIET[@]}"

# 2. chat sets (non-think: short dialogues, the mode the evaluation asks in)
for task in "${TASKS[@]}"; do
  $PY -m tools.make_chat_data --output="$OUT/chat_$task.jsonl" --examples=2000 --tasks="$task" --modes=non-think
done
$PY -m tools.make_chat_data --output="$OUT/chat_mixed.jsonl" --examples=2000 --modes=non-think

# 3. one specialist per task
SFT=(--optimizer=adamw --learning_rate=1e-3 --schedule=constant --warmup_steps=5 --batch_size="$SFT_BATCH" --seq_len=128
     --steps="$SFT_STEPS" --save_every=20 --log_every=10 "${QUIET[@]}")
SPECIALISTS=()
for task in "${TASKS[@]}"; do
  $PY -m experiments.sft --init="$OUT/pretrained" --data="$OUT/chat_$task.jsonl" --workdir="$OUT/sft_$task" "${SFT[@]}"
  if [ "$SKIP_GRPO" = 1 ]; then
    SPECIALISTS+=("$OUT/sft_$task")
  else
    $PY -m experiments.grpo --init="$OUT/sft_$task" --task="$task" --workdir="$OUT/grpo_$task" \
      --steps="$GRPO_STEPS" --mode=non-think
    SPECIALISTS+=("$OUT/grpo_$task")
  fi
done

# 4. the student: SFT on both tasks, then on-policy distillation from both specialists
$PY -m experiments.sft --init="$OUT/pretrained" --data="$OUT/chat_mixed.jsonl" --workdir="$OUT/sft_mixed" "${SFT[@]}"
$PY -m experiments.distill --init="$OUT/sft_mixed" --teachers="$(IFS=,; echo "${SPECIALISTS[*]}")" \
  --weights=0.5,0.5 --tasks=arithmetic,string --modes=non-think --max_new_tokens=24 \
  --optimizer=adamw --learning_rate=3e-4 --schedule=constant --warmup_steps=0 --batch_size="$DISTILL_BATCH" --seq_len=64 \
  --steps="$DISTILL_STEPS" --save_every=5 --log_every=1 --workdir="$OUT/student" "${QUIET[@]}"

# 5. every model on every task
: > "$OUT/eval.jsonl"
for model in "${SPECIALISTS[@]}" "$OUT/sft_mixed" "$OUT/student"; do
  for task in "${TASKS[@]}"; do
    $PY -m tools.eval_tasks --init="$model" --task="$task" --n="$EVAL_N" | tee -a "$OUT/eval.jsonl"
  done
done

# 6. export the student
$PY -m tools.export_safetensors --workdir="$OUT/student" --out="$OUT/student_export" --format=bf16 --overwrite \
  --noprogress
