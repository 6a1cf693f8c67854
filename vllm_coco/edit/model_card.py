"""README.md in Hugging Face model-card form for every directory `coco-tools bake` / `ne` writes.

YAML front matter (base_model, library_name, tags, license carried from the base model's own card
where it has one), then what was edited: the kind and its settings, the neuron set (count per
projection, contrast mode, categories, artifact hash), how to load the directory, and, when the
directory is a chosen edit of `coco-tools run`, the verdicts of that run with their intervals
(`with_verdicts`). The base model's own README.md is never copied: this card replaces it.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from vllm_coco import METHOD_VERSION, __version__
from vllm_coco.core.atomic import write_text

CARD = "README.md"
VERDICTS = "## Verdicts of the run that chose this edit"
# what loads each kind of directory (library_name), and how
LOADERS = {
    "checkpoint": ("transformers", "a standard checkpoint: `AutoModelForCausalLM.from_pretrained(DIR)` or "
                   "`vllm serve DIR` load it like the base model."),
    "lora": ("peft", "a PEFT LoRA adapter over the base model: `PeftModel.from_pretrained(base, DIR)`, or "
             "`vllm serve BASE --enable-lora --lora-modules coco=DIR`."),
    "ne": ("vllm", "an NE-COCO directory: `coco-tools serve DIR` (or `vllm serve DIR` with the vllm-coco plugin "
           "installed) runs the gate in the attention path; per-request strengths and named edits via "
           "`vllm_xargs`."),
}


def base_card(model_dir: Path) -> dict:
    """The base model's card front matter (empty when it has none, or none that parses)."""
    path = Path(model_dir) / CARD
    try:
        text = path.read_text(encoding="utf-8")
        if text.startswith("---\n"):
            meta = yaml.safe_load(text.split("---\n", 2)[1])
            return meta if isinstance(meta, dict) else {}
    except (OSError, UnicodeDecodeError, IndexError, yaml.YAMLError):
        pass
    return {}


def front_matter(model_dir: Path, config: dict, fmt: str, kind: str) -> dict:
    """base_model: the base card's own base_model, else the config's hub name, else the directory."""
    base = base_card(model_dir)
    name = config.get("_name_or_path") or ""
    meta = {"base_model": base.get("base_model") or (name if name.count("/") == 1 else str(model_dir)),
            "library_name": LOADERS[fmt][0],
            "tags": ["vllm-coco", "coco", "debiasing", "bias-mitigation", kind]}
    for key in ("license", "language"):
        if base.get(key):
            meta[key] = base[key]
    return meta


def neuron_lines(meta: dict, neurons_hash: str) -> list[str]:
    sel, data = meta.get("selection", {}), meta.get("data", {})
    cats = meta.get("categories") or []
    return [f"- neurons: {sel.get('count')} q/k/v neurons ({sel.get('by_proj')}), ratio {sel.get('ratio')}, "
            f"weighting {sel.get('weighting')}",
            f"- identified on: {data.get('contrast', '?')} contrast, split {data.get('split', '?')}, "
            f"{len(cats)} categories ({', '.join(cats) if isinstance(cats, list) else cats})",
            f"- neuron artifact: `{neurons_hash}`"]


def render(model_dir: Path, config: dict, meta: dict, neurons_hash: str, fmt: str, kind: str, summary: str,
           settings: dict) -> str:
    """The card's text (front matter + body)."""
    head = yaml.safe_dump(front_matter(model_dir, config, fmt, kind), sort_keys=False).strip()
    setting = ", ".join(f"{k}={v:g}" for k, v in settings.items()) or "its defaults"
    return "\n".join([
        "---", head, "---", "", f"# {Path(str(model_dir)).name} + vllm-coco {kind}", "",
        f"`{model_dir}` with the {kind} edit of vllm-coco ({METHOD_VERSION}, "
        f"vllm-coco {__version__}): {summary}; settings: {setting}.", "",
        "## Edit", "", *neuron_lines(meta, neurons_hash), f"- format: {LOADERS[fmt][1]}", "",
        "## Evaluation", "",
        "No evaluation is recorded with this directory. `coco-tools run` evaluates an edit against its base model "
        "with paired intervals (docs/METHOD.md §8); its chosen edits carry the verdicts here.", ""])


def write(out: Path, model_dir: Path, config: dict, meta: dict, neurons_hash: str, fmt: str, kind: str,
          summary: str, settings: dict) -> None:
    """The card into `out` (a directory being written: the caller's atomic temp directory)."""
    text = render(model_dir, config, meta, neurons_hash, fmt, kind, summary, settings)
    (Path(out) / CARD).write_text(text, encoding="utf-8")


def with_verdicts(card_path: Path, rows: list[list[str]]) -> None:
    """Replace the card's evaluation section with a verdict table (claim, verdict, evidence); atomic."""
    text = Path(card_path).read_text(encoding="utf-8").split("## Evaluation", 1)[0]
    table = ["| claim | verdict | evidence: Δ [95 % interval] (n) |", "|---|---|---|"]
    table += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows]
    write_text(Path(card_path), text + "\n".join([VERDICTS, "", "Paired 95 % bootstrap intervals over items of "
                                                  "the held-out test split (docs/METHOD.md §8).", "", *table, ""]))
