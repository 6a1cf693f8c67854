"""The edit kinds this process knows, by name (docs/METHOD.md §6-§7; docs/EXTENDING.md).

The built-in linear kinds (edit/kinds/) come first, in the order below; `register` adds one, and
every installed package's entry point in the group `vllm_coco.edit_kinds` (loading to a LinearKind)
is registered when this module is first imported, so `coco-tools bake --mode KIND` and a run
config's sweep take it. The CLI's choices (`bake --mode`, `ne --with`), the config's ablation modes and
sweep grid, and the experiment's report read this list, so a registered kind is usable everywhere
at once. The NE gate (edit/kinds/ne.py) is the one nonlinear kind: `gate()`.
"""

from __future__ import annotations

import re

from vllm_coco.core.errors import CocoError
from vllm_coco.core.names import BASE_EDIT, NE_EDIT
from vllm_coco.core.plugins import load_group
from vllm_coco.edit.kind import GateKind, LinearKind
from vllm_coco.edit.kinds import ablate_mean, ablate_zero, le, ne, steer

_BUILT_IN = (le.KIND, ablate_zero.KIND, ablate_mean.KIND, steer.KIND)
_KINDS: dict[str, LinearKind] = {k.name: k for k in _BUILT_IN}
_NAME = re.compile(r"^[a-z][a-z0-9-]{0,31}$")  # a CLI choice, a config value and a checkpoint key part


def register(kind: LinearKind, replace: bool = False) -> LinearKind:
    """Add `kind` to the registry (`replace`: over a kind of the same name). Returns it."""
    if not isinstance(kind, LinearKind):
        raise TypeError(f"an edit kind is an edit.kind.LinearKind, not {type(kind).__name__}")
    if not _NAME.match(kind.name) or kind.name in (BASE_EDIT, NE_EDIT):
        raise ValueError(f"edit kind name {kind.name!r}: lower-case letters, digits and '-', "
                         f"not {BASE_EDIT!r} or {NE_EDIT!r}")
    if kind.name in _KINDS and not replace:
        raise ValueError(f"an edit kind named {kind.name!r} is registered already (pass replace=True)")
    _KINDS[kind.name] = kind
    return kind


def unregister(name: str) -> None:
    """Remove a kind registered with `register` (the built-in ones stay)."""
    if name in {k.name for k in _BUILT_IN}:
        raise ValueError(f"{name!r} is built in")
    _KINDS.pop(name, None)


def get(name: str, mode_word: str = "mode") -> LinearKind:
    """The kind named `name`; CocoError listing the known ones otherwise."""
    if name not in _KINDS:
        raise CocoError(f"unknown edit {mode_word} {name}; choose one of {', '.join(_KINDS)}")
    return _KINDS[name]


def names() -> tuple[str, ...]:
    """Every kind's name, built-in first."""
    return tuple(_KINDS)


def ablations() -> tuple[str, ...]:
    """The kinds the experiment's causal check may run (`ablation: true`)."""
    return tuple(name for name, k in _KINDS.items() if k.ablation)


def gate() -> GateKind:
    """The NE-COCO gate."""
    return ne.KIND


def any_kind(name: str, where: str = "edit") -> LinearKind | GateKind:
    """A linear kind or the gate, by name; CocoError listing both otherwise."""
    if name == ne.KIND.name:
        return ne.KIND
    if name not in _KINDS:
        raise CocoError(f"unknown {where} {name}; choose one of {', '.join((*_KINDS, ne.KIND.name))}")
    return _KINDS[name]


def enhancements() -> tuple[str, ...]:
    """The kinds an experiment may sweep and choose (every kind but the ablations)."""
    return (*(name for name, k in _KINDS.items() if not k.ablation), ne.KIND.name)


def label(name: str) -> str:
    """The report's name of a kind ("base": the unedited model; a kind not registered in this
    process, as in stored results: its name); KIND@SET (an experiment's arm: the kind on a named
    neuron set) -> "<kind's label> [SET]"."""
    name, _, where = name.partition("@")
    suffix = f" [{where}]" if where else ""
    if name == BASE_EDIT:
        return BASE_EDIT + suffix
    return (ne.KIND.label if name == ne.KIND.name else _KINDS[name].label if name in _KINDS else name) + suffix


ENTRY_POINTS = "vllm_coco.edit_kinds"


def _add_installed(kind) -> None:
    if kind.name not in _KINDS or _KINDS[kind.name] is not kind:
        register(kind)


def load_entry_points() -> None:
    """Register the edit kinds installed packages declare (group ENTRY_POINTS, core/plugins.py)."""
    load_group(ENTRY_POINTS, "edit kind", _add_installed)


load_entry_points()
