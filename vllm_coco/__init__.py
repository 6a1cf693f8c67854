"""vllm-coco: find COCO self-debiasing neurons, edit them, serve the edited models with vLLM.

The package is laid out as the pipeline (README.md has the module map):
    core/        names and defaults, errors, number checks, output paths, model directories,
                 the neuron artifact and NE directory formats
    data/        contrast data (BBQ, JSONL pairs, splits) and the demo model
    identify/    capture -> COCO score -> selection -> artifact (and its report)
    edit/        LE-COCO / ablation / LoRA checkpoints, the NE gate and its export
    serve/       the vLLM plugin and gated models, the Hugging Face reference, batch generation
    tasks/       the lm-eval task logic, `coco-tools eval`, comparisons of runs
    experiment/  `coco-tools run`: config, stages, typed results, report
    cli.py       `coco-tools`

This module imports nothing heavy: vLLM's plugin loader imports the package in every process.
"""

__version__ = "0.1.0"
METHOD_VERSION = "coco-v1"
