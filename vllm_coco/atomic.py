"""Atomic output directories: write into a temp dir beside the target, then rename."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import CocoError


def check_output_dir(out: str | os.PathLike, force: bool, sources: tuple = ()) -> Path:
    """Validate an output directory before any work starts (raises CocoError)."""
    out = Path(out).absolute()
    for src in sources:
        src = Path(src).absolute()
        if out == src or src in out.parents or out in src.parents:
            raise CocoError(f"--out {out} overlaps the input directory {src}; choose a separate output path")
    if out.exists() and not force:
        raise CocoError(f"output {out} already exists; pass --force to replace it or choose another --out")
    if out.exists() and not out.is_dir():
        raise CocoError(f"output {out} exists and is not a directory; remove it or choose another --out")
    if not out.parent.exists():
        raise CocoError(f"parent directory of --out does not exist: {out.parent}")
    return out


@contextlib.contextmanager
def atomic_output_dir(out: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that becomes `out` only if the block finishes.

    On any exception (including KeyboardInterrupt) the temporary directory is removed and
    `out` is left exactly as it was.
    """
    out = check_output_dir(out, force)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; the result should look like a normal mkdir
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():  # --force: swap the old directory out, then delete it
        trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, trash / "old")
        os.replace(tmp, out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, out)


def save_figure(fig, path: str | os.PathLike, dpi: int = 120) -> None:
    """Save a matplotlib figure to `path` atomically (temp file beside it, then rename) and close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=dpi)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.remove(tmp)
