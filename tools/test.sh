#!/usr/bin/env bash
# The README's test command: set up .venv (idempotent) and run every test, slow end-to-end ones included.
#   tools/test.sh                 all tests
#   tools/test.sh -m "not slow"   the fast ones only (any pytest arguments pass through)
# Two pytest workers (pytest-xdist; COCO_TEST_WORKERS=0 runs in one process): much of a slow test is
# single-threaded (imports, model loading, engine start-up, graph compilation), so two of them overlap
# on two cores. Tests sharing the session's served directories run on one worker (tests/conftest.py).
set -euo pipefail
cd "$(dirname "$0")/.."
tools/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
workers=${COCO_TEST_WORKERS:-2}
parallel=()
[ "$workers" = 0 ] || parallel=(-n "$workers" --dist loadgroup)
exec .venv/bin/python -m pytest -p no:cacheprovider "${parallel[@]}" "$@"
