"""vllm-coco: find COCO self-debiasing neurons, edit them, serve the edited models with vLLM.

The pipeline, one module per step:
    data.py          BBQ / JSONL contrast pairs, seeded identify/validate/test splits
    models.py        model directories: loading, fingerprints, q/k/v neuron layout, demo models
    capture.py       per-neuron intensities, streamed to an on-disk float16 matrix
    scoring.py       the COCO InfoNCE score (and its label-permutation null)
    selection.py     top-ratio / threshold selection, RAND / NORM / MACT baselines, edit weights
    artifact.py      neurons.json + neurons.safetensors (+ provenance checks)
    identify.py      the `coco-tools identify` / `select` jobs
    report.py        where the selected neurons sit (table + heatmap)
    bake.py          LE-COCO, ablation and LoRA export (safetensors in, safetensors out)
    gate.py          the NE-COCO gate: one function for the HF reference and vLLM
    ne.py            NE-COCO model directories
    hf_reference.py  NE-COCO in plain transformers (the oracle for vLLM)
    sharding.py      the gate under tensor parallelism
    plugin.py        vLLM entry point (tiny); vllm_models.py: the gated Llama / Mistral classes
    generate.py      batch generation with vLLM's offline engine
    evaluate.py      lm-eval runs over the task folder evals/; compare.py: tables and charts of runs
    config.py, pipeline.py  `coco-tools run`: the experiment end to end

This module imports nothing heavy: vLLM's plugin loader imports the package in every process.
"""

__version__ = "0.1.0"
METHOD_VERSION = "coco-v1"
