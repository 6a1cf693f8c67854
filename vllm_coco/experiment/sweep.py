"""The sweep's grid of candidate edits, its successive halving and its constrained selection rule
(docs/METHOD.md §8.9; pure: no model, no evaluation)."""

from __future__ import annotations

import itertools
import math

from vllm_coco.edit.registry import label
from vllm_coco.experiment.config import Sweep
from vllm_coco.experiment.results import Candidate, Choice, SweepRow


def split_arm(arm: str) -> tuple[str, str | None]:
    """A sweep.edits key -> (edit kind, neuron set or None: the identify stage's set)."""
    kind, _, where = arm.partition("@")
    return kind, where or None


def candidates(sw: Sweep, identify_ratio: float) -> list[Candidate]:
    """The config's sweep section as candidates: for each neuron share (sweep.ratio; null: the
    identify share), each edit kind of sweep.edits in order, every combination of its settings; then
    each KIND@SET arm, on its set at the set's own share."""
    out = []
    for r in sw.ratio or [identify_ratio]:
        for arm, grid in sw.edits.items():
            if split_arm(arm)[1] is None:
                out += _grid(arm, grid, f"{arm}-r{r:g}", ratio=r)
    for arm, grid in sw.edits.items():
        if split_arm(arm)[1] is not None:
            out += _grid(arm, grid, arm)
    return out


def _grid(arm: str, grid: dict[str, list[float]], prefix: str, ratio: float | None = None) -> list[Candidate]:
    kind, where = split_arm(arm)
    names = list(grid)
    short = [n[0] for n in names] if len({n[0] for n in names}) == len(names) else names
    return [Candidate(key=prefix + "".join(f"-{k}{v:g}" for k, v in zip(short, values)), edit=kind,
                      settings=dict(zip(names, values)), ratio=ratio, set=where)
            for values in itertools.product(*grid.values())]


def shares(sw: Sweep, identify_ratio: float) -> list[float]:
    """The neuron shares the sweep covers."""
    return list(sw.ratio or [identify_ratio])


def rung_limits(sw: Sweep) -> list[int | None]:
    """The validate documents per category of each rung of the successive halving: the last rung is
    sweep.limit, each earlier one 1/eta of the next (at least 6: one item of each condition)."""
    limits = [sw.limit]
    for _ in range(sw.rungs - 1):
        limits.insert(0, None if limits[0] is None else max(6, limits[0] // sw.eta))
    return limits


def within_floors(acc_delta: float | None, kl: float | None, acc_floor: float, kl_floor: float) -> bool:
    """Disambiguated accuracy within `acc_floor` of the base's and KL on neutral text within
    `kl_floor` (point estimates; docs/METHOD.md §8.9-§8.10); False where either is unmeasured."""
    return acc_delta is not None and acc_delta >= -acc_floor - 1e-12 and kl is not None and kl <= kl_floor + 1e-12


def admissible(row: SweepRow, acc_floor: float, kl_floor: float) -> bool:
    """A candidate keeps both within their floors on validate (within_floors)."""
    return within_floors(None if row.acc is None else row.acc.delta, row.kl, acc_floor, kl_floor)


def _objective(row: SweepRow) -> tuple:
    """Lower is better: Δ|s_AMB| (the bias the edit removes), then KL (the damage it does)."""
    bias = None if row.bias is None else row.bias.delta
    return (math.inf if bias is None else bias, math.inf if row.kl is None else row.kl)


def promote(rows: list[SweepRow], eta: int) -> list[str]:
    """Successive halving: of each edit kind's rows, the best 1/eta (at least one) go to the next
    rung; admissible rows first, then by the objective."""
    keep = []
    for arm in dict.fromkeys(r.arm for r in rows):
        mine = sorted((r for r in rows if r.arm == arm), key=lambda r: (not r.admissible, _objective(r)))
        keep += [r.key for r in mine[:max(1, math.ceil(len(mine) / eta))]]
    return keep


def choose(rows: list[SweepRow], edit: str) -> Choice:
    """The best admissible candidate of one arm (an edit kind, or KIND@SET) at the last rung it
    reached: the lowest Δ|s_AMB| on validate, ties to the lower KL. None admissible: the one with the
    lowest KL, flagged."""
    mine = [r for r in rows if r.arm == edit]
    if not mine:
        return Choice(key=None, admissible=False, beats_base=False, note=f"no {label(edit)} candidate")
    top = max(r.rung for r in mine)
    mine = [r for r in mine if r.rung == top]
    ok = [r for r in mine if r.admissible]
    if not ok:
        best = min(mine, key=lambda r: (math.inf if r.kl is None else r.kl, _objective(r)))
        return Choice(key=best.key, admissible=False, beats_base=False,
                      note=f"no {label(edit)} candidate keeps acc_disambig and KL within their floors; kept the one "
                           f"with the lowest KL ({best.params}) for the final evaluation")
    best = min(ok, key=_objective)
    beats = best.bias is not None and best.bias.hi is not None and best.bias.hi < 0
    note = (f"best admissible {label(edit)} ({best.params}) "
            + ("lowers |s_AMB| beyond noise on validate" if beats else
               "does not lower |s_AMB| beyond noise on validate (evaluated on test anyway, labelled so)"))
    return Choice(key=best.key, admissible=True, beats_base=beats, note=note)
