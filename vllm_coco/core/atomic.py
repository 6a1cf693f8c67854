"""Outputs: the one rule for where a command may write, and atomic writes (temp beside the
target, then rename).

The rule (`check_output_dir`), applied by every command and the pipeline before anything is
written: the path is not empty; resolved (symlinks, `..`) it is not equal to, inside, or a
parent of any input (model directory, neuron artifact, a config's model paths), nor a parent of
the current directory; it does not exist unless `force`; its nearest existing ancestor is a
writable directory. Missing parents are created at commit time and removed again if the work
fails, so a failed command leaves the filesystem as it found it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from vllm_coco.core.errors import CocoError


def resolved(path: str | os.PathLike) -> Path:
    """`path` made absolute with `~`, `..` and every symlink along it resolved."""
    return Path(path).expanduser().resolve()


def overlap(out: Path, src: Path) -> bool:
    """Whether two resolved paths are the same, or one lies inside the other."""
    return out == src or src in out.parents or out in src.parents


def _existing_ancestor(path: Path) -> Path:
    p = path
    while not p.exists():
        p = p.parent
    return p


def _outside_inputs(out, sources: tuple, what: str, kind: str) -> Path:
    """`out` resolved; CocoError if it is empty or overlaps any input (the rule both checks share)."""
    if str(out).strip() == "":
        raise CocoError(f"{what} is empty; pass the path of a {kind} to create")
    path = resolved(out)
    for src in sources:
        src = resolved(src)
        if overlap(path, src):
            raise CocoError(f"{what} {out} overlaps the input {src} (same path, inside it, or containing it); "
                            "choose an output path outside every input")
    return path


def _check_writable_ancestor(path: Path, out, what: str) -> None:
    """The nearest existing ancestor of `path` must be a directory this user can write into."""
    base = _existing_ancestor(path.parent)
    if not base.is_dir():
        raise CocoError(f"{what} {out}: {base} is a file, not a directory; choose another {what}")
    if not os.access(base, os.W_OK | os.X_OK):
        raise CocoError(f"{what} {out}: {base} is not writable; choose an output path you can write to")


def check_output_dir(out: str | os.PathLike, force: bool, sources: tuple = (), what: str = "--out",
                     merge: bool = False) -> Path:
    """Validate an output directory before any work starts; returns it resolved (CocoError if not).

    `merge`: the caller writes into an existing directory instead of replacing it (the pipeline's
    resumable output root), so it may exist and may be the current directory."""
    path = _outside_inputs(out, sources, what, "directory")
    if not merge and (path in Path.cwd().resolve().parents or path == Path.cwd().resolve()):
        raise CocoError(f"{what} {out} is the current directory or contains it; choose a new directory to create")
    if path.exists() and not path.is_dir():
        raise CocoError(f"{what} {out} exists and is not a directory; remove it or choose another {what}")
    if path.exists() and not force and not merge:
        raise CocoError(f"{what} {out} already exists; pass --force to replace it or choose another {what}")
    _check_writable_ancestor(path, out, what)
    return path


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def plain_mode(path: Path) -> None:
    """Give a file made by mkstemp (0600) the mode a plain open() would have given it."""
    os.chmod(path, 0o666 & ~umask())


def _normalize_modes(tmp: Path) -> None:
    """Files written by libraries through temp files (0600) get the user's umask, like any new file."""
    mask = umask()
    for p in tmp.rglob("*"):
        if p.is_file() and not p.is_symlink() and (p.stat().st_mode & 0o777) == 0o600:
            os.chmod(p, 0o666 & ~mask)


@contextlib.contextmanager
def made_parents(path: Path) -> Iterator[None]:
    """Create the missing parents of `path`; if the block fails, remove the ones made here."""
    made = []
    p = path.parent
    while not p.exists():
        made.append(p)
        p = p.parent
    for d in reversed(made):
        d.mkdir()
    try:
        yield
    except BaseException:
        for d in made:  # deepest first
            with contextlib.suppress(OSError):
                d.rmdir()
        raise


@contextlib.contextmanager
def atomic_output_dir(out: str | os.PathLike, force: bool = False, sources: tuple = ()) -> Iterator[Path]:
    """Yield a temporary directory that becomes `out` only if the block finishes.

    On any exception (including KeyboardInterrupt) the temporary directory and any parent made
    for it are removed, and `out` is left exactly as it was.
    """
    out = check_output_dir(out, force, sources)
    with made_parents(out):
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        os.chmod(tmp, 0o777 & ~umask())  # mkdtemp makes 0700; the result should look like a normal mkdir
        try:
            yield tmp
            _normalize_modes(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        swap_in(tmp, out)
    COMMITTED.append(out)


def swap_in(new: Path, final: Path) -> None:
    """Put directory `new` at `final`: an existing `final` is renamed aside first and deleted only
    once `new` is in place, so `final` is never half-deleted and never holds a mix of both."""
    trash = None
    if final.exists():
        trash = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
        os.replace(final, trash / "old")
    os.replace(new, final)
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)


# Outputs committed in this process: an interrupt that arrives after a commit is reported as such.
COMMITTED: list[Path] = []


def write_text(path: Path, text: str) -> None:
    """Write a text file atomically (temp file beside it, then rename), with the user's umask."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        plain_mode(Path(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def remove_tree(path: Path) -> None:
    """Remove a directory by renaming it aside first, so a half-deleted one is never seen."""
    if not path.exists():
        return
    trash = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
    os.replace(path, trash / "old")
    shutil.rmtree(trash, ignore_errors=True)


def check_output_file(path: str | os.PathLike, force: bool = True, sources: tuple = (), what: str = "--out") -> Path:
    """The output-file twin of `check_output_dir`: not empty, not a directory, not an input,
    its nearest existing ancestor writable. Returns the resolved path."""
    p = _outside_inputs(path, sources, what, "file")
    if p.is_dir():
        raise CocoError(f"{what} {path} is a directory; pass a file path")
    if p.exists() and not force:
        raise CocoError(f"{what} {path} already exists; pass --force to replace it or choose another {what}")
    _check_writable_ancestor(p, path, what)
    return p


def check_figure_path(path: Path) -> Path:
    """A --png path: a .png file whose directory exists (CocoError naming the fix if not)."""
    if path.suffix.lower() != ".png":
        raise CocoError(f"--png {path} does not end in .png; figures are written as PNG")
    if not path.absolute().parent.is_dir():
        raise CocoError(f"directory for --png does not exist: {path.absolute().parent}")
    if path.is_dir():
        raise CocoError(f"--png {path} is a directory; pass a file path")
    return path


def save_figure(fig, path: str | os.PathLike, dpi: int = 120) -> None:
    """Save a matplotlib figure to `path` atomically (temp file beside it, then rename) and close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=dpi)
        plain_mode(Path(tmp))
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.remove(tmp)
