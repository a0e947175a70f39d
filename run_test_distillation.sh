#!/usr/bin/env bash
# PepEmb distill, end to end: download -> (W&B set-up) -> distil -> evaluate -> visualize.
#
#   bash run_test_distillation.sh                      # ProtBert if reachable, else the offline preset
#   TEACHER=antiberty bash run_test_distillation.sh    # the offline preset straight away
#
# Settings (environment variables; defaults in brackets):
#   TEACHER        teacher model: Hub id, local folder or 'antiberty' [Rostlab/prot_bert]. When it cannot
#                  be loaded here (no Hub access, not cached), the offline preset runs instead:
#                  AntiBERTy (its weights ship in the antiberty==0.1.3 wheel) on the shipped antibodies.
#   NUM_SEQUENCES  sequences to download and split 80/10/10 [1000]
#   OUTPUT_DIR     everything goes under here: data/, checkpoints/, evaluation/, visualizations/ [outputs/test_run]
#   DEVICE         auto | cpu | cuda | mps [auto]
#   USE_WANDB      1 to set up W&B (setup_wandb.py) and log the run [0]
#   MAX_STEPS      optimizer steps [offline preset: 300; ProtBert: 300 on a GPU, 20 on a CPU]
#   D_MODEL NUM_HEADS NUM_LAYERS   student size [128 4 4]
#   BATCH_SIZE     sequences per batch [32]
#   MAX_SEQ_LEN    tokens per sequence incl. start/end [offline preset: 160; ProtBert: 256]
#   LEARNING_RATE  peak learning rate [2e-3]
#   USE_8BIT       1 for an 8-bit teacher (int8 on CPU, bitsandbytes on CUDA) [1 on CPU, else 0]
#   MASK_VARIANTS  teacher-logit cache: the first K epochs run the teacher, later ones read its
#                  stored logits (OUTPUT_DIR/teacher_cache, rebuilt each run); 0 disables [4]
#   SEQUENCE       protein to visualize [the first test-split sequence]
#   PYTHON         interpreter [the repo's .venv/bin/python if present, else python3]
#   EXTRA_DISTILL_ARGS  more distill.py flags, e.g. "--hidden_weight 0.1" []
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$REPO/.venv/bin/python" ]]; then PYTHON="$REPO/.venv/bin/python"; else PYTHON=python3; fi
fi
TEACHER="${TEACHER:-Rostlab/prot_bert}"
NUM_SEQUENCES="${NUM_SEQUENCES:-1000}"
OUTPUT_DIR="${OUTPUT_DIR:-outputs/test_run}"
DEVICE="${DEVICE:-auto}"
USE_WANDB="${USE_WANDB:-0}"
D_MODEL="${D_MODEL:-128}"
NUM_HEADS="${NUM_HEADS:-4}"
NUM_LAYERS="${NUM_LAYERS:-4}"
BATCH_SIZE="${BATCH_SIZE:-32}"
LEARNING_RATE="${LEARNING_RATE:-2e-3}"
mkdir -p "$OUTPUT_DIR"
OUTPUT_DIR="$(cd "$OUTPUT_DIR" && pwd)"  # absolute: the stages run from the repo root
cd "$REPO"
START=$SECONDS

banner() { printf '\n==== %s\n' "$*"; }

if [[ "$DEVICE" == auto ]]; then
  DEVICE="$("$PYTHON" -c 'from pepemb import devices; print(devices.resolve_device("auto").type)')"
fi

banner "Teacher: checking that $TEACHER can be loaded"
if reason="$("$PYTHON" -m pepemb.teacher --check "$TEACHER")"; then
  PRESET=online
else
  banner "OFFLINE PRESET: $reason. Running the AntiBERTy teacher (bundled in the antiberty wheel) on the shipped antibody sample instead."
  TEACHER=antiberty
  PRESET=offline
fi
[[ "$TEACHER" == antiberty ]] && PRESET=offline
if [[ "$PRESET" == offline ]]; then
  MAX_STEPS="${MAX_STEPS:-300}"; MAX_SEQ_LEN="${MAX_SEQ_LEN:-160}"
  DOWNLOAD_ARGS=(--offline --preset antibody)
else
  if [[ "$DEVICE" == cpu ]]; then
    MAX_STEPS="${MAX_STEPS:-20}"
    echo "note: a ProtBert-sized teacher runs about 60 tokens/s on a 2-core CPU; this test run does $MAX_STEPS steps."
    echo "      Use a GPU, or TEACHER=antiberty, for a useful student."
  else
    MAX_STEPS="${MAX_STEPS:-300}"
  fi
  MAX_SEQ_LEN="${MAX_SEQ_LEN:-256}"
  DOWNLOAD_ARGS=()
fi
if [[ -z "${USE_8BIT:-}" ]]; then [[ "$DEVICE" == cpu ]] && USE_8BIT=1 || USE_8BIT=0; fi
EIGHT_BIT=(); [[ "$USE_8BIT" == 1 ]] && EIGHT_BIT=(--use_8bit)
echo "teacher $TEACHER | device $DEVICE | $MAX_STEPS steps | student d_model $D_MODEL, $NUM_HEADS heads, $NUM_LAYERS layers"

