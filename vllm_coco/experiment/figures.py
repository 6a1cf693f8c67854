"""The report's figures: one PNG per plot, drawn from typed results (report.py links them)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from vllm_coco.experiment.results import EDIT_LABELS, LABELS, AblationResult, FinalResult, ModelResults


@dataclass(frozen=True)
class ModelFigures:
    """One model's figures (paths in the directory they were drawn into)."""
    heatmap: Path
    ablation: Path
    success: Path
    deltas: Path

    def paths(self) -> list[Path]:
        return [self.heatmap, self.ablation, self.success, self.deltas]


def draw(m: ModelResults, categories, out_dir: Path) -> ModelFigures:
    """Every figure of one model into out_dir (written atomically)."""
    return ModelFigures(heatmap=neuron_heatmap(m, out_dir),
                        ablation=ablation_chart(m.name, m.ablation.result, categories, out_dir),
                        success=success_chart(m.name, m.final.result, categories, out_dir),
                        deltas=delta_chart(m, out_dir))


def neuron_heatmap(m: ModelResults, out_dir: Path) -> Path:
    """Where the COCO neurons sit: layer x projection counts of the combined set."""
    from vllm_coco.core.artifact import load as load_artifact
    from vllm_coco.identify import report as neuron_report

    meta, _ = load_artifact(m.identify.dir / m.identify.result.neurons)
    grid = neuron_report.counts(meta)
    png = out_dir / f"{m.name}-neurons-heatmap.png"
    neuron_report.heatmap(grid, f"COCO neurons (combined)\n{m.name}: {int(grid.sum())} selected", png)
    return png


def ablation_chart(name: str, r: AblationResult, categories, out_dir: Path) -> Path:
    """Success rate per category: the base model, then each neuron set ablated."""
    from vllm_coco.tasks.compare import bar_chart

    runs = [r.base, *r.sets.values()]
    png = out_dir / f"{name}-ablation.png"
    bar_chart([(c, [s.get("success_rate", c) for s in runs]) for c in [*categories, "all"]],
              ["base"] + [f"{LABELS[s]} ablated" for s in r.sets], png, f"{name}: success rate after ablation (test)")
    return png


def success_chart(name: str, r: FinalResult, categories, out_dir: Path) -> Path:
    """Final success rate per category: base, LE-COCO, NE-COCO (those present)."""
    from vllm_coco.tasks.compare import bar_chart

    runs = r.runs()
    png = out_dir / f"{name}-success-rate.png"
    bar_chart([(c, [x.stereo.get("success_rate", c) for x in runs.values()]) for c in [*categories, "all"]],
              [EDIT_LABELS[k] for k in runs], png, f"{name}: success rate (test)")
    return png


def delta_chart(m: ModelResults, out_dir: Path) -> Path:
    """Every comparison of the success rate with the base model, with its paired 95 % interval:
    each neuron set ablated, then the chosen edits (test split). The whiskers are the error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from vllm_coco.core.atomic import save_figure

    abl, fin = m.ablation.result, m.final.result
    rows = [(f"{LABELS[k]} ablated", (abl.intervals or {}).get(k, {}).get("success_rate")) for k in abl.sets]
    rows += [(EDIT_LABELS[k], (run.intervals or {}).get("success_rate")) for k, run in fin.edits().items()]
    rows = [(label, iv) for label, iv in rows if iv is not None and iv.delta is not None and iv.lo is not None]
    fig, ax = plt.subplots(figsize=(6.5, 0.55 * max(len(rows), 1) + 1.4))
    for y, (label, iv) in enumerate(rows):
        ax.errorbar([iv.delta], [y], xerr=[[iv.delta - iv.lo], [iv.hi - iv.delta]], fmt="o", capsize=4,
                    color="tab:red" if label.endswith("ablated") else "tab:blue")
    ax.axvline(0.0, color="gray", lw=1, ls="--")
    ax.set_yticks(range(len(rows)), [f"{label} (n={iv.n})" for label, iv in rows])
    ax.invert_yaxis()
    ax.set_xlabel("Δ success rate vs base (test), paired 95 % interval over items")
    ax.set_title(f"{m.name}: what each edit does to the success rate")
    fig.tight_layout()
    png = out_dir / f"{m.name}-deltas.png"
    save_figure(fig, png)
    return png
