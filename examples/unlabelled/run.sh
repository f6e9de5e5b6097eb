#!/usr/bin/env bash
# Distil a student from a teacher cached over a folder of unlabelled images, end to end (run from the repository
# root; docs/pools.md). The labelled set is the digits benchmark's first 500 images; the
# unlabelled folder is 5000 more images of the same kind, written without labels.
#   bash examples/unlabelled/run.sh           # about 15 minutes on 2 CPU cores
set -euo pipefail
BIN=${BIN:-.venv/bin}
OUT=${OUT:-demo_out/unlabelled}
PLAN=${PLAN:-examples/unlabelled/plan.yaml}
TEACHER=${TEACHER:-mtpd/demo/teachers/strong.pt}
# 1. a labelled set, and a folder of unlabelled images (the digits generator's pool; its labels are withheld)
"$BIN/mtpd-data" digits --out "$OUT/digits" --train "${TRAIN:-500}" --val "${VAL:-400}" --pool "${POOL:-5000}" --quiet
# 2. the folder as an image list: a COCO file with no annotations
"$BIN/mtpd-data" pool --images "$OUT/digits/images/pool" --out "$OUT/frames.json" \
    --categories-from "$OUT/digits/annotations/instances_train.json" --quiet
# 3. the teacher cached once over each set, into the catalog the plan's stages look in
for set in "$OUT/digits/annotations/instances_train.json:$OUT/digits/images/train" "$OUT/frames.json:$OUT/digits/images/pool"; do
  "$BIN/mtpd-cache" build --teacher retinanet_tiny_wide --weights "$TEACHER" --ann "${set%%:*}" --images "${set#*:}" \
      --views orig,hflip --short 128 --long 128 --outputs fpn,cls --precision small --root "$OUT/cache" --workers 0 \
      --no-progress
done
# 4. the plan: the pool alone first (features and class scores), then the labelled set
"$BIN/mtpd-train" --plan "$PLAN" --stage all --overwrite
# 5. the student on the labelled val set
"$BIN/mtpd-eval" --checkpoint "$OUT/runs/stage_2/final.pt" --ann "$OUT/digits/annotations/instances_val.json" \
    --images "$OUT/digits/images/val" --short 128 --long 128