banner "1/5 Data -> $OUTPUT_DIR/data"
"$PYTHON" download_sample_data.py --output_dir "$OUTPUT_DIR/data" --num_sequences "$NUM_SEQUENCES" \
  ${DOWNLOAD_ARGS[@]+"${DOWNLOAD_ARGS[@]}"}

WANDB_ARGS=()
if [[ "$USE_WANDB" == 1 ]]; then
  banner "2/5 Weights & Biases"
  if "$PYTHON" setup_wandb.py; then
    WANDB_ARGS=(--use_wandb --wandb_run_name "test-run-$TEACHER")
  else
    echo "W&B set-up failed (see above): continuing without W&B"
  fi
else
  banner "2/5 Weights & Biases: skipped (USE_WANDB=1 to enable)"
fi

banner "3/5 Distillation -> $OUTPUT_DIR/checkpoints"
CACHE_ARGS=()
rm -rf "$OUTPUT_DIR/teacher_cache"
if [[ "${MASK_VARIANTS:-4}" != 0 ]]; then
  CACHE_ARGS=(--teacher_cache "$OUTPUT_DIR/teacher_cache" --mask_variants "${MASK_VARIANTS:-4}")
fi
# shellcheck disable=SC2086  # EXTRA_DISTILL_ARGS is a list of flags
"$PYTHON" distill.py --data_path "$OUTPUT_DIR/data" --output_dir "$OUTPUT_DIR/checkpoints" --overwrite \
  --teacher_model "$TEACHER" --device "$DEVICE" ${EIGHT_BIT[@]+"${EIGHT_BIT[@]}"} \
  --d_model "$D_MODEL" --num_heads "$NUM_HEADS" --num_layers "$NUM_LAYERS" \
  --batch_size "$BATCH_SIZE" --max_seq_len "$MAX_SEQ_LEN" --learning_rate "$LEARNING_RATE" \
  --max_steps "$MAX_STEPS" --num_epochs 1000 --warmup_steps $((MAX_STEPS / 10)) \
  --eval_every $(((MAX_STEPS + 3) / 4)) --save_every "$MAX_STEPS" --log_every 5 \
  ${CACHE_ARGS[@]+"${CACHE_ARGS[@]}"} ${WANDB_ARGS[@]+"${WANDB_ARGS[@]}"} ${EXTRA_DISTILL_ARGS:-}

banner "4/5 Evaluation on the test split -> $OUTPUT_DIR/evaluation"
"$PYTHON" evaluate.py --model_path "$OUTPUT_DIR/checkpoints/best_model" --data_path "$OUTPUT_DIR/data/test.fasta" \
  --output_dir "$OUTPUT_DIR/evaluation" --teacher_model "$TEACHER" --device "$DEVICE" \
  ${EIGHT_BIT[@]+"${EIGHT_BIT[@]}"}

banner "5/5 Visualization -> $OUTPUT_DIR/visualizations"
if [[ -z "${SEQUENCE:-}" ]]; then
  SEQUENCE="$(sed -n 2p "$OUTPUT_DIR/data/test.fasta" | cut -c1-120)"
fi
"$PYTHON" visualization.py --model_path "$OUTPUT_DIR/checkpoints/best_model/model.pt" --sequence "$SEQUENCE" \
  --output_dir "$OUTPUT_DIR/visualizations" --device "$DEVICE" --max_positions 40 \
  --sanity_check --faithfulness

banner "Summary ($(( (SECONDS - START) / 60 )) min $(( (SECONDS - START) % 60 )) s)"
"$PYTHON" - "$OUTPUT_DIR" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
report = json.loads((out / "evaluation" / "report.json").read_text())
m = report["metrics"]
print(f"teacher: {report['setup']['teacher']}   student: {report['parameters']['student']:,} parameters")
print(f"masked accuracy on the test split: student {m['student']['masked_acc']:.3f}, "
      f"teacher {m['teacher']['masked_acc']:.3f}, "
      f"residue-frequency baseline {m['baseline']['masked_acc']:.3f} (always '{m['baseline']['residue']}')")
print(f"agreement with the teacher {m['agreement']:.3f}, student perplexity {m['student']['perplexity']:.2f}")
fidelity = report.get("fidelity") or {}
if "mutation_effects" in fidelity:
    mut = fidelity["mutation_effects"]
    print(f"mutation effects, Spearman with the teacher: student {mut['student']['spearman']:.3f} "
          f"(within a position {mut['student']['spearman_within_position_mean']:.3f}), "
          f"residue-frequency baseline {mut['baseline']['spearman']:.3f}")
if "representations" in fidelity:
    reps = fidelity["representations"]
    print(f"representations: CKA {reps['cka']:.3f}, {reps['knn_k']}-NN overlap {reps['knn_overlap']:.3f} "
          f"(chance {reps['knn_chance']:.3f})")
for name, path in [("data split", "data"), ("best student", "checkpoints/best_model/model.pt"),
                   ("training curves", "checkpoints/training_curves.png"),
                   ("evaluation report", "evaluation/report.md"), ("figures", "visualizations")]:
    print(f"{name:>18}: {out / path}")
EOF
