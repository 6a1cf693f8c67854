"""Typed results of the experiment's stages (`coco-tools run`) and the metric lists they read.

Every stage of experiment/pipeline.py returns one of these frozen dataclasses. Its done.json holds
`result.to_json()` (plain JSON) and a reused stage reads it back with `cls.from_json()`: the same
object (tests/test_pipeline.py checks the round trip of each class). A value that is not a number
(a metric lm-eval left out, a rate over no documents) is None, never NaN, so done.json stays strict
JSON and a round trip compares equal. lm-eval's results dict is read only through
vllm_coco.tasks.results (`metric`, `docs`).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

from vllm_coco.tasks import results as lm_results

LABELS = {"coco": "COCO", "rand": "RAND", "norm": "NORM", "mact": "MACT"}  # neuron sets

T = TypeVar("T")


# --------------------------------------------------------------------------- JSON plumbing

def num(v) -> float | None:
    """A float, or None for a missing value or NaN."""
    if v is None or isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return None if math.isnan(v) else float(v)


def _decode(tp, v):
    """v (from JSON) as type tp: dataclasses via their from_json, dict / list / X | None by parts."""
    if v is None:
        return None
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        (inner,) = [a for a in args if a is not type(None)]
        return _decode(inner, v)
    if origin is dict:
        return {k: _decode(args[1], x) for k, x in v.items()}
    if origin is list:
        return [_decode(args[0], x) for x in v]
    if dataclasses.is_dataclass(tp):
        return tp.from_json(v)
    return num(v) if tp is float else v


class Json:
    """to_json(): the fields as plain JSON (nested results too); from_json(): the inverse."""

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict):
        hints = typing.get_type_hints(cls)
        return cls(**{f.name: _decode(hints[f.name], data.get(f.name)) for f in dataclasses.fields(cls)})


@dataclass(frozen=True)
class Interval(Json):
    """A paired difference over `n` shared items: the point estimate on all of them (delta) and its
    95 % percentile bootstrap interval [lo, hi] over `rounds` resamples in which the statistic was
    defined (None: undefined on every one). up / down: items whose own value rose / fell."""
    n: int
    delta: float | None
    lo: float | None
    hi: float | None
    up: int
    down: int
    rounds: int

    def text(self, digits: int = 3) -> str:
        """"+0.120 [+0.050, +0.190]" ("n/a" where undefined)."""
        if self.delta is None or self.lo is None:
            return "n/a"
        return f"{self.delta:+.{digits}f} [{self.lo:+.{digits}f}, {self.hi:+.{digits}f}]"


@dataclass(frozen=True)
class Stage(Generic[T]):
    """A finished stage: its typed result, where it lives, the hash of its inputs, its compute time
    (when it was computed; a reused stage reports the time it took then)."""
    result: T
    dir: Path
    hash: str
    seconds: float


# --------------------------------------------------------------------------- identify, baselines

@dataclass(frozen=True)
class Significance(Json):
    """neurons.json "significance": the label-permutation null (null_best_score None: not computed)."""
    null: str | None
    rounds: int
    null_best_score: float | None
    beat_null: int | None


@dataclass(frozen=True)
class CategoryNeurons(Json):
    """neurons.json "per_category"[c] without its neuron list. pairs: response mode; biased /
    unknown: answers in behavior mode."""
    count: int
    null_best_score: float | None = None
    beat_null: int | None = None
    pairs: int | None = None
    biased: int | None = None
    unknown: int | None = None


@dataclass(frozen=True)
class IdentifyResult(Json):
    """The COCO neurons (stage directory / `neurons`) and what the report says of them."""
    neurons: str
    count: int
    by_proj: dict[str, int]
    num_neurons: int
    pairs: int | None
    contrast: str
    answers: dict[str, dict[str, int]] | None  # behavior mode: {category: {answered, biased, unknown, other}}
    significance: Significance
    per_category: dict[str, CategoryNeurons]
    timing_s: dict[str, float]
    baseline: str = "coco"  # the selection rule (a set of the sets stage may be diffmean)
    abstention_removed: int | None = None  # neurons the abstention filter left out (None: no filter)

    @classmethod
    def from_meta(cls, meta: dict, neurons: str = "neurons") -> IdentifyResult:
        """From a neurons.json."""
        sel, data, sig = meta["selection"], meta["data"], meta["significance"]
        per_cat = {c: CategoryNeurons(**{f.name: pc.get(f.name) for f in dataclasses.fields(CategoryNeurons)})
                   for c, pc in meta["per_category"].items()}
        return cls(neurons=neurons, count=sel["count"], by_proj=dict(sel["by_proj"]),
                   num_neurons=meta["model"]["num_neurons"], pairs=data.get("pairs"), contrast=data["contrast"],
                   answers=data.get("answers"), significance=Significance.from_json(sig), per_category=per_cat,
                   timing_s=dict(meta["timing_s"]), baseline=sel.get("baseline", "coco"),
                   abstention_removed=sel.get("abstention_removed"))


@dataclass(frozen=True)
class BaselineSet(Json):
    """One control set (stage directory / `neurons`) with the COCO set's count."""
    neurons: str
    count: int
    by_proj: dict[str, int]


