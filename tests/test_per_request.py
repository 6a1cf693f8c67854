"""Per-request NE-COCO settings without an engine: parsing and refusals (the server's 400 lines),
prefix-cache salts, vLLM's logits-processor loaders accepting the validator, the model runner's
per-token layout of a mixed step, named edits in an NE directory, and the CLI's refusals."""

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import run_cli

from vllm_coco.core.names import PER_REQUEST_ENV, SALT_PREFIX
from vllm_coco.serve.request_settings import Menu, Setting

MENU = Menu(alpha=2.0, beta=2.0, lam=0.5, w_min=0.25, edits=("le", "ablate-zero"))


def test_a_request_without_coco_keys_gets_the_directory_setting():
    for args in (None, {}, {"other": 1}):
        assert MENU.parse(args) == Setting("ne", 2.0, 2.0, 0.5)


def test_settings_are_parsed_and_named_edits_picked():
    assert MENU.parse({"coco_alpha": 0}) == Setting("ne", 0.0, 2.0, 0.5)
    assert MENU.parse({"coco_alpha": "0.5", "coco_beta": 4, "coco_lam": 1}) == Setting("ne", 0.5, 4.0, 1.0)
    assert MENU.parse({"coco_edit": "le"}) == Setting("le", 0.0, 2.0, 0.5)
    assert MENU.parse({"coco_edit": "base"}).alpha == 0.0
    assert MENU.columns(MENU.parse({"coco_edit": "ablate-zero"})) == (0.0, 2.0, 0.5, 1, 1.0)
    assert MENU.columns(MENU.default) == (2.0, 2.0, 0.5, -1, 1.0)


def test_a_named_edit_takes_a_scale():
    """coco_scale: a named edit's strength, 1 when absent, parsed as strictly as the gate's numbers."""
    assert MENU.parse({"coco_edit": "le"}).scale == 1.0
    assert MENU.parse({"coco_edit": "le", "coco_scale": 0.5}) == Setting("le", 0.0, 2.0, 0.5, 0.5)
    assert MENU.parse({"coco_edit": "le", "coco_scale": " 2.5 "}).scale == 2.5  # a plain decimal string
    assert MENU.parse({"coco_edit": "ablate-zero", "coco_scale": -1000}).scale == -1000.0  # the bound itself
    assert MENU.parse({"coco_edit": "le", "coco_scale": 0}).scale == 0.0
    assert MENU.parse({"coco_edit": "le", "coco_scale": 1}) == MENU.parse({"coco_edit": "le"})
    assert MENU.columns(MENU.parse({"coco_edit": "ablate-zero", "coco_scale": "0.25"})) == (0.0, 2.0, 0.5, 1, 0.25)
    assert Setting("ne", 2.0, 2.0, 0.5) == MENU.default  # positional construction: scale 1


def test_a_model_without_named_edits_refuses_a_scale():
    with pytest.raises(ValueError, match="coco_scale applies to named edits.*this model carries none"):
        Menu(alpha=2.0, beta=2.0, lam=0.5, w_min=0.25).parse({"coco_scale": 2})


def test_scales_salt_apart_and_scale_1_is_the_named_edit_itself():
    """Different strengths never share KV blocks; scale 1 spelled out is the same setting as none.
    Scale 0 computes what "base" does but keeps a namespace of its own (a choice: blocks not shared, no harm)."""
    def salt(scale=None, edit="le", client=None):
        args = {"coco_edit": edit} if scale is None else {"coco_edit": edit, "coco_scale": scale}
        return MENU.salt(MENU.parse(args), client)

    assert salt(1) == salt(1.0) == salt("1") == salt() and salt(1, client="u") == salt(client="u")
    assert salt(0.5 + 1e-12) == salt(0.5)  # equal in float32
    assert salt(-0.0) == salt(0)
    every = [salt(s) for s in (2, 1, 0.5, 0, -1)] + [salt(1, "ablate-zero"), salt(edit="base")]
    assert len(set(every)) == len(every) and all(v.startswith(SALT_PREFIX) for v in every)


