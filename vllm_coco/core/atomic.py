"""Outputs: the one rule for where a command may write, and atomic writes (temp beside the
target, then rename).

The rule (`check_output_dir`), applied by every command and the pipeline before anything is
written: the path is not empty; resolved (symlinks, `..`; a `~` is an ordinary name, since only
the shell expands it) it is not equal to, inside, or a parent of any input (model directory,
neuron artifact, a config's model paths), nor reached by an input file by file (a file
symlinked into it, a directory bind-mounted from it: compared by device and inode), nor a
parent of the current directory; it does not exist unless `force`, and even then only a
directory (for files: a regular file) that is not a mount point is replaced; its nearest
existing ancestor is a writable directory. Missing parents are created at commit time and
removed again if the work fails, so a failed command leaves the filesystem as it found it.

Commits: without `force` the temp is renamed into place only if nothing appeared there in the
meantime (renameat2 RENAME_NOREPLACE), so of two concurrent writers one wins and the other fails
with a CocoError. Temp names carry the pid and host (`.NAME.tmp-<pid>.<host>-xxxx`), so the next
run removes those a killed run left. Filesystem failures (a symlink loop, a name too long, a full
disk, a file system that refuses new files) become a one-line CocoError naming the path and the
fix.
"""

from __future__ import annotations

# Lazy imports: matplotlib is imported inside the functions that use it (directly or through the
# modules they import), so importing this module stays light.
import contextlib
import ctypes
import errno
import functools
import hashlib
import os
import re
import shutil
import socket
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

from vllm_coco.core.errors import CocoError

# Entries looked at per input or output tree when comparing them file by file: model directories
# hold tens of files, so this bounds the cost of a pathological input without missing real ones.
WALK_LIMIT = 10_000

_FIXES = {
    errno.ELOOP: "it goes through a symlink loop; fix the link or choose another path",
    errno.ENAMETOOLONG: "a name in it is too long for the file system (255 bytes at most); choose a shorter path",
    errno.ENOSPC: "the disk is full; free space or choose a path on another disk",
    errno.EDQUOT: "the disk quota is exceeded; free space or choose a path on another disk",
    errno.EROFS: "the file system is read-only; choose a path on a writable disk",
    errno.EACCES: "choose a path you can write to",
    errno.EPERM: "choose a path you can write to",
    errno.EBUSY: "it is in use (a mount point?); choose another path",
}


def _fs_error(exc: OSError, path, what: str = "", action: str = "") -> CocoError:
    """An OSError about `path` as the user's one line: the path, what failed, the fix."""
    where = f"{what} {path}".strip()
    doing = f"cannot {action}: " if action else ""
    fix = _FIXES.get(exc.errno, "choose a path on a disk you can write to")
    return CocoError(f"{where}: {doing}{exc.strerror or exc}; {fix}")


