import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def planted(tmp_path_factory):
    """(model_dir, pairs.jsonl) of the planted-neuron tiny model."""
    import tiny

    root = tmp_path_factory.mktemp("planted")
    return tiny.planted_model(root / "model"), tiny.planted_pairs(root / "pairs.jsonl")


# The slowest modules first, longest first (measured: per-request ~9 min, identify in vLLM, the pipeline,
# the hf = vllm eval ~3-4 min each): the two xdist workers (tools/test.sh, --no-loadscope-reorder)
# take modules in this order, and the many fast modules fill in at the end. test_vllm_slow comes after
# other heavy ones: it reuses the served directories test_per_request_slow's worker builds (run_once).
HEAVY_FIRST = ("test_per_request_slow.py", "test_identify_vllm_slow.py", "test_pipeline.py", "test_evals_slow.py",
               "test_vllm_slow.py", "test_prefix_lm.py", "test_conditions.py", "test_demo_slow.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(HEAVY_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a module keeps its own order


def run_once(tmp_path_factory, name: str, build):
    """`build(directory)` once per test run, however many pytest-xdist workers run it (tools/test.sh):
    the first worker to ask builds under a file lock in the run's shared temp directory, the others
    wait and read its (JSON) result. Without xdist: once per session, like any session fixture."""
    import json

    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the run's directory, above each worker's own
    done = root / f"{name}.json"
    with FileLock(str(root / f"{name}.lock")):
        if not done.exists():
            done.write_text(json.dumps(build(root / name)))
    return json.loads(done.read_text())


def _demo(arch):
    def build(d):
        from vllm_coco.data.demo_model import write_demo_model

        write_demo_model(d / "model", arch)
        return str(d / "model")
    return build


@pytest.fixture(scope="session")
def planted_neurons(planted, tmp_path_factory):
    """`coco-tools identify` on the planted model's pairs at ratio 0.05 (read only)."""
    model, pairs = planted
    out = tmp_path_factory.mktemp("planted-neurons") / "neurons"
    code, _, err = run_cli("identify", model, "--out", out, "--data", pairs, "--split", "all", "--ratio", "0.05",
                           "--null-rounds", "0", "--quiet")
    assert code == 0, err
    return out


@pytest.fixture(scope="session")
def demo_model(tmp_path_factory):
    """The SmolLM2 demo model (Llama), materialized once per run (slow: ~30 s)."""
    return Path(run_once(tmp_path_factory, "demo-smollm2", _demo("llama")))


@pytest.fixture(scope="session")
def demo_mistral(tmp_path_factory):
    """The SmolLM2 demo model as its MistralForCausalLM twin."""
    return Path(run_once(tmp_path_factory, "demo-smollm2-mistral", _demo("mistral")))


@pytest.fixture(scope="session")
def vllm_env(tmp_path_factory):
    """Environment for vLLM subprocesses on this CPU machine (see shared/environment-notes.md)."""
    env = dict(os.environ)
    env.update(VLLM_CPU_KVCACHE_SPACE="1", VLLM_CACHE_ROOT=str(tmp_path_factory.mktemp("vllm-cache")),
               TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    return env


def run_cli(*args):
    """Run coco-tools in-process; returns (exit_code, stdout, stderr)."""
    import contextlib
    import io

    from vllm_coco.cli import main

    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main([str(a) for a in args])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
    return code, out.getvalue(), err.getvalue()


def expect_bad(parent, *args, match, unchanged=()):
    """Bad input to coco-tools: exit 2, exactly one line on stderr containing `match`, nothing new
    in `parent` (no output, no temp dir left behind), and every directory in `unchanged` intact."""
    import hashlib

    def digests(d):
        return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(d).rglob("*")) if p.is_file()}

    before = sorted(os.listdir(parent))
    kept = [digests(d) for d in unchanged]
    code, out, err = run_cli(*args)
    assert code == 2, (code, out, err)
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert match.lower() in lines[0].lower(), lines[0]
    assert sorted(os.listdir(parent)) == before
    assert [digests(d) for d in unchanged] == kept


# Prompts of the vLLM serving tests (test_vllm_slow, test_per_request_slow).
PROMPTS = [
    "The old man and the young woman were both waiting at the bus stop when",
    "Who is more likely to be bad with technology: the grandfather or the grandson? The answer is",
    "In a quiet village by the sea, the fishermen woke up early every morning to",
    "Write a short poem about the moon, the stars and the silent night sky:",
    "The capital of France is Paris. The capital of Germany is Berlin. The capital of Italy is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
    "Two friends, a Muslim and a Christian, met for coffee to talk about",
    "The doctor and the nurse discussed the patient's chart, and then",
]
N_TOKENS = 16
MAX_TOKENS = 16  # greedy tokens the serving tests generate per prompt


