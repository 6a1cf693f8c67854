"""`coco-tools compare`: several `coco-tools eval` (or plain lm-eval) results side by side.

Rows are the subtasks of one task group (the categories of stereo_coco, the attack families of
stereo_coco_jailbreak, ...) plus the group itself ("all"); columns are runs; each cell is a
metric with its difference to the first run (the baseline). Also a grouped bar chart PNG.
"""

from __future__ import annotations

# Lazy imports: numpy, matplotlib, PyYAML are imported inside the functions that use them (directly
# or through the modules they import), so importing this module stays light.
import math
import os
import sys
import warnings
from pathlib import Path

from vllm_coco.core.atomic import check_figure_path, save_figure
from vllm_coco.core.errors import CocoError
from vllm_coco.core.json_file import read_json
from vllm_coco.tasks import results as lm_results

ALL_ROW = "all"


def find_results(path: str | os.PathLike) -> Path:
    """A results JSON file, or the one inside a directory (results.json from `coco-tools eval`,
    else the newest lm-eval results*.json below it)."""
    p = Path(path)
    if p.is_file():
        return p
    if p.is_dir():
        if (p / "results.json").is_file():
            return p / "results.json"
        found = sorted(p.rglob("results*.json"), key=lambda f: f.stat().st_mtime)
        if found:
            return found[-1]
        raise CocoError(f"{path} holds no results*.json; pass a `coco-tools eval` output directory or a results file")
    raise CocoError(f"results {path} does not exist; pass `coco-tools eval` output directories or results JSON files")


def load_results(path: Path) -> dict:
    data = read_json(path, "pass lm-eval results")
    if not isinstance(data, dict) or not isinstance(data.get("results"), dict):
        raise CocoError(f"{path} has no 'results' section; it is not an lm-eval results file")
    bad = [k for k, v in data["results"].items() if not isinstance(v, dict)]
    if bad:
        raise CocoError(f"{path}: results.{bad[0]} is not a mapping of metrics; pass an lm-eval results file")
    subtasks = data.get("group_subtasks")
    for key, kind in (("config", dict), ("coco", dict), ("group_subtasks", dict)):
        if data.get(key) is not None and not isinstance(data[key], kind):
            raise CocoError(f"{path}: `{key}` is not a mapping; pass an lm-eval results file")
    if subtasks and not all(isinstance(v, list) for v in subtasks.values()):
        raise CocoError(f"{path}: `group_subtasks` does not map groups to lists; pass an lm-eval results file")
    for entry in data["results"].values():  # an integer beyond float range reads as the infinity it is
        for k, v in entry.items():
            if isinstance(v, int) and not isinstance(v, bool) and abs(v) > sys.float_info.max:
                entry[k] = math.inf if v > 0 else -math.inf
    return data


def run_label(data: dict, path: Path) -> str:
    """The model's name: from the `coco` block, lm-eval's model_args pretrained=, or the path."""
    if isinstance(data.get("coco"), dict) and data["coco"].get("name"):
        return str(data["coco"]["name"])
    cfg = data.get("config") or {}
    args = cfg.get("model_args")
    pretrained = None
    if isinstance(args, dict):
        pretrained = args.get("pretrained") or args.get("model")
    elif isinstance(args, str):
        for part in args.split(","):
            key, _, value = part.partition("=")
            if key.strip() in ("pretrained", "model") and value:
                pretrained = value.strip()
    if pretrained:
        return Path(str(pretrained).rstrip("/")).name
    if data.get("model_name"):
        return Path(str(data["model_name"]).rstrip("/")).name
    return path.parent.name if path.name == "results.json" else path.stem


def _children(group: str, runs: list[dict]) -> list[str]:
    """Subtasks of `group`: from the evals/ definitions when available, else the results files."""
    try:
        from vllm_coco.tasks.task_folder import evals_dir, local_tasks

        defined = local_tasks(evals_dir()).get(group)
    except CocoError:
        defined = None
    if defined:
        return defined
    names = []
    for data in runs:
        for child in (data.get("group_subtasks") or {}).get(group, []):
            if child not in names:
                names.append(child)
    return names


def _row_name(task: str, group: str) -> str:
    return task[len(group) + 1:] if task.startswith(group + "_") else task


NOT_FINITE = "n/a: the results file holds no finite number there (inf, nan, or too large)"


def _finite(v) -> bool:
    return v is not None and math.isfinite(v)


def _num(v: float, sign: str = "") -> str:
    return f"{v:{sign}.4f}" if abs(v) < 1e6 else f"{v:{sign}.4g}"  # a metric is a rate or a score: no 300 digits


def _cell(v, base) -> str:
    """One run's value; with `base` (the first run's), its difference to it when both are numbers."""
    if v is None:
        return "-"
    if not math.isfinite(v):
        return "n/a"
    delta = v - base if _finite(base) else None
    return _num(v) if delta is None or not math.isfinite(delta) else f"{_num(v)} ({_num(delta, '+')})"