@pytest.mark.parametrize("args,words", [
    ({"coco_strength": 1}, ["coco_strength", "coco_edit, coco_alpha, coco_beta, coco_lam, coco_scale"]),
    ({"coco_edit": "nope"}, ["coco_edit", "'nope'", "ne, base, le, ablate-zero"]),
    ({"coco_edit": 3}, ["coco_edit", "allowed: ne, base"]),
    ({"coco_alpha": "x"}, ["coco_alpha", "'x'", "not a number"]),
    ({"coco_alpha": True}, ["coco_alpha", "not a number"]),
    ({"coco_alpha": [1]}, ["coco_alpha", "not a number"]),
    ({"coco_alpha": "nan"}, ["coco_alpha", "not a number"]),
    ({"coco_alpha": math.inf}, ["coco_alpha", "finite"]),
    # issue 22: everything the scheduler or runner could not take is refused at admission
    ({"coco_alpha": 1e39}, ["coco_alpha", "float32"]),  # overflows float32 (it stopped the engine)
    ({"coco_alpha": 1e308}, ["coco_alpha", "float32"]),
    ({"coco_alpha": "1e308"}, ["coco_alpha", "float32"]),
    ({"coco_alpha": 10 ** 400}, ["coco_alpha", "float32"]),  # an integer no float holds
    ({"coco_alpha": "1_0"}, ["coco_alpha", "'1_0'", "not a number"]),  # Python's float() reads 10
    ({"coco_alpha": "0x10"}, ["coco_alpha", "not a number"]),
    ({"coco_beta": False}, ["coco_beta", "not a number"]),
    ({"coco_alpha": {}}, ["coco_alpha", "{}", "not a number"]),
    ({"COCO_ALPHA": 0.5}, ["'COCO_ALPHA'", "exact spelling", "coco_alpha"]),  # was silently ignored
    ({"coco-alpha": 0.5}, ["'coco-alpha'", "coco_alpha"]),
    ({"Coco_edit": "le"}, ["'Coco_edit'", "coco_edit"]),
    ({"coco_edit": "x" * 5000}, ["coco_edit", "...", "allowed"]),  # the 400 names it in one short line
    ({"coco_alpha": -5}, ["coco_alpha", "-5", "negative"]),  # 1 + alpha * w_min < 0
    ({"coco_alpha": -1.5}, ["coco_alpha", "negative"]),  # 1 + alpha < 0
    ({"coco_beta": 0}, ["coco_beta", "positive"]),
    ({"coco_lam": 1.5}, ["coco_lam", "[0, 1]"]),
    ({"coco_edit": "le", "coco_alpha": 1}, ["coco_alpha", "applies to the gate", "'le'"]),
    # a named edit's strength: with a named edit only, a finite number within [-1000, 1000]
    ({"coco_scale": 0.5}, ["coco_scale", "applies to named edits", "'ne'", "coco_edit (le, ablate-zero)"]),
    ({"coco_edit": "ne", "coco_scale": 1}, ["coco_scale", "named edits", "'ne'"]),  # even the neutral value
    ({"coco_edit": "base", "coco_scale": 0}, ["coco_scale", "named edits", "'base'"]),
    ({"coco_alpha": 0.5, "coco_scale": 2}, ["coco_scale", "named edits"]),
    ({"coco_edit": "le", "coco_scale": "nan"}, ["coco_scale", "'nan'", "not a number"]),
    ({"coco_edit": "le", "coco_scale": math.nan}, ["coco_scale", "finite"]),
    ({"coco_edit": "le", "coco_scale": -math.inf}, ["coco_scale", "finite"]),
    ({"coco_edit": "le", "coco_scale": True}, ["coco_scale", "not a number"]),
    ({"coco_edit": "le", "coco_scale": "1_0"}, ["coco_scale", "not a number"]),
    ({"coco_edit": "le", "coco_scale": 1e39}, ["coco_scale", "float32"]),
    ({"coco_edit": "le", "coco_scale": 1000.5}, ["coco_scale 1000.5", "outside [-1000, 1000]", "such as 0.5"]),
    ({"coco_edit": "le", "coco_scale": "-2e3"}, ["coco_scale '-2e3'", "outside [-1000, 1000]"]),
    ({"coco_edit": "le", "coco_scale": 2, "coco_alpha": 1}, ["coco_alpha", "applies to the gate"]),
    ({"coco_edit": "le", "COCO_SCALE": 2}, ["'COCO_SCALE'", "coco_scale"]),
])
def test_bad_settings_are_one_line_errors_naming_the_field(args, words):
    with pytest.raises(ValueError) as exc:
        MENU.parse(args)
    msg = str(exc.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg


def test_salts_are_namespaced_stable_and_distinct():
    assert MENU.salt(MENU.default) is None  # default requests keep sharing with plain ones
    assert MENU.salt(MENU.parse({"coco_alpha": 2.0})) is None  # the default, spelled out
    s = {name: MENU.salt(MENU.parse(a)) for name, a in [
        ("a0", {"coco_alpha": 0}), ("a05", {"coco_alpha": 0.5}), ("le", {"coco_edit": "le"}),
        ("base", {"coco_edit": "base"}), ("b4", {"coco_beta": 4}), ("lam", {"coco_lam": 0.25})]}
    assert len(set(s.values())) == len(s) and all(v.startswith(SALT_PREFIX) for v in s.values())
    assert MENU.salt(MENU.parse({"coco_alpha": "0.5"})) == s["a05"]
    # equal in float32 (what the model computes with): the same salt
    assert MENU.salt(MENU.parse({"coco_alpha": 0.5 + 1e-12})) == s["a05"]


def test_a_client_salt_cannot_reach_another_settings_namespace():
    """Issue 22: a default request that sends the salt of alpha 2 (or of any setting, with or without
    its own salt) never lands in that setting's blocks; equal (client salt, setting) pairs still share."""
    settings = [MENU.default, MENU.parse({"coco_alpha": 0.5}), MENU.parse({"coco_edit": "le"})]
    clients = [None, "", "user-a", SALT_PREFIX]
    salts = {(i, c): MENU.salt(s, c) for i, s in enumerate(settings) for c in clients}
    assert salts[0, None] is None  # a plain request stays unsalted (shares with requests that say nothing)
    named = {k: v for k, v in salts.items() if v is not None}
    assert len(set(named.values())) == len(named)  # every (setting, client salt) pair apart
    for forged in named.values():  # a client sending a namespace it saw, at any setting
        for s in settings:
            assert MENU.salt(s, forged) not in named.values()
    assert MENU.salt(settings[1], "user-a") == MENU.salt(MENU.parse({"coco_alpha": "0.5"}), "user-a")


def test_the_scheduler_fails_a_request_it_cannot_parse_and_keeps_the_rest(monkeypatch):
    """Issue 22: a setting that slips past admission (an engine without the validator) fails that
    request through vLLM's error path instead of raising inside the engine core."""
    from vllm_coco.serve import per_request

    class Base:
        def __init__(self):
            self.requests, self.grammar_compile_error_reqs, self.added = {}, set(), []
            self.vllm_config = SimpleNamespace(model_config=SimpleNamespace(model="nedir"))

        def add_request(self, request):
            self.added.append(request.request_id)
            self.requests[request.request_id] = request

    class Sched(per_request._Salted, Base):
        pass

    monkeypatch.setattr(per_request, "_menu", lambda _: MENU)

    def request(rid, extra, salt=None):
        r = SimpleNamespace(request_id=rid, sampling_params=SimpleNamespace(extra_args=extra), cache_salt=salt,
                            block_hashes=["stale"], rehashed=0)
        r.update_block_hashes = lambda: setattr(r, "rehashed", r.rehashed + 1)
        return r

    sched = Sched()
    bad, good, plain = request("bad", {"coco_alpha": 1e39}), request("ok", {"coco_alpha": 0.5}), request("p", None)
    for r in (bad, good, plain):
        sched.add_request(r)
    assert sched.added == ["bad", "ok", "p"] and sched.grammar_compile_error_reqs == {"bad"}
    assert bad.cache_salt == f"{SALT_PREFIX}invalid:bad" and bad.rehashed == 1 and bad.block_hashes == []
    assert good.cache_salt == MENU.salt(MENU.parse({"coco_alpha": 0.5})) and good.rehashed == 1
    assert plain.cache_salt is None and plain.rehashed == 0 and plain.block_hashes == ["stale"]
    assert per_request._parse_or_default(MENU, {"coco_alpha": 1e39}) == MENU.default


def test_salted_requests_hash_their_first_block_apart():
    """vLLM hashes the salt into the first block: different settings, different block chains."""
    from vllm.sampling_params import SamplingParams
    from vllm.utils.hashing import sha256
    from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
    from vllm.v1.request import Request

    init_none_hash(sha256)
    hasher = get_request_block_hasher(4, sha256)

    def first_block(salt):
        r = Request(request_id="r", prompt_token_ids=list(range(12)), sampling_params=SamplingParams(),
                    pooling_params=None, cache_salt=salt, block_hasher=hasher)
        return r.block_hashes[0]

    a, b = MENU.salt(MENU.parse({"coco_alpha": 0})), MENU.salt(MENU.parse({"coco_alpha": 0.5}))
    assert first_block(None) != first_block(a) != first_block(b)
    assert first_block(a) == first_block(MENU.salt(MENU.parse({"coco_alpha": 0.0})))


def test_vllm_loads_the_validator_and_turns_its_errors_into_validation_errors(monkeypatch, tmp_path):
    from vllm.exceptions import VLLMValidationError
    from vllm.sampling_params import SamplingParams
    from vllm.v1.sample.logits_processor import _load_custom_logitsprocs, validate_logits_processors_parameters
    from vllm.v1.worker.gpu.sample.logits_processor.loader import _load_v2_logitsprocs_plugins

    from vllm_coco.serve.validator import CocoRequestValidator

    assert CocoRequestValidator in _load_custom_logitsprocs(())  # V1 (CPU) loader
    assert CocoRequestValidator in _load_v2_logitsprocs_plugins()  # V2 loader checks the class: it must pass
    monkeypatch.delenv(PER_REQUEST_ENV, raising=False)
    validate_logits_processors_parameters(None, SamplingParams())  # no coco keys: nothing to say
    with pytest.raises(VLLMValidationError, match="coco-tools serve"):
        validate_logits_processors_parameters(None, SamplingParams(extra_args={"coco_alpha": 0.5}))


def test_validator_checks_against_the_served_directory(monkeypatch, ne_multi):
    from vllm.exceptions import VLLMValidationError
    from vllm.sampling_params import SamplingParams
    from vllm.v1.sample.logits_processor import validate_logits_processors_parameters

    monkeypatch.setenv(PER_REQUEST_ENV, str(ne_multi))
    validate_logits_processors_parameters(None, SamplingParams(extra_args={"coco_edit": "le"}))
    with pytest.raises(VLLMValidationError, match="allowed: ne, base, le, ablate-zero"):
        validate_logits_processors_parameters(None, SamplingParams(extra_args={"coco_edit": "ablate-mean"}))


def test_a_mixed_step_is_laid_out_token_by_token():
    """The runner writes each request's setting over its contiguous run of tokens, in batch order;
    a default-only step afterwards restores the defaults."""
    from vllm_coco.serve.per_request import _CocoRunner
    from vllm_coco.serve.vllm_models import CocoStep

    coco = {"alpha": 2.0, "beta": 2.0, "lam": 0.5, "edits": [{"name": "le"}, {"name": "ablate-zero"}]}
    step = CocoStep(16, coco)
    extra = {"a": None, "b": {"coco_alpha": 0.5}, "c": {"coco_edit": "ablate-zero"}, "d": {"coco_lam": 1},
             "e": {"coco_edit": "le", "coco_scale": "0.5"}, "f": {"coco_edit": "ablate-zero", "coco_scale": 0}}

    class Runner(_CocoRunner):
        model_config = SimpleNamespace(model="unused")
        requests = {r: SimpleNamespace(sampling_params=SimpleNamespace(extra_args=e)) for r, e in extra.items()}
        input_batch = SimpleNamespace(req_ids=["b", "a", "c", "d", "e", "f"])

        def get_model(self):
            return SimpleNamespace(coco_step=step)

    import vllm_coco.serve.per_request as pr

    runner = Runner()
    orig = pr._menu
    pr._menu = lambda _: Menu(2.0, 2.0, 0.5, 0.1, ("le", "ablate-zero"))
    try:
        runner._coco_fill(SimpleNamespace(finished_req_ids=set()), np.array([2, 3, 1, 2, 2, 1]))
        assert step.alpha[:11, 0].tolist() == [0.5, 0.5, 2, 2, 2, 0, 2, 2, 0, 0, 0]
        assert step.lam[:8, 0].tolist() == [0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 1.0, 1.0]
        # a named edit's column holds its scale (1 unless the request set coco_scale; 0 is off)
        assert step.on[:11].tolist() == [[0, 0]] * 5 + [[0, 1]] + [[0, 0]] * 2 + [[0.5, 0]] * 2 + [[0, 0]]
        runner.input_batch = SimpleNamespace(req_ids=["a"])
        runner._coco_fill(SimpleNamespace(finished_req_ids={"b", "c", "d", "e", "f"}), np.array([4]))
        assert torch.equal(step.alpha, torch.full((16, 1), 2.0)) and not step.on.any()
        assert set(runner._coco["settings"]) == {"a"}
    finally:
        pr._menu = orig


@pytest.fixture(scope="module")
def neurons(planted_neurons):
    return planted_neurons


@pytest.fixture(scope="module")
def ne_multi(planted, neurons, tmp_path_factory):
    """An NE directory of the planted model carrying the named edits le and ablate-zero."""
    model = planted[0]
    out = tmp_path_factory.mktemp("multi") / "ne"
    code, _, err = run_cli("ne", model, neurons, "--out", out, "--with", "le", "--with", "ablate-zero",
                           "--le-alpha", "1.5")
    assert code == 0, err
    return out


def test_named_edits_are_stored_as_the_bake_factors(ne_multi, neurons):
    from vllm_coco.core.ne_format import NEDirectory
    from vllm_coco.edit.conditions import linear_edit

    ne = NEDirectory.read(ne_multi)
    assert ne.edit_names == ["le", "ablate-zero"] and ne.w_min() == pytest.approx(ne.coco["w_min"])
    stored = ne.named_edits()
    for name, mode, alpha in (("le", "le", 1.5), ("ablate-zero", "ablate-zero", None)):
        want = linear_edit(neurons, mode, alpha)
        assert sorted(stored[name]) == sorted(want.channels)
        for layer, t in stored[name].items():
            assert t["channels"].tolist() == want.channels[layer].tolist()
            np.testing.assert_allclose(t["gain"].numpy(), want.gain[layer], rtol=1e-7)
            np.testing.assert_array_equal(t["offset"].numpy(), want.offset[layer].astype(np.float32))


def test_hf_reference_runs_named_edits_per_row(ne_multi):
    """load_ne_model registers the directory's named edits: a mixed batch equals each row alone."""
    from vllm_coco.serve.hf_reference import load_ne_model

    model, _ = load_ne_model(ne_multi)
    table = model.coco_conditions
    x = torch.randint(0, 60, (4, 7))
    names = ["ne", "base", "le", "ablate-zero"]
    with torch.no_grad(), table.rows(names):
        mixed = model(input_ids=x).logits
        for i, name in enumerate(names):
            with table.rows([name]):
                alone = model(input_ids=x[i:i + 1]).logits[0]
            torch.testing.assert_close(mixed[i], alone, atol=1e-5, rtol=0)
    assert not torch.allclose(mixed[2], mixed[1])  # the edits do something


def test_hf_reference_runs_a_named_edit_at_a_scale(ne_multi):
    """scaled_condition(model, NAME, s) equals the directory's tables rescaled by hand in float32 as vLLM's
    named edit computes them (gain 1 + s·(gain - 1), offset s·offset); s 0 is the base model, s 1 the edit."""
    from vllm_coco.core.errors import CocoError
    from vllm_coco.core.ne_format import NEDirectory
    from vllm_coco.edit.conditions import LinearEdit
    from vllm_coco.serve.hf_reference import load_ne_model, scaled_condition

    model, _ = load_ne_model(ne_multi)
    table = model.coco_conditions
    stored = NEDirectory.read(ne_multi).named_edits()
    x = torch.randint(0, 60, (2, 7), generator=torch.Generator().manual_seed(0))

    def logits(condition):
        with torch.no_grad(), table.rows([condition] * len(x)):
            return model(input_ids=x).logits

    for name, s in (("le", 0.5), ("le", 2.0), ("le", -1.0), ("ablate-zero", 0.5)):
        t = stored[name]
        table.add("by-hand", LinearEdit(name, {k: v["channels"].numpy() for k, v in t.items()},
                                        {k: (1.0 + s * (v["gain"] - 1.0)).numpy() for k, v in t.items()},
                                        {k: (s * v["offset"]).numpy() for k, v in t.items()}))
        got = logits(scaled_condition(model, name, s))
        torch.testing.assert_close(got, logits("by-hand"), atol=1e-5, rtol=0)
        assert not torch.allclose(got, logits(name), atol=1e-4)  # another strength: other logits
    base = logits("base")
    for name in ("le", "ablate-zero"):
        torch.testing.assert_close(logits(scaled_condition(model, name, 0)), base, atol=1e-6, rtol=0)
        torch.testing.assert_close(logits(scaled_condition(model, name, 1)), logits(name), atol=1e-6, rtol=0)
    assert scaled_condition(model, "le", 0.5) == scaled_condition(model, "le", "0.5")  # registered once
    for bad, words in (("ne", "applies to named edits"), ("nope", "no edit condition"), ("le", "outside")):
        with pytest.raises(CocoError, match=words):
            scaled_condition(model, bad, 1e4 if words == "outside" else 0.5)


def test_ne_refuses_le_alpha_without_le(planted, neurons, tmp_path):
    code, _, err = run_cli("ne", planted[0], neurons, "--out", tmp_path / "o", "--le-alpha", "2")
    assert code == 2 and "--with le" in err and not (tmp_path / "o").exists()


def test_generate_checks_every_line_before_an_engine_starts(ne_multi, planted, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "a"}) + "\n" + json.dumps({"prompt": "b", "coco_edit": "x"}) + "\n")
    code, _, err = run_cli("generate", ne_multi, "--prompts", prompts, "--out", tmp_path / "o.jsonl")
    assert code == 2 and f"{prompts}:2" in err and "coco_edit 'x'" in err and not (tmp_path / "o.jsonl").exists()
    prompts.write_text(json.dumps({"prompt": "a"}) + "\n")
    code, _, err = run_cli("generate", ne_multi, "--prompts", prompts, "--out", tmp_path / "o.jsonl",
                           "--alpha", "-9")
    assert code == 2 and err.strip().splitlines()[-1].startswith("coco-tools: error: --alpha: coco_alpha -9")
    code, _, err = run_cli("generate", planted[0], "--prompts", prompts, "--out", tmp_path / "o.jsonl",
                           "--alpha", "1")
    assert code == 2 and "need an NE-COCO directory" in err
    # issue 22: these lines ended in a traceback (400 digits) or a dead engine (1e39, EngineDeadError)
    for line in ['"coco_alpha": 1' + "0" * 400, '"coco_alpha": 1e39', '"coco_alpha": true', '"COCO_ALPHA": 1']:
        prompts.write_text('{"prompt": "a", ' + line + "}\n")
        code, _, err = run_cli("generate", ne_multi, "--prompts", prompts, "--out", tmp_path / "o.jsonl")
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and f"{prompts}:1" in lines[0] and "coco_alpha" in lines[0], err
        assert not (tmp_path / "o.jsonl").exists()


