"""Where the lm-eval task folder (the repository's evals/) is, in a checkout and in an install.

The folder is shipped inside the package as `vllm_coco/tasks/evals`: in the repository that path
is a symlink to ../../evals (so `lm_eval --include_path evals` and the package read the same
files), and a built wheel carries a real copy (pyproject.toml [tool.setuptools.package-data]).
$COCO_EVALS_DIR points `coco-tools eval` at another copy.
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from vllm_coco.core.errors import CocoError

EVALS_ENV = "COCO_EVALS_DIR"
MARKER = Path("stereo_coco") / "_stereo_coco.yaml"  # a file every vllm-coco task folder has
PACKAGED = Path(__file__).resolve().parent / "evals"  # symlink (checkout) or folder (wheel)
REPO = Path(__file__).resolve().parents[2] / "evals"  # a checkout whose symlink was not kept


def evals_dir() -> Path:
    """The lm-eval task folder: $COCO_EVALS_DIR, else the one shipped with the package (in a
    checkout: the repository's evals/, resolved through the symlink)."""
    env = os.environ.get(EVALS_ENV)
    if env:
        path = Path(env).expanduser()
        if not (path / MARKER).is_file():
            raise CocoError(f"{EVALS_ENV}={env} is not the vllm-coco evals directory (no {MARKER.as_posix()}); "
                            "unset it or point it at the repository's evals/")
        return path.absolute()
    for path in (PACKAGED, REPO):
        if (path / MARKER).is_file():
            return path.resolve()
    raise CocoError(f"cannot find the vllm-coco evals directory (looked for {PACKAGED} and {REPO}); "
                    f"reinstall vllm-coco or set {EVALS_ENV}=/path/to/evals")


class _IgnoreTags(yaml.SafeLoader):
    """YAML loader that reads `!function x.y` as a plain string (no imports while indexing)."""


_IgnoreTags.add_multi_constructor("!", lambda loader, suffix, node: loader.construct_scalar(node))


def local_tasks(evals: Path) -> dict[str, list[str]]:
    """Task and group names defined under `evals`: {name: children} ([] for a task)."""
    out = {}
    for path in sorted(evals.rglob("*.yaml")):
        cfg = yaml.load(path.read_text(encoding="utf-8"), Loader=_IgnoreTags) or {}
        if "group" in cfg:
            children = cfg.get("task") or []
            out[cfg["group"]] = [c if isinstance(c, str) else c.get("task") or c.get("group") for c in
                                 (children if isinstance(children, list) else [children])]
        elif isinstance(cfg.get("task"), str):
            out[cfg["task"]] = []
    return out
