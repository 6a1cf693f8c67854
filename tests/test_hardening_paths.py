"""Hardening, second round (issue 22): no path trick may destroy a file, and every path problem is
exit 2 with one line.

  special files   a device, FIFO or socket at --out / --png is never replaced, even with --force
  mount points    --force never replaces a mount point (EBUSY left a temp dir behind)
  inputs          an input reaching the output file by file (files symlinked into it, a directory
                  bind-mounted from it) is refused like a plain overlap
  concurrency     two writers of one --out without --force: exactly one wins
  tilde           `--out '~'` is a directory named ~ in the current directory, never $HOME
  stale temps     the temp dir of a SIGKILLed run is removed by the next run of that output
  path errors     symlink loops (--out and a config's out:), names too long, /proc, a deleted
                  current directory, a full disk: exit 2, one line, temp removed

Cases that need root (mknod, mount) are skipped without it.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import expect_bad as _expect_bad
from conftest import run_cli

ROOT = Path(__file__).resolve().parent.parent
COCO_TOOLS = Path(sys.executable).parent / "coco-tools"
ROOT_ONLY = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (mknod / mount)")


# --------------------------------------------------------------------------- helpers

def digests(d) -> dict:
    """sha256 of every file under `d` (a file: itself), by relative path."""
    d = Path(d)
    files = [d] if d.is_file() else sorted(p for p in d.rglob("*") if p.is_file())
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def listing(d) -> list:
    return sorted(os.listdir(d))


def expect_bad(parent, *args, match, unchanged=()):
    """conftest.expect_bad (exit 2, one stderr line containing `match`, `parent` listing and
    `unchanged` contents as before), refusing a `match` that the parent's path already holds."""
    assert match.lower() not in str(parent).lower(), f"{match!r} occurs in {parent}: rename the test"
    _expect_bad(parent, *[str(a) for a in args], match=match, unchanged=unchanged)


def one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected exactly one stderr line, got {len(lines)}:\n{err}"
    return lines[0]


@pytest.fixture(scope="module")
def art(planted, tmp_path_factory):
    """A real neuron artifact of the planted tiny model."""
    old = os.umask(0o022)
    try:
        model, pairs = planted
        out = tmp_path_factory.mktemp("paths-art") / "neurons"
        code, _, err = run_cli("identify", model, "--out", out, "--data", pairs, "--split", "all", "--quiet",
                               "--null-rounds", "0", "--ratio", "0.05")
        assert code == 0, err
        return out
    finally:
        os.umask(old)


@pytest.fixture()
def mount(tmp_path):
    """mount(args..., target): run mount(8), skip where this user may not; unmounted afterwards."""
    mounted = []

    def do(*args):
        if os.geteuid() != 0 or shutil.which("mount") is None:
            pytest.skip("needs root and mount(8)")
        proc = subprocess.run(["mount", *map(str, args)], capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"mount not permitted here: {proc.stderr.strip()}")
        mounted.append(str(args[-1]))

    yield do
    for target in reversed(mounted):
        subprocess.run(["umount", target], check=True)


def _special(path: Path, kind: str) -> None:
    """Make a character device (root only), FIFO or socket at `path`."""
    if kind == "chardev":
        if os.geteuid() != 0:
            pytest.skip("mknod needs root")
        os.mknod(path, 0o644 | stat.S_IFCHR, os.makedev(1, 3))  # the numbers of /dev/null
    elif kind == "fifo":
        os.mkfifo(path)
    else:
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(str(path))
        sock.close()


def _no_engine(monkeypatch):
    """generate must be refused before it reads the prompts (and starts vLLM)."""
    from vllm_coco.serve import generate

    def started(*a, **k):
        raise AssertionError("generate went on although --out is not a regular file")

    monkeypatch.setattr(generate, "read_requests", started)


# =========================================================================== special files