def test_serve_builds_the_vllm_command_and_refuses_what_it_cannot_serve(ne_multi, planted):
    code, out, err = run_cli("serve", ne_multi, "--dry-run", "--port", "8123")
    assert code == 0, err
    assert f"{PER_REQUEST_ENV}={ne_multi}" in out
    assert "serve " + str(ne_multi) in out and "--worker-cls vllm_coco.serve.per_request.CocoWorker" in out
    assert "--scheduler-cls vllm_coco.serve.per_request.Coco" in out and out.rstrip().endswith("--port 8123")
    assert "--middleware vllm_coco.serve.strict_settings.StrictSettings" in out
    code, _, err = run_cli("serve", ne_multi, "--speculative-config", "{}")
    assert code == 2 and "--speculative-config" in err
    code, _, err = run_cli("serve", planted[0], "--dry-run")
    assert code == 2 and "not an NE-COCO directory" in err


def test_serve_refuses_a_truncated_gate_file_and_ne_a_non_finite_le_alpha(ne_multi, planted, neurons, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(ne_multi, broken)
    gate = broken / "coco_gate.safetensors"
    gate.write_bytes(gate.read_bytes()[:200])
    code, _, err = run_cli("serve", broken, "--dry-run")
    assert code == 2 and "coco_gate.safetensors is not a readable safetensors file" in err
    code, _, err = run_cli("ne", planted[0], neurons, "--out", tmp_path / "o", "--with", "le", "--le-alpha", "nan")
    assert code == 2 and "--le-alpha nan" in err and not (tmp_path / "o").exists()


def test_the_server_middleware_sees_raw_values_before_the_schema_coerces_them(monkeypatch):
    """Issue 22: vLLM's OpenAI schema turns `true` into 1 and answers `{}` in 12 lines; the middleware
    `coco-tools serve` adds reads the body as sent: one-line 400s, and every other request reaches the
    app with its body intact (chunked or not)."""
    import asyncio

    from vllm_coco.serve import request_settings, strict_settings

    monkeypatch.setenv(PER_REQUEST_ENV, "nedir")
    monkeypatch.setattr(request_settings, "menu_of", lambda _: MENU)
    seen = []

    async def app(scope, receive, send):
        body, more = b"", True
        while more:
            m = await receive()
            body, more = body + m.get("body", b""), m.get("more_body", False)
        seen.append(body)
        await send({"type": "http.response.start", "status": 200, "headers": []})

    def call(body: bytes, method="POST", chunks=1):
        parts = [body[i::chunks] for i in range(chunks)] if chunks == 1 else [body[:5], body[5:]]
        msgs = [{"type": "http.request", "body": b, "more_body": i < len(parts) - 1} for i, b in enumerate(parts)]
        sent = []

        async def receive():
            return msgs.pop(0)

        async def send(m):
            sent.append(m)

        asyncio.run(strict_settings.StrictSettings(app)({"type": "http", "method": method}, receive, send))
        return sent[0]["status"], (json.loads(sent[1]["body"])["error"]["message"] if len(sent) > 1 else "")

    for xargs, words in [({"coco_alpha": True}, ["coco_alpha", "not a number"]),
                         ({"coco_alpha": {}}, ["coco_alpha", "{}", "not a number"]),
                         ({"coco_alpha": 1e39}, ["float32"]), ({"COCO_ALPHA": 1}, ["COCO_ALPHA"])]:
        status, msg = call(json.dumps({"prompt": "x", "vllm_xargs": xargs}).encode())
        assert status == 400 and "\n" not in msg and all(w in msg for w in words), (xargs, msg)
    assert seen == []
    good = json.dumps({"prompt": "x", "vllm_xargs": {"coco_alpha": 0.5}}).encode()
    for body, chunks in [(good, 1), (good, 2), (b"not json", 1), (b'{"prompt": "coco"}', 1)]:
        assert call(body, chunks=chunks) == (200, "")
    assert seen == [good, good, b"not json", b'{"prompt": "coco"}']
