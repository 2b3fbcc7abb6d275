#!/usr/bin/env bash
# V4's post-training pipeline, CPU-sized: a pretrained nano checkpoint -> two specialists (SFT + GRPO, one per
# verifiable task) -> one student consolidated from both by on-policy distillation -> every model evaluated on
# every task -> the student exported as safetensors.
#
#   bash experiments/recipes/post_train_pipeline.sh              # everything under runs/post_train
#   SKIP_GRPO=1 bash experiments/recipes/post_train_pipeline.sh  # SFT-only specialists
#   TASKS="arithmetic string" ARCH="" PRE_STEPS=200 ... bash ...  # other tasks, the full nano, longer runs
#
# Stages (each is one ordinary command; re-running the script resumes every run from its newest checkpoint and
# skips the finished ones):
#   1. pretrain     experiments.pretrain, nano config with the $ARCH overrides, $PRE_STEPS steps
#   2. chat sets    tools.make_chat_data: one non-think set per task and a mixed one
#   3. specialists  per task: experiments.sft on that task's set, then experiments.grpo on that task
#                   (SKIP_GRPO=1: the SFT run is the specialist)
#   4. student      experiments.sft on the mixed set (the student's starting point), then experiments.distill
#                   from both specialists, weights 0.5 / 0.5, prompts from both tasks, each prompt scored by its
#                   own task's specialist (--teacher_tasks)
#   5. evaluation   tools.eval_tasks for each model on each task (greedy, non-think, $EVAL_N problems): one JSON
#                   line each (accuracy and its standard error), collected in $OUT/eval.jsonl
#   6. export       tools.export_safetensors of the student (bf16)
# The wall time of every stage goes to $OUT/times.txt. The defaults are sized for CPU: a two-layer nano (the real
# vocabulary: the prompts are chat tokens) and the two small tasks next_letter and larger; 70 SFT steps (about one
# pass over a task's 4,000 dialogues) make each specialist nearly exact, and GRPO's groups still carry signal. The
# student's SFT needs far more steps than a specialist's (300: at 140 it answered next_letter with a few letters
# whatever the prompt), and on-policy distillation cannot make up for a start like that: reverse KL pulls the
# student toward a token in proportion to the student's own probability of it. One measured run: 23.5 minutes on a
# quiet 2-core machine with the compilation cache warm (about an hour on a loaded one), mostly the 440 SFT steps. Distillation decays its LR (cosine to 0.1x): at a constant 1e-3 the
# KL to a teacher first fell, then rose again and the student lost next_letter problems it had solved. Measured accuracies and times: experiments/LOG.md, "post-train
# pipeline". OUT chooses the directory, PYTHON the interpreter.
set -euo pipefail
cd "$(dirname "$0")/../.."

OUT=${OUT:-runs/post_train}
PY=${PYTHON:-python}
read -r -a ARCH <<< "${ARCH---num_hidden_layers=2 --compress_ratios=0,0,0 --num_hash_layers=1}"
read -r -a TASKS <<< "${TASKS:-next_letter larger}"
PRE_STEPS=${PRE_STEPS:-10}
SFT_STEPS=${SFT_STEPS:-70}
SFT_MIXED_STEPS=${SFT_MIXED_STEPS:-300}  # the student's SFT sees both tasks; see the note above
SFT_BATCH=${SFT_BATCH:-8}
SFT_LR=${SFT_LR:-3e-3}
GRPO_STEPS=${GRPO_STEPS:-20}
GRPO_LR=${GRPO_LR:-2e-4}
DISTILL_STEPS=${DISTILL_STEPS:-200}
DISTILL_LR=${DISTILL_LR:-1e-3}
DISTILL_BATCH=${DISTILL_BATCH:-16}
MAX_NEW=${MAX_NEW:-8}
EVAL_N=${EVAL_N:-200}
SKIP_GRPO=${SKIP_GRPO:-0}
QUIET=(--progress=false --noplot --notensorboard)
mkdir -p "$OUT"