SPECIAL_CASES = [  # (id, kind of the special file, its name, argv: AT -> it, MODEL / ART / PROMPTS, match)
    ("generate-chardev-force", "chardev", "fn", ["generate", "MODEL", "--prompts", "PROMPTS", "--out", "AT", "--force"],
     "character device, not a regular file"),
    ("generate-fifo-force", "fifo", "fn", ["generate", "MODEL", "--prompts", "PROMPTS", "--out", "AT", "--force"],
     "FIFO, not a regular file"),
    ("generate-socket-force", "socket", "fn", ["generate", "MODEL", "--prompts", "PROMPTS", "--out", "AT", "--force"],
     "socket, not a regular file"),
    ("report-png-chardev", "chardev", "fn.png", ["report", "ART", "--png", "AT"], "character device"),
    ("report-png-fifo", "fifo", "fn.png", ["report", "ART", "--png", "AT"], "FIFO, not a regular file"),
    ("compare-png-fifo", "fifo", "fn.png", ["compare", "RESULTS", "--png", "AT"], "FIFO, not a regular file"),
    ("select-out-fifo-force", "fifo", "fn", ["select", "ART", "--out", "AT", "--force"], "not a directory (FIFO)"),
]


@pytest.mark.parametrize("kind,name,argv,match", [c[1:] for c in SPECIAL_CASES], ids=[c[0] for c in SPECIAL_CASES])
def test_special_file_is_never_replaced(kind, name, argv, match, tmp_path, planted, art, monkeypatch):
    _no_engine(monkeypatch)
    work = tmp_path / "work"
    work.mkdir()
    at = work / name
    _special(at, kind)
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    (inputs / "p.jsonl").write_text('{"prompt": "n1 n2"}\n')
    (inputs / "r.json").write_text('{"results": {"stereo_coco": {"success_rate,none": 0.5}}}')
    subs = {"AT": at, "MODEL": planted[0], "ART": art, "PROMPTS": inputs / "p.jsonl", "RESULTS": inputs / "r.json"}
    before = os.lstat(at)
    expect_bad(work, *[subs.get(a, a) for a in argv], match=match, unchanged=(art, planted[0], inputs))
    after = os.lstat(at)
    assert stat.S_IFMT(after.st_mode) == stat.S_IFMT(before.st_mode) and after.st_ino == before.st_ino


def test_symlink_to_a_special_file_is_not_replaced_either(tmp_path, art):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    os.symlink(fifo, tmp_path / "heat.png")
    expect_bad(tmp_path, "report", art, "--png", tmp_path / "heat.png", match="FIFO")
    assert stat.S_ISFIFO(os.stat(tmp_path / "heat.png").st_mode)


@pytest.mark.parametrize("how", ["tmpfs", "bind"])
def test_force_never_replaces_a_mount_point(how, tmp_path, art, mount):
    work = tmp_path / "work"
    (work / "mnt").mkdir(parents=True)
    if how == "tmpfs":
        mount("-t", "tmpfs", "-o", "size=4m", "tmpfs", work / "mnt")
    else:
        (tmp_path / "src").mkdir()
        mount("--bind", tmp_path / "src", work / "mnt")
    (work / "mnt" / "keep.txt").write_text("on the mounted file system\n")
    expect_bad(work, "select", art, "--out", work / "mnt", "--force", match="mount point", unchanged=(work / "mnt",))
    assert listing(work / "mnt") == ["keep.txt"]


# =========================================================================== inputs file by file

@pytest.mark.parametrize("cmd", ["bake", "ne"])
def test_input_whose_files_are_symlinks_into_the_output_is_refused(cmd, tmp_path, planted, art):
    """msym/ holds symlinks to target/'s files: replacing target would destroy msym's weights."""
    target, msym = tmp_path / "target", tmp_path / "msym"
    shutil.copytree(planted[0], target)
    msym.mkdir()
    for f in target.iterdir():
        os.symlink(Path("..") / "target" / f.name, msym / f.name)
    expect_bad(tmp_path, cmd, msym, art, "--out", target, "--force", match="overlaps", unchanged=(target, art))
    assert all((msym / f).resolve().parent == target for f in os.listdir(msym))


