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


@pytest.fixture(scope="session")
def demo_model(tmp_path_factory):
    """The SmolLM2 demo model (Llama), materialized once per session (slow: ~30 s)."""
    from vllm_coco.data.demo_model import write_demo_model

    out = tmp_path_factory.mktemp("demo") / "smollm2"
    write_demo_model(out, "llama")
    return out


@pytest.fixture(scope="session")
def demo_mistral(tmp_path_factory):
    """The SmolLM2 demo model as its MistralForCausalLM twin."""
    from vllm_coco.data.demo_model import write_demo_model

    out = tmp_path_factory.mktemp("demo") / "smollm2-mistral"
    write_demo_model(out, "mistral")
    return out


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


@pytest.fixture(scope="session")
def prompt_ids(demo_model):
    """PROMPTS as token ids of the demo model, N_TOKENS each (equal lengths: one batch in transformers)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(demo_model)
    ids = [tok(p + " Continue in detail, please, with a few more sentences.")["input_ids"][:N_TOKENS]
           for p in PROMPTS]
    assert all(len(i) == N_TOKENS for i in ids)
    return ids
