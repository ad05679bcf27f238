#!/usr/bin/env bash
# A whole LLDif-tiny pipeline of docs/experiments.md, section 4: LA-CLIP -> stage 1 -> stage 2 with `lldif train`.
# Research tooling, not part of the library.
#
#   docs/experiments/pipeline.sh NAME FACES LACLIP_EPOCHS S1_EPOCHS S2_EPOCHS [--seed N] [--set FIELD=VALUE ...]
#
# trains on synthetic:FACES (tested on synthetic:350) into runs/exp/NAME/{la-clip,stage1,stage2}, with the
# output of all three runs in runs/exp/NAME/log (which ends in "done" when all three finished). The model
# overrides (--set) go to the LA-CLIP run, whose config the later stages inherit; --seed N (or SEED=N in the
# environment; default 0) goes to all three runs.
#
# LANDMARKS=dlib68 (default): dlib's 68 points found in the darkened faces, cached in runs/exp/landmarks (shared by
# every pipeline: the landmark files are named by the faces, their darkening and the detector).
# LANDMARKS=dataset: the generator's exact points (the oracle).
#
# Paths are relative to the repository root; the script runs from there wherever it is called from.
set -euo pipefail

if [ $# -lt 5 ]; then
    echo "usage: $0 NAME FACES LACLIP_EPOCHS S1_EPOCHS S2_EPOCHS [--seed N] [--set FIELD=VALUE ...]" >&2
    exit 2
fi
cd "$(dirname "$0")/../.."

name=$1 faces=$2 laclip_epochs=$3 stage1_epochs=$4 stage2_epochs=$5
shift 5
seed=${SEED:-0}
overrides=()
while [ $# -gt 0 ]; do
    if [ "$1" = "--seed" ]; then
        seed=${2:?--seed needs a value}
        shift 2
    else
        overrides+=("$1")
        shift
    fi
done

landmarks=${LANDMARKS:-dlib68}
common=(--data "synthetic:$faces" --test-data synthetic:350 --config tiny --batch-size 16 --lr 3e-4 --lr-gamma 0.95
        --weight-decay 0 --warmup-epochs 0 --workers 0 --quiet --seed "$seed" --landmarks "$landmarks")
if [ "$landmarks" != dataset ]; then
    common+=(--landmark-cache runs/exp/landmarks)
fi

out=runs/exp/$name
mkdir -p "$out"
.venv/bin/lldif train --stage la-clip --epochs "$laclip_epochs" "${common[@]}" --out "$out/la-clip" \
    "${overrides[@]}" > "$out/log" 2>&1
.venv/bin/lldif train --stage 1 --epochs "$stage1_epochs" "${common[@]}" --init "$out/la-clip" --out "$out/stage1" \
    >> "$out/log" 2>&1
.venv/bin/lldif train --stage 2 --epochs "$stage2_epochs" "${common[@]}" --init "$out/stage1" --out "$out/stage2" \
    >> "$out/log" 2>&1
echo done >> "$out/log"