@dataclass(frozen=True)
class BaselinesResult(Json):
    """The control sets by name (rand, norm, mact), in the config's order."""
    sets: dict[str, BaselineSet]


@dataclass(frozen=True)
class SetsResult(Json):
    """The config's named neuron sets (stage directory / name), in its order (config `sets`)."""
    sets: dict[str, IdentifyResult]


# --------------------------------------------------------------------------- evaluation summaries

def _weighted(results: dict, tasks, metric: str) -> float | None:
    """Doc-weighted mean of a metric over tasks (as lm-eval's weight_by_size groups); None when no
    task has a value."""
    total = weight = 0.0
    for t in tasks:
        v, n = num(lm_results.metric(results, t, metric)), lm_results.docs(results, t)
        if v is not None and n:
            total, weight = total + v * n, weight + n
    return total / weight if weight else None


@dataclass(frozen=True)
class GroupSummary(Json):
    """values: metric -> {group | "all": value}; docs: group | "all" -> documents evaluated.
    "all" is the document-weighted mean (values) and the sum (docs) over the groups."""
    values: dict[str, dict[str, float | None]]
    docs: dict[str, int]

    def get(self, metric: str, group: str = "all") -> float | None:
        return self.values[metric].get(group)

    @classmethod
    def from_lm(cls, results: dict, tasks: dict[str, str], metrics) -> GroupSummary:
        """tasks: group -> lm-eval task name (benchmarks.Benchmark.summarize passes its own)."""
        values = {m: {**{g: num(lm_results.metric(results, t, m)) for g, t in tasks.items()},
                      "all": _weighted(results, tasks.values(), m)} for m in metrics}
        docs = {g: lm_results.docs(results, t) for g, t in tasks.items()}
        return cls(values=values, docs={**docs, "all": sum(docs.values())})


# --------------------------------------------------------------------------- ablation

@dataclass(frozen=True)
class AblationResult(Json):
    """stereo_coco on the test split: the base model, and each neuron set ablated by `mode` (the first
    of config ablation.modes; `also`: the others). sets: COCO first, then the baselines in the
    config's order."""
    mode: str
    limit: int | None
    split: str
    base: GroupSummary
    sets: dict[str, GroupSummary]
    # set -> metric (stats.METRIC_STATS) -> paired interval of set - base, over test items
    intervals: dict[str, dict[str, Interval]] | None = None
    # baseline -> interval of Δ_COCO - Δ_baseline (success rate): the specificity claim
    specific: dict[str, Interval] | None = None
    # every further ablation kind of config ablation.modes -> the same check under it (same base)
    also: dict[str, AblationResult] = dataclasses.field(default_factory=dict)

    @property
    def coco(self) -> GroupSummary:
        return self.sets["coco"]

    def baselines(self) -> dict[str, GroupSummary]:
        """The control sets (every set but COCO), in the config's order."""
        return {k: v for k, v in self.sets.items() if k != "coco"}


# --------------------------------------------------------------------------- stability

@dataclass(frozen=True)
class HalfSplit(Json):
    """Two disjoint subsets of the identify data (identify/stability.py), each scored and selected
    alone with the full run's options."""
    fraction: float  # share of every category's contrast units in each subset
    pairs: int  # units (response mode: pairs) per category in each subset, the smallest category's
    jaccard: float  # overlap of the two subsets' selections
    jaccard_full: list[float]  # each subset's selection vs the full run's
    neurons: list[str]  # the two artifacts, relative to the stage directory


