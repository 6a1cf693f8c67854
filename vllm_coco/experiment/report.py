"""REPORT.md of `coco-tools run`: one small renderer per section, each from typed results.

Renderers return Markdown lines and do no I/O; figures.py draws the PNGs they link (as
report/<name>.png, relative to OUT/REPORT.md) and `neuron_layout` reads the one artifact text the
neuron section prints. tests/test_pipeline.py keeps every function here under 40 lines.
"""

from __future__ import annotations

# Lazy imports: the neuron artifact and its table (numpy) load inside the one section that reads them,
# so rendering from stored results stays light.
import math
from pathlib import Path

from vllm_coco import METHOD_VERSION, __version__
from vllm_coco.edit.registry import label
from vllm_coco.experiment import benchmarks, stats, versus
from vllm_coco.experiment.benchmarks import Benchmark
from vllm_coco.experiment.config import Identify, RunConfig
from vllm_coco.experiment.figures import ModelFigures
from vllm_coco.experiment.results import (
    LABELS,
    AblationResult,
    FinalResult,
    IdentifyResult,
    Interval,
    ModelResults,
    ParityResult,
    SetsResult,
    StabilityResult,
    Stage,
    SweepResult,
)

REL = "report"  # the report stage's directory, relative to OUT/REPORT.md


# --------------------------------------------------------------------------- formatting

