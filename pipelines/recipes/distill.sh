#!/usr/bin/env bash
# A real LLaVA-MoD run with lmod: teacher dump -> upcycle the dense student -> mimic -> preference
# -> eval. Every setting comes from the environment; the *.env files beside this script hold the
# full-size ones (GPU cluster), and tests/test_recipes.py runs this very script on tiny stand-ins.
#   set -a; . pipelines/recipes/qwen3_vl.env; set +a; bash pipelines/recipes/distill.sh
# Rerunning it resumes: finished teacher shards are skipped, an existing student is kept, and
# RESUME=1 continues the training stages from their last checkpoints.
set -euo pipefail
: "${TEACHER:?teacher model directory}" "${BASE:?dense student base directory}" "${RUN:?output directory}"
: "${MIMIC_DATA:?LLaVA-style conversations}" "${PREF_DATA:?preference pairs}" "${IMAGE_ROOT:?image folder}"
: "${MIMIC_CONFIG:?mimic TrainConfig YAML}" "${PREF_CONFIG:?pref TrainConfig YAML}"
LMOD=${LMOD:-lmod}
TRAIN=${TRAIN:-$LMOD}  # "torchrun --nproc_per_node 8 -m pipelines.cli" trains with DDP on 8 GPUs

$LMOD dump-teacher --model "$TEACHER" --out "$RUN/shards" \
  --mimic-data "$MIMIC_DATA" --pref-data "$PREF_DATA" --image-root "$IMAGE_ROOT" \
  --shards "${SHARDS:-512}" --top-k "${TOP_K:-64}" --backend "${BACKEND:-vllm}" --dtype "${DTYPE:-bfloat16}" \
  --max-model-len "${MAX_MODEL_LEN:-4096}" --tensor-parallel-size "${TP:-1}" ${RAY_ADDRESS:+--address "$RAY_ADDRESS"}

[ -f "$RUN/student/config.json" ] || $LMOD student upcycle --base "$BASE" --out "$RUN/student" \
  --num-experts "${EXPERTS:-4}" --top-k "${EXPERTS_PER_TOKEN:-2}" --moe-layers "${MOE_LAYERS:-every-other}"

$TRAIN train --stage mimic --dump "$RUN/shards" --student "$RUN/student" --out "$RUN/mimic" \
  --config "$MIMIC_CONFIG" --image-root "$IMAGE_ROOT" ${RESUME:+--resume}
$TRAIN train --stage pref --dump "$RUN/shards" --student "$RUN/mimic" --out "$RUN/pref" \
  --config "$PREF_CONFIG" --image-root "$IMAGE_ROOT" ${RESUME:+--resume}

[ -z "${EVAL_DATA:-}" ] || $LMOD eval --model "$RUN/pref" --data "$EVAL_DATA" --image-root "$IMAGE_ROOT" \
  --device "${EVAL_DEVICE:-auto}" --dtype "${EVAL_DTYPE:-float32}" --out "$RUN/eval.json" --overwrite