@dataclass(frozen=True)
class StabilityResult(Json):
    """Split-half stability of the COCO set, and (ablate) the causal check of each half's set."""
    count: int  # neurons per selection
    total: int  # q/k/v neurons of the model
    pairs: int  # units per category of the full identify run (the smallest category's)
    chance: float  # Jaccard of two random sets of `count` of `total` neurons
    splits: list[HalfSplit]  # largest fraction first
    limit: int | None = None  # stereo_coco documents per category of the half-set ablations
    ablated: dict[str, GroupSummary] | None = None  # "a" / "b": the largest split's halves ablated (test)
    intervals: dict[str, Interval] | None = None  # "a" / "b": success rate Δ vs base, paired over test items


# --------------------------------------------------------------------------- sweep

@dataclass(frozen=True)
class Candidate(Json):
    """One edit of the sweep grid: an edit kind and its settings (edit/registry.py; the NE gate
    included), on the top `ratio` share of neurons (a linear kind: of all q/k/v neurons by COCO loss;
    the gate: of q and v neurons by |direction|) of the identify stage's set, or on a named set of the
    sets stage (`set`, at its own share: the arm KIND@SET of sweep.edits)."""
    key: str
    edit: str
    settings: dict[str, float]
    ratio: float | None = None  # None: the artifact's own share
    set: str | None = None  # None: the identify stage's set (config `sets` names the others)

    @property
    def arm(self) -> str:
        """The sweep.edits key this candidate belongs to: its kind, or KIND@SET."""
        return self.edit if self.set is None else f"{self.edit}@{self.set}"

    @property
    def params(self) -> str:
        share = [] if self.ratio is None else [f"share={100 * self.ratio:g} %"]
        return ", ".join(share + [f"{k}={v:g}" for k, v in self.settings.items()]) or "-"

    def spec(self) -> dict:
        """What makes the edit (a step's hash input)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


@dataclass(frozen=True)
class SweepRow(Json):
    """One model scored on the validate split at one rung of the successive halving: a candidate
    edit, or the base model (candidate None). limit: stereo_coco documents per category of its rung.
    delta / bias / acc: success rate, |s_AMB| and acc_disambig minus the base's at the same rung,
    paired over items (None: the base row); kl: KL(base || edit) per token on the validate neutral
    passages (0 for the base)."""
    candidate: Candidate | None
    rung: int
    limit: int | None
    success_rate: float | None
    acc_disambig: float | None
    abs_bias_ambig: float | None
    kl: float | None
    admissible: bool
    per_category: dict[str, float | None]  # success rate
    delta: Interval | None = None
    bias: Interval | None = None
    acc: Interval | None = None

    @property
    def key(self) -> str:
        return "base" if self.candidate is None else self.candidate.key

    @property
    def edit(self) -> str:
        return "base" if self.candidate is None else self.candidate.edit

    @property
    def arm(self) -> str:
        return "base" if self.candidate is None else self.candidate.arm

    @property
    def params(self) -> str:
        return "-" if self.candidate is None else self.candidate.params

    @classmethod
    def score(cls, cand: Candidate | None, rung: int, limit: int | None, stereo: GroupSummary, kl: float | None,
              deltas: dict[str, Interval] | None = None) -> SweepRow:
        """deltas: "success_rate", "abs_bias_ambig", "acc_disambig" vs the base (None: the base row);
        `admissible` is set by the sweep's rule afterwards (sweep.admissible)."""
        d = deltas or {}
        return cls(candidate=cand, rung=rung, limit=limit, success_rate=stereo.get("success_rate"),
                   acc_disambig=stereo.get("acc_disambig"), abs_bias_ambig=stereo.get("abs_bias_ambig"), kl=kl,
                   admissible=cand is None, per_category={c: v for c, v in stereo.values["success_rate"].items()
                                                          if c != "all"},
                   delta=d.get("success_rate"), bias=d.get("abs_bias_ambig"), acc=d.get("acc_disambig"))


@dataclass(frozen=True)
class Choice(Json):
    """The sweep's pick for one arm (key None: the grid has no candidate of that arm)."""
    key: str | None
    admissible: bool
    beats_base: bool
    note: str