@pytest.mark.parametrize("where", ["equal", "inside", "containing"])
def test_bind_mounted_input_is_refused(where, tmp_path, planted, art, mount):
    """view/ is a bind mount of holder/: view/target is holder/target under another path, which
    only (st_dev, st_ino) shows."""
    holder, view = tmp_path / "holder", tmp_path / "view"
    shutil.copytree(planted[0], holder / "target")
    view.mkdir()
    mount("--bind", holder, view)
    out, extra = {"equal": (holder / "target", ["--force"]), "inside": (holder / "target" / "edited", []),
                  "containing": (holder, ["--force"])}[where]
    expect_bad(tmp_path, "bake", view / "target", art, "--out", out, *extra, match="overlaps",
               unchanged=(holder, art))
    assert listing(holder) == ["target"]


def test_hard_linked_output_files_are_still_replaceable(tmp_path, art):
    """select shares the intensity matrix with its source by a hard link: a second select --force
    onto that output is legitimate (a rename never writes into the shared file)."""
    out = tmp_path / "sel"
    assert run_cli("select", art, "--out", out, "--baseline", "rand")[0] == 0
    before = digests(art)
    code, _, err = run_cli("select", art, "--out", out, "--baseline", "rand", "--force")
    assert code == 0, err
    assert digests(art) == before


# =========================================================================== concurrency

# Each writer passes the output check, writes its checkpoint, then waits until both have done so:
# both reach the commit believing --out is free, the race the issue found.
BARRIER = r"""
import os, sys, time
from pathlib import Path
from vllm_coco.edit import bake
barrier, n = Path(sys.argv[1]), int(sys.argv[2])
written = bake.write_checkpoint
def write_then_wait(*a, **k):
    written(*a, **k)
    (barrier / str(os.getpid())).touch()
    deadline = time.time() + 120
    while len(os.listdir(barrier)) < n and time.time() < deadline:
        time.sleep(0.05)
bake.write_checkpoint = write_then_wait
from vllm_coco.cli import main
main(sys.argv[3:])
"""


def test_two_writers_without_force_cannot_both_win(tmp_path, planted, art):
    barrier, parent = tmp_path / "barrier", tmp_path / "runs"
    barrier.mkdir()
    parent.mkdir()
    out = parent / "c"
    kept = [digests(planted[0]), digests(art)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", BARRIER, str(barrier), "2", "bake", str(planted[0]), str(art),
                               "--out", str(out), "--alpha", alpha], env=env, stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for alpha in ("0.5", "2")]
    try:
        results = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    codes = [p.returncode for p in procs]
    assert sorted(codes) == [0, 2], (codes, [r[1][-2000:] for r in results])
    loser = results[codes.index(2)][1]
    assert "created by another command" in one_line(loser), loser
    assert listing(parent) == ["c"]  # the loser's temp dir is gone
    winner_alpha = ("0.5", "2")[codes.index(0)]
    assert json.loads((out / "coco_edit.json").read_text())["settings"]["alpha"] == float(winner_alpha)
    assert [digests(planted[0]), digests(art)] == kept


@pytest.mark.parametrize("renameat2", [True, False], ids=["renameat2", "fallback"])
def test_no_clobber_commit(renameat2, tmp_path, monkeypatch):
    """The commit without force refuses an output that appeared meanwhile (also where renameat2 is
    missing); write_text likewise; with force the old output is replaced whole."""
    from vllm_coco.core import atomic
    from vllm_coco.core.errors import CocoError

    if not renameat2:
        monkeypatch.setattr(atomic, "_libc_renameat2", lambda: None)
    new, final = tmp_path / "new", tmp_path / "final"
    new.mkdir()
    (new / "a").write_text("new")
    final.mkdir()
    (final / "a").write_text("theirs")
    with pytest.raises(CocoError, match="created by another command"):
        atomic.swap_in(new, final, force=False)
    assert (final / "a").read_text() == "theirs" and (new / "a").read_text() == "new"
    atomic.swap_in(new, final, force=True)
    assert (final / "a").read_text() == "new" and listing(tmp_path) == ["final"]
    f = tmp_path / "f.txt"
    f.write_text("theirs")
    with pytest.raises(CocoError, match="created by another command"):
        atomic.write_text(f, "mine", force=False)
    assert f.read_text() == "theirs" and listing(tmp_path) == ["f.txt", "final"]


