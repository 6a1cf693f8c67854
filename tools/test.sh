#!/usr/bin/env bash
# The README's test command: set up .venv (idempotent) and run every test, slow end-to-end ones included.
#   tools/test.sh                 all tests
#   tools/test.sh -m "not slow"   the fast ones only (any pytest arguments pass through)
set -euo pipefail
cd "$(dirname "$0")/.."
tools/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m pytest -p no:cacheprovider "$@"
