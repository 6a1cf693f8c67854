"""tools/paired_compare.py: re-scoring of logged documents and the paired item-level comparison."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _tool():
    spec = importlib.util.spec_from_file_location("paired_compare", ROOT / "tools" / "paired_compare.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _write_run(d: Path, unknown_ll: list[float]):
    """One ambiguous item per entry (3 orders each, options "The grandfather" (biased, 15 bytes),
    "The boy" (7), "Unknown" (7)); option log-likelihoods: -20, -20, unknown_ll."""
    d.mkdir()
    with open(d / "samples_stereo_coco_Age.jsonl", "w") as fh:
        for i, u in enumerate(unknown_ll):
            for k, order in enumerate([(0, 1, 2), (1, 2, 0), (2, 0, 1)]):
                lls = {0: -20.0, 1: -20.0, 2: u}
                pos = {orig: shown for shown, orig in enumerate(order)}
                doc = {"id": f"Age:{i}", "condition": "ambig", "order": list(order),
                       "choices": [["The grandfather", "The boy", "Unknown"][o] for o in order],
                       "label": pos[2], "unknown": pos[2], "biased": pos[0]}
                fh.write(json.dumps({"doc_id": 3 * i + k, "doc": doc,
                                     "resps": [[[lls[o], False]] for o in order]}) + "\n")


def test_paired_difference_and_scoring(tmp_path, capsys):
    tool = _tool()
    # summed: "unknown" wins at -10 (> -20) and loses at -25 or -30
    _write_run(tmp_path / "base", [-10.0, -10.0, -25.0, -25.0])
    _write_run(tmp_path / "edit", [-30.0, -10.0, -10.0, -10.0])
    base = tool.per_item(tool.records(tmp_path / "base", "sum"))
    edit = tool.per_item(tool.records(tmp_path / "edit", "sum"))
    assert base == {"Age:0": 1.0, "Age:1": 1.0, "Age:2": 0.0, "Age:3": 0.0}
    p = tool.paired(base, edit, rounds=200)
    assert p["diff"] == 0.25 and (p["up"], p["down"], p["items"]) == (2, 1, 4)
    assert p["lo"] <= 0.25 <= p["hi"]
    # per byte: -20/15 = -1.33 beats -10/7 = -1.43, so the biased option wins where summed picked "unknown"
    assert tool.per_item(tool.records(tmp_path / "base", "per-byte"))["Age:0"] == 0.0
    tool.main([str(tmp_path / "base"), str(tmp_path / "edit"), "--rounds", "100"])
    out = capsys.readouterr().out
    assert "| edit | sum | 0.750 | +0.250 [" in out and "2 / 1 of 4" in out