# =========================================================================== tilde

@pytest.mark.parametrize("out,force", [("~", True), ("~", False), ("~/sub", False), ("~nosuchuser/x", False)])
def test_tilde_is_an_ordinary_name(out, force, tmp_path, art, monkeypatch):
    """Only the shell expands `~`: a quoted one is a directory of that name in the current directory."""
    home = tmp_path / "home"
    home.mkdir()
    (home / "precious.txt").write_text("my home\n")
    monkeypatch.setenv("HOME", str(home))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    if force:
        (work / "~").mkdir()
    code, _, err = run_cli("select", art, "--out", out, "--baseline", "rand", *(["--force"] if force else []))
    assert code == 0, err
    assert (work / out / "neurons.json").is_file()
    assert listing(home) == ["precious.txt"] and (home / "precious.txt").read_text() == "my home\n"


def test_config_out_still_expands_tilde(tmp_path, monkeypatch):
    """A config file was read by no shell: its `out:` keeps expanding ~ (as config.py checks it)."""
    from vllm_coco.core.atomic import check_output_dir

    monkeypatch.setenv("HOME", str(tmp_path))
    assert check_output_dir("~/runs", False, what="out:", merge=True) == tmp_path.resolve() / "runs"
    monkeypatch.chdir(tmp_path)
    assert check_output_dir("~", False) == tmp_path.resolve() / "~"


# =========================================================================== stale temps

