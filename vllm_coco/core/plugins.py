"""Entry points of installed packages that extend vllm-coco (docs/EXTENDING.md).

Two groups: `vllm_coco.edit_kinds` (edit/registry.py) and `vllm_coco.benchmarks`
(experiment/benchmarks.py). Each registry loads its group once, when first imported.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from importlib.metadata import entry_points


def load_group(group: str, what: str, add: Callable[[object], None]) -> None:
    """`add(obj)` for every entry point of `group`. A broken one is skipped with one line on stderr:
    a plugin's bug must not take the built-in ones down with it."""
    for ep in entry_points(group=group):
        try:
            add(ep.load())
        except Exception as exc:  # a plugin's bug, reported and skipped
            print(f"vllm-coco: {what} plugin {ep.name} ({ep.value}) skipped: {type(exc).__name__}: {exc}",
                  file=sys.stderr)