def _disk_full(exc: BaseException) -> OSError | None:
    """The ENOSPC / EDQUOT behind `exc`, also where a library wrapped it in its own error
    (safetensors: "I/O error: No space left on device (os error 28)")."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return exc
    for code in (errno.ENOSPC, errno.EDQUOT):
        if os.strerror(code) in str(exc):
            return OSError(code, os.strerror(code))
    return None


def _cwd() -> Path | None:
    """The current directory, or None when it was deleted while in use."""
    try:
        return Path(os.getcwd())
    except FileNotFoundError:
        return None


def resolved(path: str | os.PathLike, what: str = "") -> Path:
    """`path` made absolute with `..` and every symlink along it resolved. A `~` is a name like
    any other: the shell expands the ones the user meant. CocoError if it cannot be resolved (a
    symlink loop, a name too long, relative to a deleted current directory)."""
    p = os.fspath(path)
    if not os.path.isabs(p):
        cwd = _cwd()
        if cwd is None:
            raise CocoError(f"{what} {path}".strip() + ": the current directory was deleted; "
                            "cd into an existing directory or pass an absolute path")
        p = os.path.join(cwd, p)
    try:
        real = Path(os.path.realpath(p))
        real.stat()  # realpath ignores loops and over-long names; stat reports them
    except (FileNotFoundError, NotADirectoryError):
        pass
    except OSError as exc:
        raise _fs_error(exc, path, what) from None
    except ValueError:  # an embedded NUL byte
        raise CocoError(f"{what} {path!r} contains a NUL byte; pass a real path".strip()) from None
    return real


def overlap(out: Path, src: Path) -> bool:
    """Whether two resolved paths are the same, or one lies inside the other."""
    return out == src or src in out.parents or out in src.parents


def _config_tilde(out, what: str):
    """A config key (`what` like `out:`) was read by no shell, so it expands `~` itself, as
    experiment/config.py does for the paths it checks; command-line paths never do."""
    return os.path.expanduser(os.fspath(out)) if what.endswith(":") else out


def _stat(path: Path, out, what: str) -> os.stat_result | None:
    """stat of the resolved output path, None if there is nothing there (CocoError if it cannot
    be read, e.g. a parent without search permission)."""
    try:
        return path.stat()
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        raise _fs_error(exc, out, what) from None


def _stat_quiet(path) -> os.stat_result | None:
    """stat for the walks, None for anything unreadable (a dangling link, a loop, no permission)."""
    try:
        return os.stat(path)
    except (OSError, ValueError):
        return None


def _identity(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


def _output_dirs(out: Path) -> dict:
    """(st_dev, st_ino) -> path of every directory a write to `out` touches: its existing
    ancestors, and with it the directories below it that a --force would delete."""
    found = {}
    for p in [out, *out.parents]:
        st = _stat_quiet(p)
        if st is not None:
            found[_identity(st)] = p
    stack, seen = [out], 0
    while stack and seen < WALK_LIMIT:
        d = stack.pop()
        with contextlib.suppress(OSError):
            for entry in os.scandir(d):
                seen += 1
                if entry.is_dir(follow_symlinks=False):  # rmtree never follows a symlink
                    found[_identity(entry.stat(follow_symlinks=False))] = Path(entry.path)
                    stack.append(entry.path)
    return found


def _input_entries(src: Path) -> Iterator[tuple[Path, Path, os.stat_result]]:
    """(path as named, path resolved, stat) of `src` and everything under it, following symlinks
    as a reader does; each directory once (a link cycle ends), at most WALK_LIMIT entries."""
    st = _stat_quiet(src)
    if st is None:
        return
    yield src, src, st
    stack, dirs, seen = [src], {_identity(st)}, 0
    while stack and seen < WALK_LIMIT:
        d = stack.pop()
        try:
            names = os.listdir(d)
        except OSError:
            continue
        for name in names:
            seen += 1
            real = Path(os.path.realpath(d / name))  # walked from resolved paths: only a link changes it
            st = _stat_quiet(real)
            if st is None:
                continue
            yield d / name, real, st
            if stat.S_ISDIR(st.st_mode) and _identity(st) not in dirs:
                dirs.add(_identity(st))
                stack.append(real)


def _reach_into(out: Path, src: Path, dirs: dict) -> tuple[Path, Path] | None:
    """(entry of input `src`, what it is in the output) where the input reaches the output while
    its own path does not: a file or directory symlinked into it, or a directory that is one of
    the output's `dirs` (a bind mount or a hard-linked directory: same device and inode)."""
    for named, real, st in _input_entries(src):
        if overlap(out, real):
            return named, real
        if stat.S_ISDIR(st.st_mode) and _identity(st) in dirs:
            return named, dirs[_identity(st)]
    return None


def _outside_inputs(out, sources: tuple, what: str, kind: str) -> Path:
    """`out` resolved; CocoError if it is empty or overlaps any input (the rule both checks share)."""
    if str(out).strip() == "":
        raise CocoError(f"{what} is empty; pass the path of a {kind} to create")
    path = resolved(_config_tilde(out, what), what)
    dirs = _output_dirs(path) if sources else {}
    for src in sources:
        src = resolved(src)
        if overlap(path, src):
            raise CocoError(f"{what} {out} overlaps the input {src} (same path, inside it, or containing it); "
                            "choose an output path outside every input")
        hit = _reach_into(path, src, dirs)
        if hit is not None:
            raise CocoError(f"{what} {out} overlaps the input {src}: {hit[0]} is {hit[1]} (through a symlink, "
                            "bind mount or linked directory); choose an output path outside every input")
    return path


def _check_writable_ancestor(path: Path, out, what: str) -> None:
    """The nearest existing ancestor of `path` must be a directory this user can write into."""
    base = _existing_ancestor(path.parent)
    if not base.is_dir():
        raise CocoError(f"{what} {out}: {base} is a file, not a directory; choose another {what}")
    if not os.access(base, os.W_OK | os.X_OK):
        raise CocoError(f"{what} {out}: {base} is not writable; choose an output path you can write to")


