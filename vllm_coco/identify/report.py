"""`coco-tools report`: where the selected neurons sit, as a layer x projection table and heatmap."""

from __future__ import annotations

# Lazy imports: matplotlib is imported inside the functions that use it (directly or through the
# modules they import), so importing this module stays light.
from pathlib import Path

import numpy as np

from vllm_coco.core import artifact
from vllm_coco.core.atomic import check_figure_path, save_figure
from vllm_coco.core.errors import CocoError
from vllm_coco.core.names import PROJS, Proj


def counts(meta: dict, category: str | None = None) -> np.ndarray:
    """[num_layers, 3] selected-neuron counts per layer and q/k/v projection."""
    if category is None:
        neurons = meta["neurons"]
    elif category in meta["per_category"]:
        neurons = meta["per_category"][category].get("neurons", [])  # the artifact check reads it so too
    else:
        raise CocoError(f"unknown category {category}; this artifact has {', '.join(meta['categories'])}")
    grid = np.zeros((meta["model"]["num_layers"], 3), dtype=np.int64)
    for n in neurons:
        grid[n["layer"], Proj[n["proj"]]] += 1
    return grid


def table(grid: np.ndarray, meta: dict) -> str:
    sizes = [meta["model"]["q_size"], meta["model"]["kv_size"], meta["model"]["kv_size"]]
    lines = [f"{'layer':>5} {'q':>6} {'k':>6} {'v':>6} {'total':>6}"]
    for layer, row in enumerate(grid):
        lines.append(f"{layer:>5} " + " ".join(f"{c:>6}" for c in row) + f" {row.sum():>6}")
    tot = grid.sum(0)
    lines.append(f"{'all':>5} " + " ".join(f"{c:>6}" for c in tot) + f" {tot.sum():>6}")
    share = [f"{100 * c / (s * grid.shape[0]):.2f}%" for c, s in zip(tot, sizes)]
    lines.append(f"{'share':>5} " + " ".join(f"{s:>6}" for s in share))
    return "\n".join(lines)


def heatmap(grid: np.ndarray, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(3.2, max(3.0, 0.22 * grid.shape[0] + 1.2)))
    im = ax.imshow(grid, aspect="auto", cmap="viridis", origin="lower")
    ax.set_xticks(range(len(PROJS)), PROJS)
    ax.set_ylabel("layer")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, label="selected neurons")
    fig.tight_layout()
    save_figure(fig, path)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_fields(d: Path, meta: dict) -> None:
    """The neurons.json fields the report prints, beyond what artifact.load checks: a damaged one is a
    CocoError naming it, raised before the heatmap is written (never a traceback after it)."""
    m, sel, sig = meta["model"], meta["selection"], meta["significance"]
    problems = [(f"model.{k}", m.get(k), "a string") for k in ("path", "architecture") if not isinstance(m.get(k), str)]
    rule = sel.get("rule")
    if rule not in ("ratio", "threshold"):
        problems.append(("selection.rule", rule, "ratio or threshold"))
    elif not _is_num(sel.get(rule)):
        problems.append((f"selection.{rule}", sel.get(rule), "a number"))
    best = sig.get("null_best_score")
    if best is not None and not _is_num(best):
        problems.append(("significance.null_best_score", best, "a number or null"))
    elif best is not None:  # the significance line also prints these two
        problems += [(k, v, "an integer") for k, v in (("significance.beat_null", sig.get("beat_null")),
                                                        ("selection.count", sel.get("count")))
                     if not isinstance(v, int) or isinstance(v, bool)]
    if problems:
        key, value, want = problems[0]
        found = "missing" if value is None else repr(value)
        raise CocoError(f"{d / artifact.JSON_NAME}: {key} is {found}, not {want}; "
                        "re-run `coco-tools identify` (or `coco-tools select`) to rewrite it")


def report(neurons_dir, png=None, category=None) -> str:
    """The report text; writes the heatmap last, once everything it prints has been checked."""
    meta, _ = artifact.load(neurons_dir)
    _check_fields(Path(neurons_dir), meta)
    grid = counts(meta, category)
    png = check_figure_path(Path(png) if png else Path(neurons_dir) / "heatmap.png")
    sel = meta["selection"]
    what = category or "combined"
    title = f"COCO neurons ({sel['baseline']}, {what})\n{Path(meta['model']['path']).name}: {grid.sum()} selected"
    sig = meta["significance"]
    head = [f"{meta['model']['architecture']} {meta['model']['path']}",
            f"selection: {sel['baseline']} {sel['rule']} {sel[sel['rule']]}, {grid.sum()} neurons ({what})"]
    if sig.get("null_best_score") is not None and category is None:
        head.append(f"significance: {sig['beat_null']}/{sel['count']} beat the null's best score "
                    f"{sig['null_best_score']:.4f}")
    text = "\n".join(head + [table(grid, meta), f"heatmap: {png}"])
    heatmap(grid, title, png)
    return text
