"""tools/gpu_check.py --dry-run: every part of the prepared GPU check runs end to end on the CPU."""

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

NUMBERS = ("capture_ratio", "plain_tok_s", "capture_tok_s", "ne_gate_ratio", "ne_base_tok_s", "ne_gated_tok_s",
           "scoring_gpu_s_per_category", "scoring_gpu_s_6_categories", "scoring_gpu_f32_s_per_category",
           "scoring_cpu_projected_s_per_category", "scoring_speedup", "scoring_parity_max_abs",
           "scoring_f32_max_abs_diff", "scoring_f32_top1pct_overlap", "parity_max_abs_logprob",
           "parity_greedy_agreement", "parity_gate_max_effect")


def test_dry_run(tmp_path):
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "gpu_check.py"), "--dry-run", "--out", str(out)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert json.loads(out.read_text()) == res
    assert res["errors"] == {}
    assert res["heavy_imports"] == []  # nothing the GPU machine lacks comes in with vllm_coco
    for key in NUMBERS:
        assert isinstance(res[key], (int, float)) and math.isfinite(res[key]), key
    for key in ("device", "torch", "transformers", "parity_model"):
        assert res[key], key
    assert set(res["wall_s"]) >= {"capture", "gate", "scoring", "parity", "total"}
    assert res["scoring_parity_max_abs"] <= 1e-9 and res["parity_pass"] is True
    assert res["parity_gate_max_effect"] > 0  # the gate was on
    assert "seeded random weights" in res["parity_model"]


def test_help_and_bad_part():
    tool = str(ROOT / "tools" / "gpu_check.py")
    help_ = subprocess.run([sys.executable, tool, "--help"], capture_output=True, text=True, timeout=120)
    assert help_.returncode == 0 and "--dry-run" in help_.stdout and "H200" in help_.stdout
    bad = subprocess.run([sys.executable, tool, "--dry-run", "--parts", "nope"], capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 2 and "unknown part" in bad.stderr