def _existing_ancestor(path: Path) -> Path:
    p = path
    while not p.exists():
        p = p.parent
    return p


def _kind(st: os.stat_result) -> str:
    kinds = [(stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"), (stat.S_ISFIFO, "FIFO"),
             (stat.S_ISSOCK, "socket"), (stat.S_ISDIR, "directory"), (stat.S_ISREG, "regular file")]
    return next((name for test, name in kinds if test(st.st_mode)), "special file")


def _mount_points() -> set[str]:
    """Every mount point of this process (/proc/self/mountinfo, octal escapes undone)."""
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as fh:
            fields = [line.split() for line in fh]
    except OSError:
        return set()
    unescape = functools.partial(re.sub, r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)))
    return {unescape(f[4]) for f in fields if len(f) > 4}


def _is_mount(path: Path) -> bool:
    """os.path.ismount misses a bind mount within one file system; mountinfo lists it."""
    return os.path.ismount(path) or str(path) in _mount_points()


def _check_replaceable(path: Path, out, what: str, want_dir: bool) -> os.stat_result | None:
    """The stat of what is at resolved `path` (None: nothing), if a --force could replace it:
    a directory (`want_dir`) or a regular file, and not a mount point."""
    st = _stat(path, out, what)
    if st is None:
        return None
    kind, where = _kind(st), f"{what} {out}".strip()
    if want_dir and kind != "directory":
        raise CocoError(f"{where} exists and is not a directory ({kind}); remove it or choose another path")
    if not want_dir and kind == "directory":
        raise CocoError(f"{where} is a directory; pass a file path")
    if not want_dir and kind != "regular file":
        raise CocoError(f"{where} is a {kind}, not a regular file, and is never replaced; choose another path")
    if _is_mount(path):
        raise CocoError(f"{where} is a mount point, which cannot be replaced; choose another path")
    return st


def check_output_dir(out: str | os.PathLike, force: bool, sources: tuple = (), what: str = "--out",
                     merge: bool = False) -> Path:
    """Validate an output directory before any work starts; returns it resolved (CocoError if not).

    `merge`: the caller writes into an existing directory instead of replacing it (the pipeline's
    resumable output root), so it may exist, may be a mount point and may be the current directory."""
    path = _outside_inputs(out, sources, what, "directory")
    cwd = _cwd()  # a deleted current directory cannot be contained in anything
    if not merge and cwd is not None and (path == cwd.resolve() or path in cwd.resolve().parents):
        raise CocoError(f"{what} {out} is the current directory or contains it; choose a new directory to create")
    if merge:
        if path.exists() and not path.is_dir():
            raise CocoError(f"{what} {out} exists and is not a directory; remove it or choose another {what}")
    elif _check_replaceable(path, out, what, want_dir=True) is not None and not force:
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


# --------------------------------------------------------------------------- temp names

# Which machine a temp belongs to: a pid only tells whether the process is gone on this host.
_HOST = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:6]


def _short(name: str) -> str:
    """`name` cut to 100 bytes, so the temp names built from it stay under NAME_MAX (255 bytes)."""
    return os.fsdecode(os.fsencode(name)[:100])


def _temp_prefix(final: Path, kind: str) -> str:
    """`.NAME.<kind>-<pid>.<host>-`: the next run can tell the temp of a process that is gone."""
    return f".{_short(final.name)}.{kind}-{os.getpid()}.{_HOST}-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):  # another user's process, or no pid at all: not ours to judge
        return True
    return True


def remove_stale(final: Path) -> bool:
    """Remove the temps of `final` (`.NAME.tmp-*`, `.NAME.old-*`, `.NAME.del-*`) whose process on
    this host is gone: a SIGKILL (or power loss) runs no cleanup, and nothing else would ever
    remove them. A run killed between swap_in's two renames left `final` missing and the old
    output whole in `.NAME.old-*/old`: that is put back. Returns whether something was."""
    pattern = re.compile(re.escape(f".{_short(final.name)}.") + r"(tmp|old|del)-(\d+)\.([0-9a-f]{6})-[^/]+")
    try:
        names = os.listdir(final.parent)
    except OSError:
        return False
    restored = False
    for name in names:
        m = pattern.fullmatch(name)
        if m is None or m.group(3) != _HOST or _alive(int(m.group(2))):
            continue
        stale = final.parent / name
        if m.group(1) == "old" and not os.path.lexists(final) and os.path.isdir(stale / "old"):
            with contextlib.suppress(OSError):
                os.rename(stale / "old", final)
                restored = True
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                stale.unlink()
    return restored


