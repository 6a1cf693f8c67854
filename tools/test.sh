#!/usr/bin/env bash
# The README's test command: set up .venv (idempotent) and run every test, slow end-to-end ones included.
#   tools/test.sh                 all tests
#   tools/test.sh -m "not slow"   the fast ones only (any pytest arguments pass through)
# Two pytest workers (pytest-xdist; COCO_TEST_WORKERS=0 runs in one process): much of a slow test is
# single-threaded (imports, model loading, engine start-up, graph compilation), so two of them overlap
# on two cores. A module stays on one worker (--dist loadfile: its module fixtures are built once), the
# slowest modules start first (tests/conftest.HEAVY_FIRST), and the session's demo models and served
# directories are built once per run (tests/conftest.run_once).
set -euo pipefail
cd "$(dirname "$0")/.."
tools/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
workers=${COCO_TEST_WORKERS:-2}
parallel=()
[ "$workers" = 0 ] || parallel=(-n "$workers" --dist loadfile --no-loadscope-reorder)
exec .venv/bin/python -m pytest -p no:cacheprovider "${parallel[@]}" "$@"
