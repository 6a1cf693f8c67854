"""The one reader of lm-eval's results dict: metric values and document counts by task.

lm-eval keys a metric as "<metric>,<filter>" ("success_rate,none"); plain-keyed files (older or
hand-made) are read too. A value that is not a number (a missing metric, "N/A") reads as None.
"""

from __future__ import annotations

FILTER = "none"


def metric(results: dict, task: str, name: str) -> float | None:
    """The value of metric `name` of `task` (filter "none"), or None."""
    entry = (results.get("results") or {}).get(task) or {}
    value = entry.get(f"{name},{FILTER}", entry.get(name))
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def docs(results: dict, task: str) -> int:
    """How many documents of `task` were evaluated (after --limit)."""
    n = (results.get("n-samples") or {}).get(task) or {}
    return int(n.get("effective") or n.get("original") or 0)