stage() {  # stage NAME COMMAND...: run it and append its wall time to $OUT/times.txt
  local name=$1 start=$SECONDS
  shift
  "$@"
  echo "$name $((SECONDS - start)) s" >> "$OUT/times.txt"
}

# 1. the pretrained nano checkpoint
stage pretrain $PY -m experiments.pretrain --config=nano "${ARCH[@]}" --steps="$PRE_STEPS" --batch_size=4 \
  --seq_len=128 --workdir="$OUT/pretrained" "${QUIET[@]}"

# 2. chat sets (non-think: short dialogues, the mode the evaluation asks in)
for task in "${TASKS[@]}"; do
  $PY -m tools.make_chat_data --output="$OUT/chat_$task.jsonl" --examples=4000 --tasks="$task" --modes=non-think
done
$PY -m tools.make_chat_data --output="$OUT/chat_mixed.jsonl" --examples=4000 --tasks="$(IFS=,; echo "${TASKS[*]}")" \
  --modes=non-think

# 3. one specialist per task
SFT=(--optimizer=adamw --learning_rate="$SFT_LR" --schedule=constant --warmup_steps=5 --batch_size="$SFT_BATCH"
     --seq_len=128 --save_every=20 --log_every=10 "${QUIET[@]}")
GRPO=(--mode=non-think --prompts_per_step=8 --group_size=8 --max_new_tokens="$MAX_NEW" --seq_len=32
      --learning_rate="$GRPO_LR" --kl_weight=0.001 --steps="$GRPO_STEPS" --save_every=20 --log_every=1
      "${QUIET[@]}")
SPECIALISTS=()
for task in "${TASKS[@]}"; do
  stage "sft_$task" $PY -m experiments.sft --init="$OUT/pretrained" --data="$OUT/chat_$task.jsonl" \
    --workdir="$OUT/sft_$task" --steps="$SFT_STEPS" "${SFT[@]}"
  if [ "$SKIP_GRPO" = 1 ]; then
    SPECIALISTS+=("$OUT/sft_$task")
  else
    stage "grpo_$task" $PY -m experiments.grpo --init="$OUT/sft_$task" --task="$task" --workdir="$OUT/grpo_$task" \
      "${GRPO[@]}"
    SPECIALISTS+=("$OUT/grpo_$task")
  fi
done

# 4. the student: SFT on both tasks, then on-policy distillation from both specialists
stage sft_mixed $PY -m experiments.sft --init="$OUT/pretrained" --data="$OUT/chat_mixed.jsonl" \
  --workdir="$OUT/sft_mixed" --steps="$SFT_MIXED_STEPS" "${SFT[@]}"
stage distill $PY -m experiments.distill --init="$OUT/sft_mixed" --teachers="$(IFS=,; echo "${SPECIALISTS[*]}")" \
  --weights=0.5,0.5 --tasks="$(IFS=,; echo "${TASKS[*]}")" --teacher_tasks="$(IFS=,; echo "${TASKS[*]}")" \
  --modes=non-think --max_new_tokens="$MAX_NEW" \
  --optimizer=adamw --learning_rate="$DISTILL_LR" --schedule=cosine --warmup_steps=0 --batch_size="$DISTILL_BATCH" \
  --seq_len=32 --steps="$DISTILL_STEPS" --save_every=50 --log_every=1 --workdir="$OUT/student" "${QUIET[@]}"

# 5. every model on every task
: > "$OUT/eval.jsonl"
for model in "${SPECIALISTS[@]}" "$OUT/sft_mixed" "$OUT/student"; do
  for task in "${TASKS[@]}"; do
    stage "eval $(basename "$model") $task" $PY -m tools.eval_tasks --init="$model" --task="$task" --n="$EVAL_N" \
      --max_new_tokens="$MAX_NEW" --batch=100 | tee -a "$OUT/eval.jsonl"
  done
done

# 6. export the student
stage export $PY -m tools.export_safetensors --workdir="$OUT/student" --out="$OUT/student_export" --format=bf16 \
  --overwrite --noprogress
