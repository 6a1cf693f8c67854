"""COCO against the steering baseline, side by side (docs/METHOD.md §8.10).

Every COCO arm of the final stage (an LE / NE edit of a COCO set) is compared with every steering arm
(the `steer` kind, edit/kinds/steer.py) on the same test items: the paired interval of
(Δ_COCO - Δ_steer) of BBQ's |s_AMB| (and of acc_disambig and the success rate, for the table), and
whether each keeps disambiguated accuracy and KL on neutral text within their declared floors. The
claim "COCO beats the steering baseline at equal retention" is judged from those alone.
"""

from __future__ import annotations

from vllm_coco.experiment import stats
from vllm_coco.experiment.benchmarks import NEUTRAL, STEREO
from vllm_coco.experiment.results import FinalRun, Versus
from vllm_coco.experiment.sweep import within_floors as _within

STEERING_KIND = "steer"
METRICS = ("abs_bias_ambig", "acc_disambig", "success_rate")  # the first decides; the others are shown


def is_steering(arm: str) -> bool:
    return arm.partition("@")[0] == STEERING_KIND


def pairs(arms) -> list[tuple[str, str]]:
    """(COCO arm, steering arm) for every pair of the final stage's arms."""
    steer = [a for a in arms if is_steering(a)]
    return [(a, b) for a in arms if not is_steering(a) for b in steer]


def compare(base: list[dict], records: dict[str, list[dict]]) -> list[Versus]:
    """Every pair's intervals from the base's and each arm's stereo records (BbqBenchmark.records)."""
    return [Versus(a, b, {m: stats.compare_diff(base, records[a], records[b], m) for m in METRICS})
            for a, b in pairs(records)]


def within_floors(run: FinalRun) -> bool | None:
    """The edit keeps acc_disambig and KL within their declared floors on test (point estimates);
    None where either was not measured."""
    acc, kl = run.interval(STEREO.name, "acc_disambig"), run.interval(NEUTRAL.name, "kl")
    if acc is None or kl is None or acc.delta is None or kl.delta is None:
        return None
    return _within(acc.delta, kl.delta, STEREO.metric("acc_disambig").floor, NEUTRAL.metric("kl").floor)


def verdict(v: Versus, coco: FinalRun, steer: FinalRun, coco_label: str, steer_label: str) -> stats.Verdict:
    """Supported if (Δ|s_AMB| COCO - Δ|s_AMB| steer) lies below 0 and both keep the floors; not
    supported if it lies above 0, or COCO breaks a floor the baseline keeps; else inconclusive."""
    bias = v.diffs["abs_bias_ambig"]
    ok_a, ok_b = within_floors(coco), within_floors(steer)
    rule = ("supported if the 95 % interval of Δ|s_AMB|(COCO) - Δ|s_AMB|(steering) lies below 0 and both edits keep "
            "Δ acc_disambig and KL on neutral text within their declared floors on test; not supported if it lies "
            "above 0, or the COCO edit breaks a floor the steering edit keeps; else inconclusive")
    refuted = (bias.lo is not None and bias.lo > 0) or (ok_a is False and ok_b is True)
    supported = bias.hi is not None and bias.hi < 0 and ok_a is True and ok_b is True
    status = stats.NOT_SUPPORTED if refuted else stats.SUPPORTED if supported else stats.INCONCLUSIVE
    floors = {True: "within", False: "outside", None: "not measured"}
    return stats.Verdict(claim=f"{coco_label} beats {steer_label} at equal retention (floors: {floors[ok_a]} / "
                         f"{floors[ok_b]})", status=status, rule=rule, evidence={"Δ|s_AMB| difference": bias})