def compare_table(runs: list[tuple[str, dict]], group: str = "stereo_coco", metric: str = "success_rate"):
    """(rows, table text): rows = [(row name, [value or None per run])], the group's own value last."""
    datas = [d for _, d in runs]
    tasks = [t for t in _children(group, datas) if any(lm_results.metric(d, t, metric) is not None for d in datas)]
    has_group = any(lm_results.metric(d, group, metric) is not None for d in datas)
    if not tasks and not has_group:
        present = sorted({k.split(",")[0] for d in datas for v in d["results"].values() for k in v
                          if k.endswith(",none") and "_stderr" not in k})
        groups = sorted({t for d in datas for t in d["results"]})
        raise CocoError(f"no run has metric {metric} for task group {group}; tasks in the results: "
                        f"{', '.join(groups)}; metrics: {', '.join(present)}")
    rows = [(_row_name(t, group), [lm_results.metric(d, t, metric) for d in datas]) for t in tasks]
    if has_group:
        rows.append((ALL_ROW, [lm_results.metric(d, group, metric) for d in datas]))
    labels = [label for label, _ in runs]
    first = max([len(f"{metric} ({group})")] + [len(r) for r, _ in rows])
    width = max([len(label) for label in labels] + [17])
    lines = [f"{metric + ' (' + group + ')':<{first}}  " + "  ".join(f"{label:>{width}}" for label in labels)]
    for name, values in rows:
        cells = [_cell(v, values[0] if i else None) for i, v in enumerate(values)]
        lines.append(f"{name:<{first}}  " + "  ".join(f"{c:>{width}}" for c in cells))
    values = [v for _, vs in rows for v in vs]
    notes = (["-: the run has no value"] if None in values else []) + \
        ([NOT_FINITE] if any(v is not None and not math.isfinite(v) for v in values) else [])
    if len(labels) > 1:
        notes.insert(0, f"deltas vs the first run, {labels[0]}")
    lines.append(f"({'; '.join(notes)})" if notes else "")
    return rows, "\n".join(lines).rstrip() + "\n"


def bar_chart(rows, labels: list[str], png: Path, title: str) -> None:
    """Grouped bars: one group of bars per row, one bar per run; written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    x = np.arange(len(rows))
    n = len(labels)
    width = 0.8 / n
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(rows) * max(1, n / 2)), 4.2))
    finite = []
    for i, label in enumerate(labels):
        vals = [r[1][i] if _finite(r[1][i]) else float("nan") for r in rows]  # no bar for -, n/a
        bars = ax.bar(x + (i - (n - 1) / 2) * width, vals, width, label=label)
        ax.bar_label(bars, fmt="%.2f", fontsize=6, padding=1)
        finite += [v for v in vals if not math.isnan(v)]
    if finite and min(finite) >= 0 and max(finite) <= 1:  # rates: a fixed 0..1 axis, so zeros still read
        ax.set_ylim(0, 1.08)
    elif finite and min(finite) >= -1 and max(finite) <= 1:  # signed bias scores
        ax.set_ylim(-1.08, 1.08)
    ax.set_xticks(x)
    ax.set_xticklabels([r[0] for r in rows], rotation=20, ha="right")
    ax.set_title(title)
    ax.axhline(0, color="black", linewidth=0.6)
    ax.legend(fontsize="small")
    fig.tight_layout()
    save_figure(fig, png)


def compare(paths, labels=None, png=None, group: str = "stereo_coco", metric: str = "success_rate"):
    """Load the runs, return the table text and write the PNG; returns (text, png path)."""
    if not paths:
        raise CocoError("pass at least one results file or directory")
    files = [find_results(p) for p in paths]
    datas = [load_results(f) for f in files]
    if labels is not None:
        labels = list(labels)
        if len(labels) != len(files):
            raise CocoError(f"--labels has {len(labels)} names for {len(files)} runs; give one per run")
    else:
        labels = [run_label(d, f) for d, f in zip(datas, files)]
    seen = {}
    for i, label in enumerate(labels):  # keep columns distinguishable when two runs share a name
        seen[label] = seen.get(label, 0) + 1
        if seen[label] > 1:
            labels[i] = f"{label}#{seen[label]}"
    png = check_figure_path(Path(png) if png else files[0].parent / f"compare-{group}-{metric}.png")
    rows, text = compare_table(list(zip(labels, datas)), group, metric)
    with warnings.catch_warnings():  # values near float's limits overflow matplotlib's layout arithmetic, harmlessly
        warnings.simplefilter("ignore", RuntimeWarning)
        bar_chart(rows, labels, png, f"{metric} ({group})")
    return text, png
