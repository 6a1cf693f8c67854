"""The report's figures: one PNG per plot, drawn from typed results (report.py links them)."""

from __future__ import annotations

# Lazy imports: numpy, matplotlib are imported inside the functions that use them (directly or
# through the modules they import), so importing this module stays light.
from dataclasses import dataclass
from pathlib import Path

from vllm_coco.core.atomic import save_figure
from vllm_coco.edit.registry import label
from vllm_coco.experiment import benchmarks
from vllm_coco.experiment.results import LABELS, AblationResult, FinalResult, ModelResults
from vllm_coco.tasks.compare import bar_chart


@dataclass(frozen=True)
class ModelFigures:
    """One model's figures (paths in the directory they were drawn into). finals: benchmark -> its
    headline metric per group (benchmark_chart)."""
    heatmap: Path
    ablation: Path
    deltas: Path
    sweep: Path
    finals: dict[str, Path]

    def paths(self) -> list[Path]:
        return [self.heatmap, self.ablation, self.deltas, self.sweep, *self.finals.values()]


def draw(m: ModelResults, categories, out_dir: Path) -> ModelFigures:
    """Every figure of one model into out_dir (written atomically)."""
    fin = m.final.result
    return ModelFigures(heatmap=neuron_heatmap(m, out_dir),
                        ablation=ablation_chart(m.name, m.ablation.result, categories, out_dir),
                        deltas=delta_chart(m, out_dir), sweep=sweep_chart(m, out_dir),
                        finals={b: benchmark_chart(m.name, benchmarks.get(b), fin, categories, out_dir)
                                for b in fin.limits})


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
    runs = [r.base, *r.sets.values()]
    png = out_dir / f"{name}-ablation.png"
    bar_chart([(c, [s.get("success_rate", c) for s in runs]) for c in [*categories, "all"]],
              ["base"] + [f"{LABELS[s]} ablated" for s in r.sets], png, f"{name}: success rate after ablation (test)")
    return png


def benchmark_chart(name: str, bench, r: FinalResult, categories, out_dir: Path) -> Path:
    """A benchmark's headline metric per group (and over all): base and the chosen edits."""
    runs, head = r.runs(), bench.metrics[0]
    png = out_dir / f"{name}-{bench.name}.png"
    bar_chart([(g, [x.summaries[bench.name].get(head.key, g) for x in runs.values()])
               for g in [*bench.groups(categories), "all"]],
              [label(k) for k in runs], png, f"{name}: {bench.name}, {head.key} (test)")
    return png


def delta_chart(m: ModelResults, out_dir: Path) -> Path:
    """Every comparison of the success rate with the base model, with its paired 95 % interval:
    each neuron set ablated, then the chosen edits (test split). The whiskers are the error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt


    abl, fin = m.ablation.result, m.final.result
    rows = [(f"{LABELS[k]} ablated", (abl.intervals or {}).get(k, {}).get("success_rate")) for k in abl.sets]
    if m.stability is not None:  # the split halves' own sets (stability stage)
        rows += [(f"half {k.upper()}'s set ablated", iv) for k, iv in (m.stability.result.intervals or {}).items()]
    rows += [(label(k), run.interval(benchmarks.PRIMARY, "success_rate")) for k, run in fin.edits.items()]
    rows = [(name, iv) for name, iv in rows if iv is not None and iv.delta is not None and iv.lo is not None]
    fig, ax = plt.subplots(figsize=(6.5, 0.55 * max(len(rows), 1) + 1.4))
    for y, (name, iv) in enumerate(rows):
        ax.errorbar([iv.delta], [y], xerr=[[iv.delta - iv.lo], [iv.hi - iv.delta]], fmt="o", capsize=4,
                    color="tab:red" if name.endswith("ablated") else "tab:blue")
    ax.axvline(0.0, color="gray", lw=1, ls="--")
    ax.set_yticks(range(len(rows)), [f"{name} (n={iv.n})" for name, iv in rows])
    ax.invert_yaxis()
    ax.set_xlabel("Δ success rate vs base (test), paired 95 % interval over items")
    ax.set_title(f"{m.name}: what each edit does to the success rate")
    fig.tight_layout()
    png = out_dir / f"{m.name}-deltas.png"
    save_figure(fig, png)
    return png


def sweep_chart(m: ModelResults, out_dir: Path) -> Path:
    """The sweep's first rung on validate (every candidate): each one's Δ|s_AMB| vs base with its
    paired 95 % interval, against the neuron share, one line per edit and strength (chosen: ringed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt


    r = m.sweep.result
    chosen = {c.key for c in r.chosen.values() if c.key is not None}
    lines: dict[str, list] = {}  # edit + strength -> [(share, interval, chosen)]
    for row in r.rows:
        c, iv = row.candidate, row.bias
        if row.rung != 0 or iv is None or iv.delta is None or iv.lo is None:
            continue
        name = f"{label(c.arm)} " + (c.params.split(", ", 1)[-1] if c.ratio is not None else c.params)
        lines.setdefault(name, []).append((100 * (c.ratio or 0.0), iv, row.key in chosen))
    fig, ax = plt.subplots(figsize=(6.5, 4.0))
    for i, (name, pts) in enumerate(lines.items()):
        x = [p[0] * (1 + 0.04 * (i - len(lines) / 2)) for p in pts]  # a small offset keeps whiskers apart
        d = [p[1].delta for p in pts]
        err = [[p[1].delta - p[1].lo for p in pts], [p[1].hi - p[1].delta for p in pts]]
        ax.errorbar(x, d, yerr=err, fmt="o-", capsize=3, label=name)
        for xi, p in zip(x, pts):
            if p[2]:
                ax.plot([xi], [p[1].delta], "o", ms=13, mfc="none", mec="black")
    ax.axhline(0.0, color="gray", lw=1, ls="--")
    ticks = sorted({p[0] for pts in lines.values() for p in pts})
    if ticks and ticks[0] > 0:  # shares 0.5, 1, 2 %: evenly spaced
        ax.set_xscale("log")
        ax.minorticks_off()
    ax.set_xticks(ticks, [f"{t:g}" if t else "own set" for t in ticks])  # 0: a KIND@SET arm, at its set's share
    ax.set_xlabel("neuron share (%)")
    ax.set_ylabel("Δ|s_AMB| vs base (validate, first rung), 95 %")
    ax.set_title(f"{m.name}: sweep (lower is less bias; ringed: chosen)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    png = out_dir / f"{m.name}-sweep.png"
    save_figure(fig, png)
    return png