def test_temp_of_a_killed_run_is_removed_by_the_next_run(tmp_path, planted, art):
    """SIGKILL runs no cleanup: the next run writing the same output removes the dead run's temp."""
    import tiny

    pairs = tiny.planted_pairs(tmp_path / "big.jsonl", n=300)
    parent = tmp_path / "runs"
    parent.mkdir()
    out = parent / "neurons"
    proc = subprocess.Popen([str(COCO_TOOLS), "identify", str(planted[0]), "--out", str(out), "--data", str(pairs),
                             "--split", "all", "--quiet", "--null-rounds", "0", "--batch-size", "1"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None and not any(".tmp-" in n for n in os.listdir(parent)):
            time.sleep(0.02)
        assert proc.poll() is None, f"identify finished before it could be killed: {proc.communicate()}"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    stale = [n for n in os.listdir(parent) if ".tmp-" in n]
    assert stale, "the killed run left no temp dir: nothing to test"
    code, _, err = run_cli("select", art, "--out", out, "--baseline", "rand")
    assert code == 0, err
    assert listing(parent) == ["neurons"]


def test_only_temps_of_gone_processes_of_this_host_are_removed(tmp_path, art):
    from vllm_coco.core import atomic

    gone = subprocess.Popen(["true"])
    gone.wait()  # reaped: its pid names no process now
    other_host = "000000" if atomic._HOST != "000000" else "ffffff"
    names = {"dead": f".c.tmp-{gone.pid}.{atomic._HOST}-abc12345",
             "dead-old": f".c.old-{gone.pid}.{atomic._HOST}-abc12345",
             "dead-file": f".c.tmp-{gone.pid}.{atomic._HOST}-abc12345.png",
             "alive": f".c.tmp-{os.getpid()}.{atomic._HOST}-abc12345",
             "other-host": f".c.tmp-{gone.pid}.{other_host}-abc12345",
             "other-output": f".cc.tmp-{gone.pid}.{atomic._HOST}-abc12345",
             "unnamed": ".c.tmp-abc12345"}
    for key, name in names.items():
        if key == "dead-file":
            (tmp_path / name).write_text("partial")
        else:
            (tmp_path / name).mkdir()
            (tmp_path / name / "weights").write_text("partial")
    code, _, err = run_cli("select", art, "--out", tmp_path / "c", "--baseline", "rand")
    assert code == 0, err
    kept = {names[k] for k in ("alive", "other-host", "other-output", "unnamed")}
    assert set(listing(tmp_path)) == kept | {"c"}


def test_output_of_a_run_killed_mid_swap_is_put_back(tmp_path, art):
    """Killed between swap_in's two renames (where renameat2 cannot exchange): the output is
    missing and whole in .NAME.old-*/old. The next run puts it back (and, without --force,
    refuses to replace it) instead of deleting it with the stale temps."""
    from vllm_coco.core import atomic

    gone = subprocess.Popen(["true"])
    gone.wait()
    trash = tmp_path / f".c.old-{gone.pid}.{atomic._HOST}-abc12345"
    (trash / "old").mkdir(parents=True)
    (trash / "old" / "weights").write_text("the previous output\n")
    deleting = tmp_path / f".c.del-{gone.pid}.{atomic._HOST}-abc12345"  # remove_tree's: never put back
    (deleting / "old").mkdir(parents=True)
    code, _, err = run_cli("select", art, "--out", tmp_path / "c", "--baseline", "rand")
    assert code == 2 and "already exists" in one_line(err), err
    assert listing(tmp_path) == ["c"] and (tmp_path / "c" / "weights").read_text() == "the previous output\n"


# =========================================================================== path errors

def _loop(work: Path) -> Path:
    os.symlink("loop", work / "loop")
    return work / "loop"


PATH_ERROR_CASES = [  # (id, argv with OUT -> made by `make(work)`, match)
    ("out-symlink-loop", lambda w: _loop(w), ["select", "ART", "--out", "OUT"], "symlink loop"),
    ("out-symlink-loop-force", lambda w: _loop(w), ["select", "ART", "--out", "OUT", "--force"], "symlink loop"),
    ("out-inside-symlink-loop", lambda w: _loop(w) / "sub", ["bake", "MODEL", "ART", "--out", "OUT"], "symlink loop"),
    ("out-name-256-bytes", lambda w: w / ("x" * 256), ["select", "ART", "--out", "OUT"], "too long"),
    ("out-name-300-bytes-force", lambda w: w / ("é" * 150), ["select", "ART", "--out", "OUT", "--force"], "too long"),
    ("out-dir-name-300-bytes", lambda w: w / ("x" * 300) / "sub", ["bake", "MODEL", "ART", "--out", "OUT"],
     "too long"),
]


@pytest.mark.parametrize("make,argv,match", [c[1:] for c in PATH_ERROR_CASES], ids=[c[0] for c in PATH_ERROR_CASES])
def test_path_error_is_one_line(make, argv, match, tmp_path, planted, art):
    work = tmp_path / "work"
    work.mkdir()
    subs = {"OUT": make(work), "MODEL": planted[0], "ART": art}
    expect_bad(work, *[subs.get(a, a) for a in argv], match=match, unchanged=(art, planted[0]))


def test_name_of_250_bytes_is_written(tmp_path, art):
    """Legal names stay legal: the temp beside a 250-byte name gets a shortened name."""
    out = tmp_path / ("y" * 250)
    code, _, err = run_cli("select", art, "--out", out, "--baseline", "rand")
    assert code == 0, err
    assert listing(tmp_path) == [out.name] and (out / "neurons.json").is_file()


@pytest.mark.parametrize("check", [True, False], ids=["check", "run"])
def test_config_out_symlink_loop_is_one_line(check, tmp_path, planted):
    work = tmp_path / "work"
    work.mkdir()
    cfg = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    cfg["models"] = [{"path": str(planted[0]), "name": "tiny"}]
    cfg["out"] = str(_loop(work) / "runs")
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    expect_bad(work, "run", config, *(["--check"] if check else []), match="symlink loop", unchanged=(planted[0],))


def test_out_under_proc_is_one_line(tmp_path, art):
    if not Path("/proc/self").is_dir() or os.path.lexists("/proc/x"):
        pytest.skip("needs Linux /proc without an entry x")
    code, out, err = run_cli("select", art, "--out", "/proc/x", "--baseline", "rand")
    assert code == 2, (code, out, err)
    assert "/proc" in one_line(err)
    assert not os.path.lexists("/proc/x")


def test_deleted_current_directory_is_one_line(tmp_path, art, monkeypatch):
    gone = tmp_path / "gone"
    gone.mkdir()
    monkeypatch.chdir(gone)
    gone.rmdir()
    expect_bad(tmp_path, "select", art, "--out", "x", match="current directory was deleted", unchanged=(art,))
    # refused before anything runs, absolute paths too: in a fresh process torch's import fails on a
    # vanished directory with its own words (oneMKL: "Cannot load libtorch_cpu.so")
    expect_bad(tmp_path, "select", art, "--out", tmp_path / "abs", "--baseline", "rand",
               match="current directory was deleted", unchanged=(art,))
    from vllm_coco.core import atomic

    assert atomic.resolved(tmp_path / "abs") == tmp_path / "abs"  # the path rule itself needs no cwd for these


ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
DISK_FULL_CASES = [  # (id, the exception a write raises)
    ("oserror-enospc", ENOSPC),
    ("oserror-edquot", OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))),
    ("safetensors-wrapped", RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")),
]


@pytest.mark.parametrize("exc", [c[1] for c in DISK_FULL_CASES], ids=[c[0] for c in DISK_FULL_CASES])
def test_full_disk_while_writing_an_output_dir_is_one_line(exc, tmp_path, art, monkeypatch):
    from vllm_coco.core import artifact

    def full(out_dir, *a, **k):
        (Path(out_dir) / "neurons.safetensors").write_bytes(b"partial")
        raise exc

    monkeypatch.setattr(artifact, "save", full)
    expect_bad(tmp_path, "select", art, "--out", tmp_path / "new" / "sel", match="free space", unchanged=(art,))


def test_full_disk_while_saving_a_figure_is_one_line(tmp_path, art, monkeypatch):
    from matplotlib.figure import Figure

    def full(self, fname, *a, **k):
        Path(fname).write_bytes(b"partial")
        raise ENOSPC

    monkeypatch.setattr(Figure, "savefig", full)
    expect_bad(tmp_path, "report", art, "--png", tmp_path / "heat.png", match="free space", unchanged=(art,))


def test_full_disk_while_writing_a_text_file(tmp_path, monkeypatch):
    from vllm_coco.core import atomic
    from vllm_coco.core.errors import CocoError

    class Full:
        def __init__(self, fd, *a, **k):
            os.close(fd)

        def __enter__(self):
            return self

        def __exit__(self, *a):
            return False

        def write(self, text):
            raise ENOSPC

    monkeypatch.setattr(atomic.os, "fdopen", Full)
    with pytest.raises(CocoError, match="disk is full"):
        atomic.write_text(tmp_path / "answers.jsonl", "x\n")
    monkeypatch.undo()
    assert listing(tmp_path) == []


def test_real_full_disk_is_one_line(tmp_path, planted, art, mount):
    """A 64 KiB tmpfs cannot hold the tiny model's weights: safetensors fails inside bake."""
    small = tmp_path / "small"
    small.mkdir()
    mount("-t", "tmpfs", "-o", "size=64k", "tmpfs", small)
    expect_bad(small, "bake", planted[0], art, "--out", small / "c", match="free space", unchanged=(planted[0], art))
