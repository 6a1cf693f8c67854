"""The sweep's grid of candidate edits and its selection rule (pure: no model, no evaluation)."""

from __future__ import annotations

import itertools
import math

from vllm_coco.edit.registry import label
from vllm_coco.experiment.results import Candidate, Choice, SweepRow


def candidates(sw: dict, identify_ratio: float) -> list[Candidate]:
    """The config's sweep section as candidates: for each neuron share (sweep.ratio; null: the
    identify share), each edit kind of sweep.edits in order, every combination of its settings."""
    out = []
    for r in sw["ratio"] or [identify_ratio]:
        for kind, grid in sw["edits"].items():
            names = list(grid)
            short = [n[0] for n in names] if len({n[0] for n in names}) == len(names) else names
            for values in itertools.product(*grid.values()):
                key = f"{kind}-r{r:g}" + "".join(f"-{k}{v:g}" for k, v in zip(short, values))
                out.append(Candidate(key=key, edit=kind, settings=dict(zip(names, values)), ratio=r))
    return out


def shares(sw: dict, identify_ratio: float) -> list[float]:
    """The neuron shares the sweep covers."""
    return list(sw["ratio"] or [identify_ratio])


def admissible(retention: float | None, base_retention: float | None, floor: float) -> bool:
    """A candidate keeps retention accuracy within `floor` of the base model's."""
    return (retention is not None and base_retention is not None
            and retention >= base_retention - floor - 1e-12)


def _rate(v: float | None) -> float:
    return -math.inf if v is None or math.isnan(v) else v


def choose(rows: list[SweepRow], base: SweepRow, edit: str) -> Choice:
    """The best admissible candidate of one edit kind: highest validate success rate; ties go to
    the higher retention, then the earlier (gentler) candidate. None admissible: the one with the
    highest retention, flagged."""
    mine = [r for r in rows if r.edit == edit]
    if not mine:
        return Choice(key=None, admissible=False, beats_base=False, note=f"no {label(edit)} candidate")
    ok = [r for r in mine if r.admissible]
    if ok:
        best = max(ok, key=lambda r: (_rate(r.success_rate), _rate(r.retention), -mine.index(r)))
        beats = _rate(best.success_rate) > _rate(base.success_rate)
        note = (f"best admissible {label(edit)} ({best.params}) "
                + ("beats the base model on validate" if beats else
                   "does not beat the base model on validate: no candidate improved the success rate"))
        return Choice(key=best.key, admissible=True, beats_base=beats, note=note)
    best = max(mine, key=lambda r: (_rate(r.retention), _rate(r.success_rate), -mine.index(r)))
    return Choice(key=best.key, admissible=False, beats_base=_rate(best.success_rate) > _rate(base.success_rate),
                  note=f"no {label(edit)} candidate keeps retention within the floor; kept the one with the "
                       f"highest retention ({best.params}) for the final evaluation")