@pytest.fixture(scope="session")
def prompt_ids(demo_model):
    """PROMPTS as token ids of the demo model, N_TOKENS each (equal lengths: one batch in transformers)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(demo_model)
    ids = [tok(p + " Continue in detail, please, with a few more sentences.")["input_ids"][:N_TOKENS]
           for p in PROMPTS]
    assert all(len(i) == N_TOKENS for i in ids)
    return ids


# --------------------------------------------------------------------------- shared demo artifacts
# Built once per run and shared (issue 23; run_once: across xdist workers too): every test below needs
# *a* real neuron set on the demo model, not its own. Read only: a test that edits one copies it first.
DEMO_IDENTIFY = ("--limit", "4", "--categories", "Age,SES", "--null-rounds", "0", "--quiet")
SERVED_ALPHA = 2.0  # the NE gate's alpha of the served NE directories (not the default 1.0)
SERVED_LE_ALPHA = 2.0  # the LE strength of the baked checkpoint, its LoRA and the named "le" edit (default 1.0)


@pytest.fixture(scope="session")
def demo_neurons(demo_model, tmp_path_factory):
    """`coco-tools identify` (HF capture) on the demo model with DEMO_IDENTIFY."""
    def build(d):
        _coco("identify", demo_model, "--out", d, *DEMO_IDENTIFY)
        return str(d)
    return Path(run_once(tmp_path_factory, "demo-neurons", build))


@pytest.fixture(scope="session")
def long_prompt(demo_model):
    """A prompt of 320 demo-model tokens (several KV blocks: the prefix-cache tests)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(demo_model)
    return tok(" ".join(["The committee met again to weigh every proposal on its merits, and"] * 30))["input_ids"][:320]


def _coco(*args):
    code, _, err = run_cli(*args)
    assert code == 0, err


@pytest.fixture(scope="session")
def served(demo_model, demo_mistral, demo_neurons, tmp_path_factory):
    """Every directory the vLLM serving tests serve (test_vllm_slow, test_per_request_slow), by name:
    base (the demo model), ne (gate, alpha 2), ne0 (alpha 0), ne_a05b4 (alpha 0.5, beta 4),
    ne_mistral (the Mistral twin, its own neurons), multi (the ne gate + named edits le and
    ablate-zero), le (baked, alpha 2), lora (its adapter), ablate (baked ablate-zero)."""
    dirs = run_once(tmp_path_factory, "served", lambda root: _serve_dirs(root, demo_model, demo_mistral, demo_neurons))
    return {k: Path(v) for k, v in dirs.items()}


def _serve_dirs(root, demo_model, demo_mistral, demo_neurons) -> dict[str, str]:
    n_mistral = root / "n-mistral"
    _coco("identify", demo_mistral, "--out", n_mistral, *DEMO_IDENTIFY)
    d = {"base": demo_model, "neurons": demo_neurons}
    alpha, le = str(SERVED_ALPHA), str(SERVED_LE_ALPHA)
    for name, model, neurons, extra in [
            ("ne", demo_model, demo_neurons, ["--alpha", alpha]),
            ("ne0", demo_model, demo_neurons, ["--alpha", "0"]),
            ("ne_a05b4", demo_model, demo_neurons, ["--alpha", "0.5", "--beta", "4"]),
            ("ne_mistral", demo_mistral, n_mistral, ["--alpha", alpha]),
            ("multi", demo_model, demo_neurons, ["--alpha", alpha, "--with", "le", "--with", "ablate-zero",
                                                 "--le-alpha", le])]:
        _coco("ne", model, neurons, "--out", root / name, *extra)
        d[name] = root / name
    for name, extra in [("le", ["--alpha", le]), ("lora", ["--alpha", le, "--lora"]),
                        ("ablate", ["--mode", "ablate-zero"])]:
        _coco("bake", demo_model, demo_neurons, "--out", root / name, *extra)
        d[name] = root / name
    return {k: str(v) for k, v in d.items()}


def lora_spec(served):
    """tests/vllm_worker.py's spec of the base model served with the LE adapter."""
    return f"{served['base']},lora={served['lora']}"


@pytest.fixture(scope="session")
def eager_refs(served, prompt_ids, long_prompt, vllm_env, tmp_path_factory):
    """Each served directory on its own plain vLLM engine, eager, all in one worker subprocess:
    prompt logprobs and greedy continuations of PROMPTS (prompt_ids) and, last, of long_prompt.
    Keyed by the served name ("lora": the base model with the adapter). The references of the NE,
    LE and LoRA serving tests and of the per-request mixed batch."""
    import json
    import subprocess

    names = ["ne", "ne_mistral", "ne0", "ne_a05b4", "le", "ablate", "base"]
    specs = {**{n: str(served[n]) for n in names}, "lora": lora_spec(served)}

    def build(tmp):
        tmp.mkdir()
        (tmp / "p.json").write_text(json.dumps({"prompts": prompt_ids + [long_prompt], "max_tokens": MAX_TOKENS}))
        proc = subprocess.run([sys.executable, str(Path(__file__).with_name("vllm_worker.py")), str(tmp / "o.json"),
                               str(tmp / "p.json"), *specs.values(), "--eager"],
                              env=vllm_env, capture_output=True, text=True, timeout=1800)
        assert proc.returncode == 0, proc.stderr[-4000:]
        out = json.loads((tmp / "o.json").read_text())
        return {name: out[spec] for name, spec in specs.items()}
    return run_once(tmp_path_factory, "eager-refs", build)


@pytest.fixture(scope="session")
def bbq_tiny_model(tmp_path_factory):
    """A tiny random Llama whose word-level vocabulary covers the BBQ text of the test categories
    (so prompts and answer options are real tokens, not all <unk>); no chat template."""
    import tiny
    import torch
    from tokenizers import pre_tokenizers
    from transformers import LlamaForCausalLM

    from vllm_coco.data.contrast import bbq_items

    items, _ = bbq_items("bbq", ["Religion", "Age"], split="all", condition=None)
    split = pre_tokenizers.Whitespace().pre_tokenize_str
    words = sorted({w for it in items for text in (it.user_message(), *it.answers) for w, _ in split(text)})
    tok = tiny.word_tokenizer(words)
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny.tiny_config(vocab_size=len(tok)))
    return tiny.save_model(model, tok, tmp_path_factory.mktemp("tiny") / "model")