@dataclass(frozen=True)
class SweepResult(Json):
    """The base model and every candidate on the validate split, rung by rung (successive halving);
    chosen: edit kind -> Choice. limits: documents per category of each rung; floors: the admissibility
    rule's (acc_disambig: the largest fall, kl: the largest KL)."""
    split: str
    limits: list[int | None]
    neutral_limit: int | None
    floors: dict[str, float]
    base: SweepRow
    rows: list[SweepRow]
    chosen: dict[str, Choice]  # arm (sweep.edits key) -> its pick

    @property
    def limit(self) -> int | None:
        return self.limits[-1]

    def chosen_row(self, edit: str) -> SweepRow | None:
        key = self.chosen[edit].key
        rows = [r for r in self.rows if r.key == key]
        return max(rows, key=lambda r: r.rung) if rows else None


# --------------------------------------------------------------------------- final

@dataclass(frozen=True)
class FinalRun(Json):
    """One model on the test split. model: its directory under the final stage (None: the base).
    summaries: benchmark (experiment/benchmarks.py) -> its groups' metrics; intervals: benchmark ->
    its comparisons with the base, paired over test items (Benchmark.intervals; None for the base)."""
    params: str
    model: str | None
    summaries: dict[str, GroupSummary]
    intervals: dict[str, dict[str, Interval]] | None = None

    @property
    def stereo(self) -> GroupSummary:
        """The primary benchmark's summary (benchmarks.PRIMARY: every final stage runs it)."""
        return self.summaries["stereo"]

    def interval(self, bench: str, key: str) -> Interval | None:
        return (self.intervals or {}).get(bench, {}).get(key)


@dataclass(frozen=True)
class Versus(Json):
    """One COCO arm against one steering arm (experiment/versus.py): (Δ_coco - Δ_steer) per metric,
    paired over the test items all three runs share."""
    coco: str
    baseline: str
    diffs: dict[str, Interval]


@dataclass(frozen=True)
class FinalResult(Json):
    """Base and each edit kind's chosen candidate on the test split (a kind whose sweep had no
    candidate is absent), in the sweep's order. limits: benchmark -> lm-eval documents per task, in
    the order the benchmarks ran."""
    split: str
    limits: dict[str, int | None]
    base: FinalRun
    edits: dict[str, FinalRun]
    versus: list[Versus] = dataclasses.field(default_factory=list)  # COCO arms vs steering arms

    def runs(self) -> dict[str, FinalRun]:
        """base, then the edited runs present."""
        return {"base": self.base, **self.edits}


# --------------------------------------------------------------------------- report, per model

@dataclass(frozen=True)
class ReportResult(Json):
    report: str
    figures: list[str]


@dataclass(frozen=True)
class ParityResult(Json):
    """A twin model (same weights, another architecture class) against its reference: identify at a
    small size and the stereo_coco option log-likelihoods of base and NE-COCO, compared number by number."""
    reference: str  # the reference model's name
    identify_limit: int
    limit: int  # stereo_coco documents per category
    tolerance: float
    max_abs_score: float  # over every neuron's COCO score
    same_selection: bool
    selected: int
    docs: int  # documents compared per condition
    max_abs_loglik: dict[str, float]  # condition (base, ne) -> max |Δ| of an option's log-likelihood

    @property
    def identical(self) -> bool:
        return (self.same_selection and self.max_abs_score <= self.tolerance
                and all(v <= self.tolerance for v in self.max_abs_loglik.values()))


@dataclass(frozen=True)
class ModelResults:
    """Every stage of one model, as the report reads them."""
    name: str
    path: str
    identify: Stage[IdentifyResult]
    baselines: Stage[BaselinesResult]
    ablation: Stage[AblationResult]
    sweep: Stage[SweepResult]
    final: Stage[FinalResult]
    stability: Stage[StabilityResult] | None = None  # None: stability.fractions is empty
    sets: Stage[SetsResult] | None = None  # None: config `sets` is empty

    def stages(self) -> dict[str, Stage]:
        names = ("identify", "baselines", "ablation", "stability", "sets", "sweep", "final")
        return {s: getattr(self, s) for s in names if getattr(self, s) is not None}
