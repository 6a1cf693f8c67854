"""vllm-coco: find COCO self-debiasing neurons, edit them, serve the edited models with vLLM.

The pipeline, one module per step:
    data.py      BBQ / JSONL contrast pairs, seeded splits
    models.py    model directories: loading, fingerprints, q/k/v neuron layout, demo model
    capture.py   per-neuron intensities, streamed to an on-disk float16 matrix
    scoring.py   the COCO InfoNCE score (and its label-permutation null)
    selection.py top-ratio / threshold selection, RAND / NORM / MACT baselines, edit weights
    artifact.py  neurons.json + neurons.safetensors
    identify.py  the `coco-tools identify` job
    report.py    where the selected neurons sit (table + heatmap)

This module imports nothing heavy: vLLM's plugin loader imports the package in every process.
"""

__version__ = "0.1.0"
METHOD_VERSION = "coco-v1"