def _missing(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def fmt(v, digits: int = 3) -> str:
    return "n/a" if _missing(v) else f"{v:.{digits}f}"


def delta(v, base, digits: int = 3) -> str:
    """v with its difference to base: "0.500 (+0.100)"."""
    if _missing(v) or _missing(base):
        return fmt(v, digits)
    return f"{v:.{digits}f} ({v - base:+.{digits}f})"


def md_table(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table; "|" inside a cell is escaped."""
    def line(cells):
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    return "\n".join([line(header), "|" + "|".join("---" for _ in header) + "|", *map(line, rows)])


def vs_base(cells: list[str], base, others) -> list[str]:
    """A table row: its label cells, the base value, each other value with its difference to base."""
    return [*cells, fmt(base)] + [delta(v, base) for v in others]


def figure(alt: str, png: Path) -> list[str]:
    return [f"![{alt}]({REL}/{png.name})", ""]


# --------------------------------------------------------------------------- the whole report

def render(cfg: RunConfig, config_path: str, out: Path, backend: str, models: list[ModelResults],
           figs: dict[str, ModelFigures], layouts: dict[str, str],
           parities: dict[str, ParityResult] | None = None) -> str:
    """REPORT.md: header, summary, parity twins, then one section per model. figs / layouts: by model name."""
    md = (header(cfg, config_path, out, backend) + verdicts(cfg, models) + [x for m in models for x in sample_sizes(m)]
          + summary(models) + parity(parities or {}))
    for m in models:
        md += model_section(cfg, m, figs[m.name], layouts[m.name])
    return "\n".join(md).rstrip() + "\n"


def sample_sizes(m: ModelResults) -> list[str]:
    """Each comparison's n, the ± its interval has, and the ± a planning formula expects at that n
    (stats.expected_halfwidth at the base rate), with the items a ±0.05 would take: what a larger
    run would buy."""
    abl, sw, fin = m.ablation.result, m.sweep.result, m.final.result
    p_test, p_val = abl.base.get("success_rate"), sw.base.success_rate
    rows = []

    def add(what: str, iv: Interval | None, p):
        if iv is None or iv.lo is None or iv.n < 1:
            return
        p = 0.5 if _missing(p) else min(max(p, 0.05), 0.95)
        rows.append([what, str(iv.n), f"±{(iv.hi - iv.lo) / 2:.3f}", f"±{stats.expected_halfwidth(p, iv.n):.3f}",
                     f"{stats.items_for_halfwidth(p, 0.05):,}"])

    add("ablation: COCO set vs base (test)", (abl.intervals or {}).get("coco", {}).get("success_rate"), p_test)
    add("specificity: Δ_COCO - Δ_RAND (test)", (abl.specific or {}).get("rand"), p_test)
    if m.stability is not None:
        add("stability: half A's set vs base (test)", (m.stability.result.intervals or {}).get("a"), p_test)
    for e in sw.chosen:
        row = sw.chosen_row(e)
        if row is not None:
            add(f"sweep: chosen {label(row.arm)} vs base (validate, success rate)", row.delta, p_val)
    for e, run in fin.edits.items():
        for b, ivs in (run.intervals or {}).items():
            bench = benchmarks.get(b)
            for key, iv in ivs.items():
                metric, _, group = key.partition(":")
                if (group and metric in ivs) or metric.startswith("base_"):  # pooled ones stand for their groups;
                    continue  # base_*: the base model's own value, not a comparison
                if bench.metric(metric).rate:  # the planning formula is for proportions
                    add(f"final: {label(e)} {b} {key} (test)", iv, fin.base.summaries[b].get(metric, group or "all"))
    if not rows:
        return []
    return [f"### Sample sizes ({m.name})", "",
            "The ± of each comparison's 95 % interval as measured, the ± a planning formula expects at that n "
            "(z·sqrt(2p(1-p)/n) at the base rate p: conservative, it ignores the pairing), and the n that a ±0.05 "
            "would take.", "", md_table(["comparison", "n", "± measured", "± expected", "n for ±0.05"], rows), ""]


def model_verdicts(cfg: RunConfig, m: ModelResults) -> list[stats.Verdict]:
    """The claims, each computed from the stored intervals by stats' stated rule: specificity of the
    COCO set, then each edit's verdicts from every benchmark that judges (benchmarks.Benchmark.judge)."""
    abl, fin = m.ablation.result, m.final.result
    out = [stats.verdict_specific({LABELS[k]: iv for k, iv in (r.specific or {}).items()}, r.mode)
           for r in (abl, *abl.also.values())]
    for e, run in fin.edits.items():  # no candidate of an edit: nothing to judge
        out += benchmarks.judge_all(run.intervals or {}, label(e), cfg)
    return out + [versus.verdict(v, fin.edits[v.coco], fin.edits[v.baseline], label(v.coco), label(v.baseline))
                  for v in fin.versus]


def evidence(v: stats.Verdict) -> str:
    return "; ".join(f"{k}: {iv.text()} (n={iv.n})" for k, iv in v.evidence.items()) or "n/a"


def verdicts(cfg: RunConfig, models: list[ModelResults]) -> list[str]:
    """The verdicts section: claim, status, the intervals it read; then every rule once."""
    rows, rules = [], {}
    for m in models:
        for v in model_verdicts(cfg, m):
            rows.append([m.name, v.claim, f"**{v.status}**", evidence(v)])
            rules.setdefault(v.rule, None)
    return (["## Verdicts", "",
             "Computed from paired 95 % bootstrap intervals over BBQ items (an item's value is its mean over the "
             "three option orders; n = items) on the held-out test split; never written by hand.", "",
             md_table(["model", "claim", "verdict", "evidence: Δ [95 % interval]"], rows), "", "Rules:", ""]
            + [f"- {r}" for r in rules] + [""])


def parity(parities: dict[str, ParityResult]) -> list[str]:
    """Twins (same weights, another architecture class) checked against their reference model."""
    if not parities:
        return []
    rows = [[name, p.reference, "yes" if p.identical else "**no**", f"{p.max_abs_score:.2g}",
             "yes" if p.same_selection else "no", f"{p.max_abs_loglik.get('base', float('nan')):.2g}",
             f"{p.max_abs_loglik.get('ne', float('nan')):.2g}", str(p.docs)] for name, p in parities.items()]
    some = next(iter(parities.values()))
    return ["## Parity twins", "",
            f"Same weights under another architecture class: identify ({some.identify_limit} pairs per category) "
            f"and stereo_coco ({some.limit} documents per category, base and NE-COCO) must give the reference's "
            f"numbers to {some.tolerance:g}. They check code paths; they add no evidence, so they get no full run.",
            "", md_table(["twin", "reference", "identical", "max |Δ score|", "same neurons",
                          "max |Δ loglik| base", "max |Δ loglik| NE", "documents"], rows), ""]


def model_section(cfg: RunConfig, m: ModelResults, fig: ModelFigures, layout: str) -> list[str]:
    cats, final = cfg.data.categories, m.final.result
    md = (model_intro(m) + neurons(m.identify.result, cfg.identify, layout, fig.heatmap)
          + ablation(m.ablation.result, cats, fig.ablation)
          + (stability(m.stability.result, m.ablation.result) if m.stability is not None else [])
          + (neuron_sets(m.sets.result) if m.sets is not None else [])
          + sweep(m.sweep.result) + figure("sweep", fig.sweep))
    for b in final.limits:
        md += benchmark(benchmarks.get(b), final, cats, fig.finals[b])
        if b == benchmarks.PRIMARY:
            md += choice_on_test(m) + figure("deltas with intervals", fig.deltas)
    return md + side_by_side(final) + edited_models(final, m.final.dir, m.sweep.result.chosen)


def neuron_sets(r: SetsResult) -> list[str]:
    """The config's named sets (sets stage): how each was made and what it holds."""
    rows = []
    for name, s in r.sets.items():
        sig = s.significance
        beat = "n/a" if sig.beat_null is None else f"{sig.beat_null}/{s.count}"
        removed = "-" if s.abstention_removed is None else str(s.abstention_removed)
        rows.append([name, s.contrast, s.baseline, str(s.count), ", ".join(f"{p} {n}" for p, n in s.by_proj.items()),
                     str(s.pairs or "-"), beat, removed])
    return ["### Neuron sets edited by the sweep's KIND@SET arms", "",
            "Each set identified anew with its own contrast (docs/METHOD.md §2.4), or re-selected from another "
            "(the abstention filter on or off, §5.6; diffmean: the steering baseline's layer, §5.4).", "",
            md_table(["set", "contrast", "selection", "neurons", "by projection", "pairs", "beat the null",
                      "removed by the abstention filter"], rows), ""]


def side_by_side(r: FinalResult) -> list[str]:
    """COCO arms against the steering baseline, paired over the same test items (experiment/versus.py)."""
    if not r.versus:
        return []
    floors = {True: "within", False: "outside", None: "n/a"}
    rows = [[label(v.coco), label(v.baseline)]
            + [f"{v.diffs[k].text()} (n={v.diffs[k].n})" for k in versus.METRICS]
            + [floors[versus.within_floors(r.edits[v.coco])], floors[versus.within_floors(r.edits[v.baseline])]]
            for v in r.versus]
    return ["### COCO vs the steering baseline (test split)", "",
            "Δ_COCO - Δ_steering of each metric, paired over the test items both runs share (95 % bootstrap "
            "interval; below 0 on |s_AMB|: the COCO edit lowers BBQ's ambiguous bias score more), and whether each "
            "keeps Δ acc_disambig and KL on neutral text within their declared floors (equal retention).", "",
            md_table(["COCO edit", "steering edit", "Δ|s_AMB| difference", "Δ acc_disambig difference",
                      "Δ success rate difference", "COCO floors", "steering floors"], rows), ""]


def choice_on_test(m: ModelResults) -> list[str]:
    """Chosen on validate, reported on test: does the test result agree with the validate one?"""
    sw, fin = m.sweep.result, m.final.result
    rows = []
    for e, run in fin.edits.items():
        row = sw.chosen_row(e) if e in sw.chosen else None
        if run is None or row is None or row.delta is None or not run.interval(benchmarks.PRIMARY, "success_rate"):
            continue
        val, test = row.delta, run.interval(benchmarks.PRIMARY, "success_rate")

        def side(iv):
            return "n/a" if iv.lo is None else "up" if iv.lo > 0 else "down" if iv.hi < 0 else "no change resolved"

        rows.append([label(e), row.params, f"{val.text()} (n={val.n})", f"{test.text()} (n={test.n})",
                     "yes" if side(val) == side(test) else "no"])
    if not rows:
        return []
    return ["Chosen on validate, reported on test (Δ success rate vs base, paired 95 % interval):", "",
            md_table(["edit", "hyperparameters", "validate", "test", "same reading"], rows), ""]


def neuron_layout(ident: Stage[IdentifyResult]) -> str:
    """The layer x projection table of the COCO set (read from its artifact)."""
    from vllm_coco.core.artifact import load as load_artifact
    from vllm_coco.identify import report as neuron_report

    meta, _ = load_artifact(ident.dir / ident.result.neurons)
    return neuron_report.table(neuron_report.counts(meta), meta)


# --------------------------------------------------------------------------- sections

def header(cfg: RunConfig, config_path: str, out: Path, backend: str) -> list[str]:
    cats, data = cfg.data.categories, cfg.data
    return ["# COCO experiment report", "",
            f"Config: `{config_path}` · output: `{out}` · tool: vllm-coco {__version__} "
            f"({METHOD_VERSION}) · eval backend: {backend} · data: {data.source}, "
            f"{len(cats)} categories ({', '.join(cats)}) · seed {cfg.seed} · prompts: "
            f"{'chat template' if data.chat_template else 'plain (no chat template)'} · option scoring: "
            f"{'summed log-likelihood' if cfg.eval.scoring == 'sum' else 'log-likelihood per byte'}", "",
            "Success rate = share of ambiguous BBQ answers that pick the \"unknown\" option, averaged over the "
            "three cyclic option orders (higher is better). Sweep numbers are on the **validate** split, "
            "ablation and final numbers on the held-out **test** split; neurons were identified on the "
            "identify split. Sample sizes are per category (lm-eval documents; 3 documents = one item "
            "under the three orders): small samples mean wide error bars.", ""]


def summary(models: list[ModelResults]) -> list[str]:
    """One row per model: final success rates on test, and the COCO ablation's."""
    kinds = list(dict.fromkeys(k for m in models for k in m.sweep.result.chosen))  # every swept kind, in order
    rows = []
    for m in models:
        f, abl = m.final.result, m.ablation.result
        base = f.base.stereo.get("success_rate")
        edits = ["n/a (no candidate)" if k not in f.edits
                 else f"{delta(f.edits[k].stereo.get('success_rate'), base)} [{f.edits[k].params}]" for k in kinds]
        rows.append([m.name, fmt(base), *edits, delta(abl.coco.get("success_rate"), abl.base.get("success_rate"))])
    return ["## Summary", "", md_table(["model", "base (test)", *(f"{label(k)} (test)" for k in kinds),
                                        "COCO ablated (test)"], rows), ""]


def model_intro(m: ModelResults) -> list[str]:
    times = ", ".join(f"{s} {stage.seconds:.0f} s" for s, stage in m.stages().items())
    return [f"## {m.name}", "", f"Model: `{m.path}`", "", f"Compute time per stage (when computed): {times}.", ""]


def contrast_source(r: IdentifyResult, limit) -> str:
    """How the contrast sets were made."""
    per_cat = limit if limit else "all"
    if r.contrast == "behavior":
        nb, nu = (sum(v[k] for v in r.answers.values()) for k in ("biased", "unknown"))
        return (f"from the model's own answers (behavior mode) to the ambiguous identify-split items (up to {per_cat} "
                f"per category): {nb} answered with the biased option vs {nu} answered \"unknown\", "
                "intensities at the last prompt token.")
    return (f"from {r.pairs} contrast pairs (response mode: biased vs \"unknown\" answer teacher-forced; "
            f"identify split, up to {per_cat} per category).")


def neurons(r: IdentifyResult, ic: Identify, layout: str, heatmap: Path) -> list[str]:
    """Count, significance, and where the neurons sit (ic: the config's identify section)."""
    return (["### Neurons: count, significance, where they sit", "",
             f"{r.count} of {r.num_neurons} q/k/v neurons selected (ratio {ic.ratio}, {r.by_proj}) "
             + contrast_source(r, ic.limit), ""]
            + significance(r)
            + ["Selected neurons per layer and projection (combined set):", "", "```", layout, "```", ""]
            + figure("neuron heatmap", heatmap))


def significance(r: IdentifyResult) -> list[str]:
    sig = r.significance
    if sig.null_best_score is None:
        return ["Significance: n/a (identify.null_rounds is 0: no label-permutation null was computed).", ""]
    behavior = r.contrast == "behavior"  # per category: answers, not pairs
    rows = [[c, f"{pc.biased} / {pc.unknown}" if behavior else str(pc.pairs), str(pc.count),
             "n/a" if pc.beat_null is None else f"{pc.beat_null}/{pc.count}", fmt(pc.null_best_score, 4)]
            for c, pc in r.per_category.items()]
    return [f"Significance (label-permutation null, {sig.rounds} rounds): {sig.beat_null} of "
            f"{r.count} selected neurons score above the null's best ({sig.null_best_score:.4f}).", "",
            md_table(["category", "biased / unknown answers" if behavior else "pairs", "selected", "beat null",
                      "null best score"], rows), ""]


def ablation(r: AblationResult, cats, png: Path) -> list[str]:
    md = ["### Causal check: ablation (test split)", "",
          f"Each neuron set ablated (`{r.mode}`: in memory with backend hf, equal to `bake --mode {r.mode}`); "
          f"stereo_coco success rate, lm-eval limit "
          f"{r.limit or 'all'} documents per category.", ""]
    if not r.baselines():
        md += ["Baselines: n/a (no RAND / NORM / MACT baseline configured in `baselines`).", ""]
    md += ablation_tables(r, cats) + [f"Reading: {ablation_reading(r)}.", ""] + figure("ablation", png)
    for mode, other in r.also.items():
        md += [f"The same sets ablated by `{mode}` (against the same base evaluation):", ""]
        md += ablation_tables(other, cats) + [f"Reading ({mode}): {ablation_reading(other)}.", ""]
    return md


def ablation_tables(r: AblationResult, cats) -> list[str]:
    """One ablation kind's success rates per category, its intervals and its specificity."""
    rows = [vs_base([c], r.base.get("success_rate", c), [s.get("success_rate", c) for s in r.sets.values()])
            for c in [*cats, "all"]]
    md = [md_table(["category", "base"] + [f"{LABELS[s]} ablated" for s in r.sets], rows), ""]
    md += intervals_table("Δ vs base with its paired 95 % interval over test items (n items)",
                          {f"{LABELS[s]} ablated": iv for s, iv in (r.intervals or {}).items()})
    if r.specific:
        md += ["Specificity, Δ_COCO - Δ_X (success rate; below 0: COCO's ablation lowers it more):", "",
               md_table(["baseline X", "Δ_COCO - Δ_X [95 %]", "n"],
                        [[LABELS[k], iv.text(), str(iv.n)] for k, iv in r.specific.items()]), ""]
    return md


def stability(r: StabilityResult, abl: AblationResult) -> list[str]:
    """The split-half overlaps, the half sets' ablations, and a reading computed from them."""
    md = ["### Stability of the neuron set (split halves of the identify data)", "",
          f"Each category's identify pairs split at random into two disjoint subsets, each scored and selected "
          f"alone ({r.count} of {r.total:,} neurons, the full run's rule); Jaccard = |A ∩ B| / |A ∪ B|. Two random "
          f"sets of {r.count} would overlap by {r.chance:.3f}. The full run used {r.pairs} pairs per category.", ""]
    if not r.splits:
        return md + ["n/a: the identify data is too small to split (each subset needs >= 2 pairs per category).", ""]
    rows = [[f"{100 * s.fraction:g} %", str(s.pairs), f"{s.jaccard:.3f}",
             f"{s.jaccard_full[0]:.3f} / {s.jaccard_full[1]:.3f}"] for s in r.splits]
    md += [md_table(["data per subset", "pairs per category", "Jaccard(A, B)", "A, B vs the full set"], rows), ""]
    if r.intervals:
        coco = (abl.intervals or {}).get("coco", {}).get("success_rate")
        cells = [[f"subset {side.upper()} ({100 * r.splits[0].fraction:g} %)", iv.text(), str(iv.n)]
                 for side, iv in r.intervals.items()]
        if coco is not None:
            cells.append(["full set (the ablation above)", coco.text(), str(coco.n)])
        md += [f"Each subset's set ablated (test split, limit {r.limit or 'all'} documents per category), success "
               "rate Δ vs base [95 %]:", "", md_table(["set ablated", "Δ success rate", "n"], cells), ""]
    return md + [f"Reading: {stability_reading(r)}.", ""]


def stability_reading(r: StabilityResult) -> str:
    """What the overlaps (and the half ablations) say, by fixed thresholds stated in the text."""
    top = r.splits[0]
    ratio = top.jaccard / r.chance if r.chance > 0 else float("inf")
    if ratio >= 10:
        text = f"the two halves share far more neurons than chance ({top.jaccard:.3f}, {ratio:.0f}x chance)"
    elif ratio >= 2:
        text = f"the halves overlap above chance but weakly ({top.jaccard:.3f}, {ratio:.1f}x chance)"
    else:
        text = f"the halves overlap no more than chance ({top.jaccard:.3f}): the selection is mostly sampling"
    if len(r.splits) > 1:
        small = r.splits[-1]
        rising = top.jaccard > small.jaccard
        text += (f"; the overlap {'rises' if rising else 'does not rise'} from {small.pairs} to {top.pairs} pairs "
                 f"per category ({small.jaccard:.3f} -> {top.jaccard:.3f})"
                 + (", so more identify data would still change the set" if rising else ""))
    if r.intervals:
        below = [s.upper() for s, iv in r.intervals.items() if iv.hi is not None and iv.hi < 0]
        text += ("; both halves' sets lower the success rate when ablated (intervals below 0): the effect "
                 "reproduces from independent data" if len(below) == len(r.intervals) else
                 "; ablating the halves' sets lowers the success rate beyond noise for "
                 + (", ".join(below) or "neither"))
    return text


METRIC_NAMES = {"success_rate": "success rate", "acc_disambig": "acc (disambig.)", "abs_bias_ambig": "|s_AMB|",
                "bias_disambig": "s_DIS"}


def _interval_name(key: str, bench: Benchmark | None) -> str:
    metric, _, group = key.partition(":")
    name = METRIC_NAMES.get(metric, metric) if bench is None else bench.metric(metric).label
    return f"{name}, {group}" if group else name


def intervals_table(title: str, runs: dict[str, dict[str, Interval]], bench: Benchmark | None = None) -> list[str]:
    """metric rows x run columns of "Δ [lo, hi] (n)" (bench: names the rows by its metrics' labels)."""
    if not runs:
        return []
    metrics = [k for k in next(iter(runs.values()))]
    rows = [[_interval_name(k, bench)] + [f"{iv[k].text()} (n={iv[k].n})" if k in iv else "n/a"
                                          for iv in runs.values()] for k in metrics]
    return [f"{title}:", "", md_table(["metric", *runs], rows), ""]


def ablation_reading(r: AblationResult) -> str:
    """How ablating each set moved the overall success rate."""
    base = r.base.get("success_rate")

    def change(s):
        v = s.get("success_rate")
        return None if _missing(v) or _missing(base) else v - base

    coco = change(r.coco)
    if coco is None:
        return "n/a (success rates undefined)"
    others = [f"{LABELS[k]} {'n/a' if change(s) is None else f'{change(s):+.3f}'}" for k, s in r.baselines().items()]
    return (f"ablating COCO changed the success rate by {coco:+.3f}"
            + (f"; the baselines by {', '.join(others)}" if others else ""))


def sweep(r: SweepResult) -> list[str]:
    """Every rung's rows: Δ vs the base at that rung with paired intervals, KL, admissible, chosen."""
    selected = {c.key for c in r.chosen.values() if c.key is not None}
    rows = [[label(row.arm), row.params, str(row.limit or "all"), row.bias.text() if row.bias else "n/a",
             row.acc.text() if row.acc else "n/a", row.delta.text() if row.delta else "n/a", fmt(row.kl, 4),
             "yes" if row.admissible else "no",
             "**selected**" if row.key in selected and row.rung == len(r.limits) - 1 else ""] for row in r.rows]
    return (["### Sweep (validate split): constrained, by successive halving", "",
             f"Rungs of {', '.join(str(x or 'all') for x in r.limits)} stereo_coco documents per category: every "
             "candidate at the first, the best third of each arm (admissible first, then by Δ|s_AMB|) at the next. "
             f"Admissible: Δ acc_disambig >= -{r.floors['acc_disambig']:g} and KL <= {r.floors['kl']:g} nats per token "
             f"on {r.neutral_limit} validate neutral passages (point estimates); chosen: the lowest Δ|s_AMB| among "
             "the admissible at the last rung. Δ: vs the base at the same rung, paired 95 % intervals.", "",
             md_table(["edit", "hyperparameters", "docs", "Δ|s_AMB|", "Δ acc_disambig", "Δ success rate", "KL",
                       "admissible", ""], rows), ""]
            + [f"- {label(e)}: {c.note}." for e, c in r.chosen.items()] + [""])


def _edit_labels(r: FinalResult) -> list[str]:
    return [label(k) for k in r.edits]


def benchmark(bench: Benchmark, r: FinalResult, cats, png: Path) -> list[str]:
    """One benchmark of the final stage, as its declaration describes it: its (group, metric) rows for
    base and the chosen edits, the paired intervals, its figure."""
    runs = [x.summaries[bench.name] for x in r.edits.values()]
    base = r.base.summaries[bench.name]
    rows = [vs_base([group, bench.metric(key).label, str(base.docs.get(group, ""))], base.get(key, group),
                    [x.get(key, group) for x in runs]) for group, key in bench.rows(cats)]
    limit = r.limits[bench.name]
    ivs = {label(k): x.intervals[bench.name] for k, x in r.edits.items() if x.intervals and x.intervals[bench.name]}
    return ([f"### Final, {bench.title} (test split)", "",
             f"{bench.about} lm-eval limit {limit or 'all'} documents per task; n/a = no document of that condition "
             "in the sample.", "",
             md_table(["group", "metric", "docs", "base"] + _edit_labels(r), rows), ""]
            + intervals_table("Δ vs base with its paired 95 % interval over test items (n items)", ivs, bench)
            + figure(bench.name, png))


def edited_models(r: FinalResult, final_dir: Path, swept) -> list[str]:
    """Where the chosen edits are; `swept`: the edit kinds the sweep chose among."""
    missing = [label(e) for e in swept if e not in r.edits]
    md = [f"No final evaluation for {', '.join(missing)}: no such candidate in the sweep.", ""] if missing else []
    return md + [f"Edited models: `{final_dir}/models/` (the NE gate: an NE-COCO directory for `vllm serve` with the "
                 "vllm-coco plugin; every other kind: a baked checkpoint).", ""]