# --------------------------------------------------------------------------- renames

_AT_FDCWD, _RENAME_NOREPLACE, _RENAME_EXCHANGE = -100, 1, 2


@functools.cache
def _libc_renameat2():
    """glibc's renameat2 (Linux; glibc >= 2.28), or None where there is none."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def _renameat2(src: Path, dst: Path, flags: int) -> int:
    """renameat2(2): 0, or the errno (ENOSYS / EINVAL: this kernel, libc or file system lacks it)."""
    fn = _libc_renameat2()
    if fn is None:
        return errno.ENOSYS
    if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return 0
    return ctypes.get_errno()


def _rename_fallback(src: Path, dst: Path) -> int:
    """No-clobber rename without renameat2: a file by link + unlink (link never replaces); a
    directory by rename, which replaces only an empty directory, never a written output."""
    try:
        if os.path.lexists(dst):
            return errno.EEXIST
        if src.is_dir():
            os.rename(src, dst)
        else:
            os.link(src, dst)
            os.unlink(src)
    except OSError as exc:
        return exc.errno
    return 0


def _rename_noreplace(new: Path, final: Path) -> None:
    """Rename `new` to `final` only if nothing is there: of two writers racing, one wins and
    the other gets a CocoError (`new` is left for its caller to remove)."""
    err = _renameat2(new, final, _RENAME_NOREPLACE)
    if err in (errno.ENOSYS, errno.EINVAL):
        err = _rename_fallback(new, final)
    if err in (errno.EEXIST, errno.ENOTEMPTY):
        raise CocoError(f"{final} was created by another command while this one ran; pass --force to replace it "
                        "or choose another output path")
    if err:
        raise _fs_error(OSError(err, os.strerror(err)), final, action="rename the finished output into place")


def swap_in(new: Path, final: Path, force: bool = True) -> None:
    """Put directory `new` at `final`. Without `force` only if nothing is at `final`, atomically
    (CocoError otherwise). With `force` an existing `final` is exchanged with `new` in one step,
    or where the file system cannot, renamed aside first; it is deleted only once `new` is in
    place, so `final` is never half-deleted and never holds a mix of both."""
    if not force:
        _rename_noreplace(new, final)
        return
    if not os.path.lexists(final):
        _replace(new, final)
        return
    err = _renameat2(new, final, _RENAME_EXCHANGE)
    if err == 0:  # `new` now holds the old output
        shutil.rmtree(new, ignore_errors=True)
        return
    if err not in (errno.ENOSYS, errno.EINVAL):
        raise _fs_error(OSError(err, os.strerror(err)), final, action="replace it")
    trash = _mkdtemp(final, "old")
    try:
        _replace(final, trash / "old")
        _replace(new, final)
    except BaseException:
        if (trash / "old").exists() and not os.path.lexists(final):
            os.replace(trash / "old", final)  # put the old output back
        shutil.rmtree(trash, ignore_errors=True)
        raise
    shutil.rmtree(trash, ignore_errors=True)


def _replace(src: Path, dst: Path) -> None:
    try:
        os.replace(src, dst)
    except OSError as exc:
        raise _fs_error(exc, dst, action="rename into place") from None


def _mkdtemp(final: Path, kind: str, what: str = "") -> Path:
    """A new temp directory beside `final`, named for remove_stale."""
    try:
        return Path(tempfile.mkdtemp(prefix=_temp_prefix(final, kind), dir=final.parent))
    except OSError as exc:
        raise _fs_error(exc, final, what, action=f"create a directory in {final.parent}") from None


# --------------------------------------------------------------------------- writers

@contextlib.contextmanager
def made_parents(path: Path) -> Iterator[None]:
    """Create the missing parents of `path`; if the block fails, remove the ones made here."""
    missing = []
    p = path.parent
    while not p.exists():
        missing.append(p)
        p = p.parent
    made = []
    try:
        for d in reversed(missing):
            try:
                d.mkdir()
            except OSError as exc:
                raise _fs_error(exc, d, action="create the directory") from None
            made.append(d)
        yield
    except BaseException:
        for d in reversed(made):  # deepest first
            with contextlib.suppress(OSError):
                d.rmdir()
        raise


@contextlib.contextmanager
def atomic_output_dir(out: str | os.PathLike, force: bool = False, sources: tuple = ()) -> Iterator[Path]:
    """Yield a temporary directory that becomes `out` only if the block finishes.

    On any exception (including KeyboardInterrupt) the temporary directory and any parent made
    for it are removed, and `out` is left exactly as it was; a full disk is a CocoError. Without
    `force` the commit fails (CocoError) if `out` appeared while the block ran. Temps that a
    killed run left beside `out` are removed first.
    """
    out = check_output_dir(out, force, sources)
    with made_parents(out):
        if remove_stale(out):  # a killed --force run's previous output is back: check again
            check_output_dir(out, force, sources)
        tmp = _mkdtemp(out, "tmp", "--out")
        try:
            os.chmod(tmp, 0o777 & ~umask())  # mkdtemp makes 0700; the result should look like a normal mkdir
            try:
                yield tmp
            except Exception as exc:
                full = _disk_full(exc)
                if full is not None:
                    raise _fs_error(full, out, "--out", action="write it") from None
                raise
            _normalize_modes(tmp)
            swap_in(tmp, out, force)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    COMMITTED.append(out)


# Outputs committed in this process: an interrupt that arrives after a commit is reported as such.
COMMITTED: list[Path] = []


def _commit_file(tmp: str, path: Path, force: bool) -> None:
    """Rename temp file `tmp` to `path`: only over a regular file (re-checked here, just before),
    and without `force` only if nothing is there."""
    if force:
        _check_replaceable(path, path, "", want_dir=False)
        os.replace(tmp, path)
    else:
        _rename_noreplace(Path(tmp), path)


def write_text(path: Path, text: str, force: bool = True) -> None:
    """Write a text file atomically (temp file beside it, then rename), with the user's umask.
    Without `force` it fails (CocoError) if `path` exists by then."""
    remove_stale(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path, "tmp"), dir=path.parent)
    except OSError as exc:
        raise _fs_error(exc, path, action=f"create a file in {path.parent}") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        plain_mode(Path(tmp))
        _commit_file(tmp, path, force)
    except OSError as exc:
        raise _fs_error(exc, path, action="write it") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def remove_tree(path: Path) -> None:
    """Remove a directory by renaming it aside first, so a half-deleted one is never seen."""
    if not path.exists():
        return
    trash = _mkdtemp(path, "del")  # not "old": a killed deletion is finished, never put back
    _replace(path, trash / "old")
    shutil.rmtree(trash, ignore_errors=True)


def check_output_file(path: str | os.PathLike, force: bool = True, sources: tuple = (), what: str = "--out") -> Path:
    """The output-file twin of `check_output_dir`: not empty, not an input, only a regular file
    (never a directory, device, FIFO, socket or mount point) replaced, its nearest existing
    ancestor writable. Returns the resolved path."""
    p = _outside_inputs(path, sources, what, "file")
    if _check_replaceable(p, path, what, want_dir=False) is not None and not force:
        raise CocoError(f"{what} {path} already exists; pass --force to replace it or choose another {what}")
    _check_writable_ancestor(p, path, what)
    return p


def check_figure_path(path: Path) -> Path:
    """A --png path: a .png file whose directory exists, and if it exists a regular file (a
    device or FIFO is never replaced). CocoError naming the fix if not."""
    if path.suffix.lower() != ".png":
        raise CocoError(f"--png {path} does not end in .png; figures are written as PNG")
    real = resolved(path, "--png")
    if not real.parent.is_dir():
        raise CocoError(f"directory for --png does not exist: {real.parent}")
    _check_replaceable(real, path, "--png", want_dir=False)
    return path


def save_figure(fig, path: str | os.PathLike, dpi: int = 120) -> None:
    """Save a matplotlib figure to `path` atomically (temp file beside it, then rename) and close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    tmp = None
    try:
        remove_stale(path)
        fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path, "tmp"), suffix=path.suffix, dir=path.parent)
        os.close(fd)
        fig.savefig(tmp, dpi=dpi)
        plain_mode(Path(tmp))
        _commit_file(tmp, path, force=True)
    except Exception as exc:
        full = _disk_full(exc)
        if full is not None or isinstance(exc, OSError):
            raise _fs_error(full or exc, path, action="write the figure") from None
        raise
    finally:
        plt.close(fig)
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)
