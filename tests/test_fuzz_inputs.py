"""Seeded fuzzing of the inputs users hand to coco-tools: corrupted neuron artifacts (fed to
`select`, `report`, `bake` and `ne`, round-robin) and corrupted contrast JSONL files (fed to
`identify` on the planted tiny model).

The contract under test (README, "Exit codes"): whatever the corruption, the exit code is never 1
(an unexpected exception is a bug). 0 is fine when the corruption was harmless; otherwise exit 2
with exactly one line on stderr, nothing written beside the output, and the inputs untouched.

Cases are drawn once, at import, from random.Random(0): the same ids and corruptions every run.
Everything runs in-process through conftest.run_cli, which only turns SystemExit into a code, so an
exception escaping coco-tools' main() is caught here and reported with its traceback.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import traceback
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli

MASTER = random.Random(0)
N_ARTIFACT_CASES = 52
N_CONTRAST_CASES = 20
COMMANDS = ("select", "report", "bake", "ne")

ARTIFACT_KINDS = ("st_truncate", "st_flip", "json_truncate", "json_flip", "json_delete_key", "json_wrong_type",
                  "arr_wrong_dtype", "arr_wrong_length", "arr_nonfinite", "arr_delete", "arr_reshape",
                  "arr_out_of_range")
CONTRAST_KINDS = ("flip", "truncate", "wrong_field_type", "wrong_line_type", "bad_encoding", "deep_nesting",
                  "lone_surrogate", "control_and_bom", "missing_field", "huge_number")


@dataclass(frozen=True)
class Case:
    ident: str
    kind: str
    command: str
    seed: int




def _artifact_case(i: int) -> Case:
    """Kinds cycle; the command shifts by one every cycle, so each kind meets every command."""
    kind = ARTIFACT_KINDS[i % len(ARTIFACT_KINDS)]
    command = COMMANDS[(i + i // len(ARTIFACT_KINDS)) % len(COMMANDS)]
    return Case(f"{i:02d}-{kind}-{command}", kind, command, MASTER.randrange(2 ** 31))


ARTIFACT_CASES = [_artifact_case(i) for i in range(N_ARTIFACT_CASES)]
CONTRAST_CASES = [Case(f"{i:02d}-{CONTRAST_KINDS[i % len(CONTRAST_KINDS)]}", CONTRAST_KINDS[i % len(CONTRAST_KINDS)],
                       "identify", MASTER.randrange(2 ** 31))
                  for i in range(N_CONTRAST_CASES)]


# --------------------------------------------------------------------------- helpers

def digests(d) -> dict:
    d = Path(d)
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(d.rglob("*")) if p.is_file()}


def run_checked(*args) -> tuple[int, str, str]:
    """run_cli, with an exception escaping main() turned into a test failure carrying its traceback."""
    try:
        return run_cli(*args)
    except Exception:  # noqa: BLE001 - anything but SystemExit out of main() is exit 1: a bug
        pytest.fail("coco-tools raised instead of exiting (exit 1 equivalent):\n" + traceback.format_exc())


def assert_contract(code: int, out: str, err: str, out_parent: Path, before: list, inputs: dict) -> None:
    assert code in (0, 2), f"exit {code}\nstdout: {out[-2000:]}\nstderr: {err[-4000:]}"
    if code == 2:
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1, f"exit 2 needs exactly one stderr line, got {len(lines)}:\n{err[-4000:]}"
        assert sorted(os.listdir(out_parent)) == before, "exit 2 but something was written"
    for d, kept in inputs.items():
        assert digests(d) == kept, f"input {d} was modified"


def flip_bytes(data: bytes, rng: random.Random, n: int, lo: int = 0, hi: int | None = None) -> bytes:
    b = bytearray(data)
    hi = len(b) if hi is None else min(hi, len(b))
    for _ in range(n):
        if hi > lo:
            b[rng.randrange(lo, hi)] ^= rng.randrange(1, 256)
    return bytes(b)


def key_paths(obj, prefix=(), depth=4):
    """Every (path) to a dict key or list item inside obj, up to `depth` levels."""
    out = []
    if depth == 0:
        return out
    if isinstance(obj, dict):
        items = obj.items()
    elif isinstance(obj, list):
        items = list(enumerate(obj))[:3]  # a few list entries are enough
    else:
        return out
    for k, v in items:
        out.append(prefix + (k,))
        out += key_paths(v, prefix + (k,), depth - 1)
    return out


def parent_of(obj, path):
    for k in path[:-1]:
        obj = obj[k]
    return obj


WRONG_VALUES = ["x", None, [], {}, -1, 0, 1e308, True, 2 ** 70, -2.5, [1, 2], {"a": 1}, "coco-v1", float("nan")]


# --------------------------------------------------------------------------- artifact corruption

FLOAT_ARRAYS = ("loss", "score", "direction", "calib_mean", "calib_std", "act_mean", "mean_intensity",
                "weight_norm", "weight")


def corrupt_artifact(src: Path, dst: Path, kind: str, rng: random.Random) -> str:
    """Copy the artifact `src` to `dst` and break it one way; returns a description."""
    from safetensors.numpy import load_file, save_file

    shutil.copytree(src, dst)
    js, st = dst / "neurons.json", dst / "neurons.safetensors"
    if kind == "st_truncate":
        data = st.read_bytes()
        cut = rng.randrange(0, len(data))
        st.write_bytes(data[:cut])
        return f"neurons.safetensors cut at {cut}/{len(data)}"
    if kind == "st_flip":
        data = st.read_bytes()
        header = 8 + int.from_bytes(data[:8], "little")
        n = rng.randint(1, 8)
        in_header = rng.random() < 0.5
        st.write_bytes(flip_bytes(data, rng, n, 0 if in_header else header, header if in_header else None))
        return f"{n} bytes flipped in the {'header' if in_header else 'data'} of neurons.safetensors"
    if kind == "json_truncate":
        data = js.read_bytes()
        cut = rng.randrange(0, len(data))
        js.write_bytes(data[:cut])
        return f"neurons.json cut at {cut}/{len(data)}"
    if kind == "json_flip":
        n = rng.randint(1, 4)
        js.write_bytes(flip_bytes(js.read_bytes(), rng, n))
        return f"{n} bytes flipped in neurons.json"
    if kind in ("json_delete_key", "json_wrong_type"):
        meta = json.loads(js.read_text())
        path = rng.choice(key_paths(meta))
        parent = parent_of(meta, path)
        if kind == "json_delete_key":
            if isinstance(parent, list):
                parent.pop(path[-1])
            else:
                del parent[path[-1]]
            what = f"deleted {'.'.join(map(str, path))}"
        else:
            value = rng.choice(WRONG_VALUES)
            parent[path[-1]] = value
            what = f"{'.'.join(map(str, path))} = {value!r}"
        js.write_text(json.dumps(meta, indent=1))
        return what

    arrays = load_file(str(st))
    name = rng.choice(sorted(arrays))
    a = arrays[name]
    if kind == "arr_wrong_dtype":
        dtype = rng.choice([np.int8, np.uint8, np.float16, np.bool_, np.int64, np.float64, np.int32, np.uint16])
        arrays[name] = a.astype(dtype)
        what = f"{name} as {np.dtype(dtype).name}"
    elif kind == "arr_wrong_length":
        mode = rng.choice(["shorter", "longer", "empty"])
        if mode == "shorter":
            arrays[name] = a[: max(0, len(a) - rng.randint(1, 5))]
        elif mode == "longer":
            arrays[name] = np.concatenate([a, a[: rng.randint(1, 5)]] if len(a) else [a, np.zeros(3, a.dtype)])
        else:
            arrays[name] = a[:0]
        what = f"{name} {mode}"
    elif kind == "arr_nonfinite":
        name = rng.choice([k for k in sorted(arrays) if k in FLOAT_ARRAYS or "." in k])
        a = arrays[name].astype(np.float32 if arrays[name].dtype.itemsize <= 4 else np.float64)
        value = rng.choice([np.nan, np.inf, -np.inf])
        if rng.random() < 0.5:
            a[...] = value
        else:
            a.reshape(-1)[rng.randrange(a.size)] = value
        arrays[name] = a
        what = f"{name} with {value}"
    elif kind == "arr_delete":
        del arrays[name]
        what = f"{name} removed"
    elif kind == "arr_reshape":
        arrays[name] = a.reshape(-1, 1) if rng.random() < 0.5 else np.stack([a, a])
        what = f"{name} made 2-D"
    elif kind == "arr_out_of_range":
        name = rng.choice(["selected", "layer", "proj", "index", "row_category", "row_label"])
        b = arrays[name].copy()
        b.reshape(-1)[rng.randrange(b.size)] = rng.choice([-1, 99, 10 ** 6, -(2 ** 31)])
        arrays[name] = b
        what = f"{name} with an out-of-range entry"
    else:
        raise ValueError(kind)
    save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(st), metadata={"method": "coco-v1"})
    return what


@pytest.fixture(scope="module")
def fuzz_art(planted, tmp_path_factory):
    model, pairs = planted
    out = tmp_path_factory.mktemp("fuzz-art") / "neurons"
    code, _, err = run_cli("identify", model, "--out", out, "--data", pairs, "--split", "all", "--quiet",
                           "--null-rounds", "1", "--ratio", "0.05")
    assert code == 0, err
    return out


@pytest.mark.parametrize("case", ARTIFACT_CASES, ids=[c.ident for c in ARTIFACT_CASES])
def test_corrupted_artifact_never_crashes(case, tmp_path, planted, fuzz_art):
    rng = random.Random(case.seed)
    bad = tmp_path / "art"
    what = corrupt_artifact(fuzz_art, bad, case.kind, rng)
    outs = tmp_path / "outs"
    outs.mkdir()
    model = planted[0]
    baseline = rng.choice(["coco", "rand", "norm", "mact"])
    argv = {"select": ["select", bad, "--out", outs / "sel", "--baseline", baseline],
            "report": ["report", bad, "--png", outs / "heat.png"],
            "bake": ["bake", model, bad, "--out", outs / "baked"] + rng.choice(
                [[], ["--lora"], ["--mode", "ablate-mean"], ["--mode", "ablate-zero"], ["--alpha", "0.5"]]),
            "ne": ["ne", model, bad, "--out", outs / "ne"]}[case.command]
    inputs = {bad: digests(bad), model: digests(model)}
    code, out, err = run_checked(*argv)
    try:
        assert_contract(code, out, err, outs, [], inputs)
    except AssertionError as exc:
        raise AssertionError(f"{case.command} on an artifact with {what}: {exc}") from None


# --------------------------------------------------------------------------- contrast JSONL corruption

def corrupt_pairs(src: Path, dst: Path, kind: str, rng: random.Random) -> str:
    data = src.read_bytes()
    lines = data.splitlines(keepends=True)
    i = rng.randrange(len(lines))
    if kind == "flip":
        n = rng.randint(1, 6)
        dst.write_bytes(flip_bytes(data, rng, n))
        return f"{n} bytes flipped"
    if kind == "truncate":
        cut = rng.randrange(0, len(data))
        dst.write_bytes(data[:cut])
        return f"cut at {cut}/{len(data)}"
    obj = json.loads(lines[i])
    if kind == "wrong_field_type":
        field = rng.choice(["category", "prompt", "biased", "unbiased", "group"])
        value = rng.choice(WRONG_VALUES)
        obj[field] = value
        lines[i] = (json.dumps(obj) + "\n").encode()
        what = f"line {i + 1}: {field} = {value!r}"
    elif kind == "wrong_line_type":
        value = rng.choice(["[1, 2]", '"text"', "42", "null", "true", "[]", "{}"])
        lines[i] = (value + "\n").encode()
        what = f"line {i + 1} is {value}"
    elif kind == "bad_encoding":
        field = rng.choice(["prompt", "biased", "unbiased", "category"])
        raw = rng.choice([b"\xff", b"\xc3\x28", b"\xe2\x82", b"\xed\xa0\x80", b"\x80\x81"])
        lines[i] = lines[i].replace(f'"{field}": "'.encode(), f'"{field}": "'.encode() + raw, 1)
        what = f"line {i + 1}: invalid UTF-8 {raw!r} in {field}"
    elif kind == "deep_nesting":
        depth = rng.choice([50_000, 200_000])
        field = rng.choice(["prompt", "group", "extra"])
        lines[i] = (lines[i].rstrip(b"\n")[:-1] + f', "{field}": '.encode() + b"[" * depth + b"]" * depth
                    + b"}\n")
        what = f"line {i + 1}: {field} nested {depth} deep"
    elif kind == "lone_surrogate":
        field = rng.choice(["prompt", "biased", "unbiased"])
        lines[i] = lines[i].replace(f'"{field}": "'.encode(), f'"{field}": "\\ud800'.encode(), 1)
        what = f"line {i + 1}: lone surrogate in {field}"
    elif kind == "control_and_bom":
        choice = rng.choice(["bom", "nul", "crlf", "ctrl"])
        if choice == "bom":
            lines[0] = b"\xef\xbb\xbf" + lines[0]
        elif choice == "nul":
            lines[i] = lines[i].replace(b'"prompt": "', b'"prompt": "\x00', 1)
        elif choice == "crlf":
            lines = [line.rstrip(b"\n") + b"\r\n" for line in lines]
        else:
            lines[i] = b"\x1b[2J" + lines[i]
        what = f"{choice} at line {i + 1}"
    elif kind == "missing_field":
        field = rng.choice(["category", "prompt", "biased", "unbiased"])
        del obj[field]
        lines[i] = (json.dumps(obj) + "\n").encode()
        what = f"line {i + 1} without {field}"
    elif kind == "huge_number":
        field = rng.choice(["category", "prompt", "group"])
        obj[field] = None
        lines[i] = (json.dumps(obj).replace("null", "1" + "0" * 5000) + "\n").encode()
        what = f"line {i + 1}: {field} is a 5001-digit number"
    else:
        raise ValueError(kind)
    dst.write_bytes(b"".join(lines))
    return what


@pytest.fixture(scope="module")
def small_pairs(tmp_path_factory):
    import tiny

    return tiny.planted_pairs(tmp_path_factory.mktemp("fuzz-pairs") / "pairs.jsonl", n=4)


@pytest.mark.parametrize("case", CONTRAST_CASES, ids=[c.ident for c in CONTRAST_CASES])
def test_corrupted_contrast_file_never_crashes(case, tmp_path, planted, small_pairs):
    rng = random.Random(case.seed)
    f = tmp_path / "pairs.jsonl"
    what = corrupt_pairs(small_pairs, f, case.kind, rng)
    outs = tmp_path / "outs"
    outs.mkdir()
    inputs = {planted[0]: digests(planted[0])}
    code, out, err = run_checked("identify", planted[0], "--out", outs / "neurons", "--data", f, "--split", "all",
                                 "--quiet", "--null-rounds", "0", "--ratio", "0.05")
    try:
        assert_contract(code, out, err, outs, [], inputs)
    except AssertionError as exc:
        raise AssertionError(f"identify on a contrast file with {what}: {exc}") from None
