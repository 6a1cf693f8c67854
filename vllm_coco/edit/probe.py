"""The finite forward every edit passes before it is written (`coco-tools bake`, `coco-tools ne`):
a few tokens through the base model and each edit in one batch, on the CPU (docs/METHOD.md §6)."""

from __future__ import annotations

from pathlib import Path

import torch

from vllm_coco.core.errors import CocoError
from vllm_coco.core.models import probe_base
from vllm_coco.core.names import BASE_EDIT
from vllm_coco.edit.conditions import install

PROBE_TOKENS = 8  # the finite forward's probe: a handful of token ids spread over the vocabulary


def finite_forward(model_dir: Path, edits: dict) -> None:
    """The finite forward an edit passes before it is written: PROBE_TOKENS tokens through the base
    model and through each edit (`edits`: label -> (conditions.LinearEdit or NEEdit, fix)), one batch
    row per condition. CocoError naming the base model's weight when one is NaN or inf, the base
    model when its own logits are not finite, or else the first edit whose logits are not, with its fix."""
    model, dtype = probe_base(model_dir)  # weights checked finite, loaded once per process
    table = install(model)
    for label, (edit, _) in edits.items():
        table.add(label, edit)
    rows = [BASE_EDIT, *edits]
    vocab = int(model.get_input_embeddings().weight.shape[0])
    ids = torch.linspace(0, vocab - 1, PROBE_TOKENS).long().repeat(len(rows), 1)  # [conditions, tokens]
    with torch.no_grad(), table.rows(rows):
        logits = model(input_ids=ids).logits  # [conditions, tokens, vocab]
    finite = torch.isfinite(logits).flatten(1).all(1).tolist()  # [conditions]
    what = f"on a probe of {PROBE_TOKENS} tokens"
    if not finite[0]:
        raise CocoError(f"the base model {model_dir} gives non-finite logits {what} although its weights are finite "
                        f"(they overflow {str(dtype).removeprefix('torch.')}); the base model is broken: fix or "
                        "regenerate it")
    for ok, (label, (_, fix)) in zip(finite[1:], edits.items()):
        if not ok:
            raise CocoError(f"{label} gives non-finite logits {what} of {model_dir} (the base model's are finite); "
                            f"{fix}")


