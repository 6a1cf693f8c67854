"""coco-hf (`tasks/prefix_lm.CocoHFLM`): shared-prefix scoring equals lm-eval's own hf model.

Fast: the radix tree (`tasks/prefix_tree`) on hand-made sequences; the scorer on hand-made token
requests against a plain full forward and against lm-eval's HFLM (batch sizes that split the tree
differently, left truncation at a small max_length, rolling log-likelihoods); the bfloat16 refusal.
Slow: the BBQ tasks on the SmolLM2 demo model, chat and plain prompts, both scorings: per-option
log-likelihoods, picks and task metrics equal lm-eval's hf model on >= 60 documents in 3 categories.
"""

import math
import random

import pytest
import torch
import torch.nn.functional as F
from conftest import expect_bad

from vllm_coco.core.errors import CocoError
from vllm_coco.tasks import prefix_lm
from vllm_coco.tasks.packed_forward import layer_kinds
from vllm_coco.tasks.prefix_tree import build_tree

TOL = 1e-4  # float32 log-likelihoods: shared-prefix vs full forward


# --------------------------------------------------------------------------- the radix tree

def _path(node):
    """The tokens from the root to the end of `node`."""
    out = []
    while node is not None:
        out = node.tokens + out
        node = node.parent
    return out


def _check_tree(seqs, tree):
    """Invariants of a radix tree over `seqs`."""
    assert sum(len(n.tokens) for n in tree.nodes) <= sum(map(len, seqs))
    for n in tree.nodes:
        assert n.tokens  # never empty
        assert n.start == (n.parent.end if n.parent is not None else 0)
        assert n.seqs == {s for s, seq in enumerate(seqs) if tuple(seq[: n.end]) == tuple(_path(n))}
        firsts = [ch.tokens[0] for ch in n.children]
        assert len(firsts) == len(set(firsts))  # children diverge at their first token
        ends_here = any(tree.last[s] is n for s in n.seqs)
        assert len(n.children) != 1 or ends_here  # compressed: a single child only below a sequence's end
        assert all(ch.parent is n for ch in n.children)
        assert [min(ch.seqs) for ch in n.children] == sorted(min(ch.seqs) for ch in n.children)
    firsts = [r.tokens[0] for r in tree.roots]
    assert len(firsts) == len(set(firsts)) and all(r.parent is None for r in tree.roots)
    for s, seq in enumerate(seqs):
        assert _path(tree.last[s]) == list(seq) and tree.last[s].end == len(seq)
        for pos, tok in enumerate(seq):
            node = tree.node_at(s, pos)
            assert node.start <= pos < node.end and node.tokens[pos - node.start] == tok and s in node.seqs


def test_tree_shared_prefixes():
    seqs = [(1, 2, 3, 4), (1, 2, 3, 5, 6), (1, 2, 7), (8, 9)]
    tree = build_tree(seqs)
    _check_tree(seqs, tree)
    assert [r.tokens for r in tree.roots] == [[1, 2], [8, 9]]
    a = tree.roots[0]
    assert a.seqs == {0, 1, 2} and [c.tokens for c in a.children] == [[3], [7]]
    b = a.children[0]
    assert (b.start, b.end, b.seqs) == (2, 3, {0, 1})
    assert [c.tokens for c in b.children] == [[4], [5, 6]]
    assert [c.start for c in b.children] == [3, 3]
    assert len(tree.nodes) == 6
    assert tree.node_at(1, 4) is b.children[1] and tree.node_at(1, 0) is a and tree.node_at(3, 1) is tree.roots[1]
    with pytest.raises(IndexError):
        tree.node_at(2, 3)  # sequence 2 has 3 tokens
    tree.want(1, 4)
    tree.want(1, 3)
    tree.want(0, 1)
    assert b.children[1].wanted == {3, 4} and a.wanted == {1} and not b.wanted


def test_tree_sequence_that_is_a_prefix_of_another():
    seqs = [(1, 2), (1, 2, 3), (1, 2, 3, 4, 5)]
    tree = build_tree(seqs)
    _check_tree(seqs, tree)
    assert [n.tokens for n in tree.nodes] == [[1, 2], [3], [4, 5]]
    root = tree.roots[0]
    assert tree.last == [root, root.children[0], root.children[0].children[0]]
    assert root.seqs == {0, 1, 2} and root.children[0].seqs == {1, 2}
    assert tree.node_at(2, 1) is root and tree.node_at(2, 2) is root.children[0]
    with pytest.raises(IndexError):
        tree.node_at(0, 2)


def test_tree_divergence_at_the_first_token_makes_several_roots():
    seqs = [(1,), (2, 3), (4, 5, 6)]
    tree = build_tree(seqs)
    _check_tree(seqs, tree)
    assert [r.tokens for r in tree.roots] == [[1], [2, 3], [4, 5, 6]]
    assert all(r.start == 0 and not r.children for r in tree.roots)
    assert [tree.node_at(s, 0) for s in range(3)] == tree.roots


def test_tree_rejects_duplicates_unsorted_and_empty():
    with pytest.raises(ValueError, match="distinct"):
        build_tree([(1, 2), (1, 2)])
    with pytest.raises(ValueError, match="sorted"):
        build_tree([(2,), (1,)])
    with pytest.raises(ValueError, match="non-empty"):
        build_tree([(), (1,)])
    empty = build_tree([])
    assert empty.roots == [] and empty.nodes == []


def test_tree_invariants_on_random_sequences():
    rng = random.Random(0)
    for _ in range(200):
        n = rng.randint(1, 12)
        seqs = {tuple(rng.choices(range(3), k=rng.randint(1, 7))) for _ in range(n)}
        seqs = sorted(seqs)
        _check_tree(seqs, build_tree(seqs))


# --------------------------------------------------------------------------- the scorer on a tiny model

@pytest.fixture(scope="module")
def strong_model(tmp_path_factory):
    """A 3-layer tiny Llama (GQA: 4 heads, 2 KV heads) with large random weights, so every
    log-probability depends strongly on the whole context (a KV or position mistake shows)."""
    import tiny
    from transformers import LlamaForCausalLM

    torch.manual_seed(1)
    tok = tiny.word_tokenizer(tiny.NEUTRAL + tiny.BIASED + tiny.UNBIASED)
    model = LlamaForCausalLM(tiny.tiny_config(vocab_size=len(tok), layers=3))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 1.0 if "embed" in name else 0.3)
    return tiny.save_model(model, tok, tmp_path_factory.mktemp("prefix") / "strong")


@pytest.fixture(scope="module")
def plain(strong_model):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(strong_model, dtype=torch.float32).eval()


def _full(model, inp, cont):
    """(sum of log-probs of `cont`, all greedy) from one plain forward of `inp` (ctx + cont minus its
    last token, already truncated)."""
    with torch.no_grad():
        lp = F.log_softmax(model(torch.tensor([inp])).logits[0].float(), dim=-1)  # [len(inp), vocab]
    rows = lp[len(inp) - len(cont):]
    logprob = float(sum(rows[j, t] for j, t in enumerate(cont)))
    return logprob, all(int(rows[j].argmax()) == t for j, t in enumerate(cont))


def _reference(model, requests, max_length):
    return [_full(model, (ctx + cont)[-(max_length + 1):][:-1], cont) for _, ctx, cont in requests]


def _greedy(model, ctx, n):
    """The model's greedy continuation of `ctx` (n tokens): its greedy flag is True."""
    out = []
    for _ in range(n):
        with torch.no_grad():
            out.append(int(model(torch.tensor([ctx + out])).logits[0, -1].argmax()))
    return out


def _worst(model, ctx):
    """The least likely next token (its greedy flag is robustly False)."""
    with torch.no_grad():
        return [int(model(torch.tensor([ctx])).logits[0, -1].argmin())]


def _requests(model):
    """Hand-made requests ((strings), context ids, continuation ids): three one-token options on a
    shared context, multi-token options, a context that extends another request's input, contexts
    diverging at the first token and mid-way, a duplicate request and greedy continuations."""
    rng = random.Random(3)
    ids = list(range(4, 64))
    a = rng.choices(ids, k=14)
    b = a[:9] + rng.choices(ids, k=5)  # shares 9 tokens with a
    c = rng.choices(ids, k=6)  # diverges from a at token 0
    specs = [
        (a, [5]), (a, [17]), (a, [40]),  # one-token options
        (a, [8, 9]), (a, [8, 22, 31]),  # multi-token options sharing their first token
        (a + [8, 9], [12]),  # its input extends request 3's input
        (b, [5]), (b, [33, 34]),
        (c, [7]), (c[:1], [6, 6]),  # a one-token context
        (a, [17]),  # a duplicate of request 1
        (b, _greedy(model, b, 3)), (c, _greedy(model, c, 1)), (a, _worst(model, a)),
    ]
    return [((f"ctx{i}", f"cont{i}"), list(ctx), list(cont)) for i, (ctx, cont) in enumerate(specs)]


def _stock(model_dir, **kw):
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=str(model_dir), dtype="float32", batch_size=4, device="cpu", **kw)


def _assert_same(got, want, tol=TOL):
    assert len(got) == len(want)
    for i, ((g, gg), (w, wg)) in enumerate(zip(got, want)):
        assert abs(g - w) <= tol, (i, g, w)
        assert gg == wg, (i, gg, wg)


def test_strong_model_depends_on_the_context(plain):
    """The tolerance below can see a context mistake: one changed token far back moves the score."""
    reqs = _requests(plain)
    ctx, cont = reqs[0][1], reqs[0][2]
    moved = _full(plain, [ctx[0] + 1] + ctx[1:], cont)[0]
    assert abs(moved - _full(plain, ctx, cont)[0]) > 100 * TOL


@pytest.mark.parametrize("row_tokens", [0, 8, prefix_lm.ROW_TOKENS])
@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_scorer_equals_full_forwards(strong_model, plain, batch_size, row_tokens):
    """row_tokens 0: every radix node is its own row on its parent's KV; 8: small subtrees run as
    packed rows under a tree mask, the rest node by node; the default: whole roots packed."""
    lm = prefix_lm.CocoHFLM(str(strong_model), batch_size=batch_size)
    lm.row_tokens = row_tokens
    reqs = _requests(plain)
    want = _reference(plain, reqs, lm.max_length)
    assert any(g for _, g in want) and not all(g for _, g in want)
    got = lm._loglikelihood_tokens(reqs, disable_tqdm=True)
    _assert_same(got, want)
    # shared prefixes ran once: fewer model tokens than the inputs hold, and batch rows as asked
    total = sum(len(ctx) + len(cont) - 1 for _, ctx, cont in reqs)
    assert lm.stats["tokens"] < total / 2 and lm.stats["padded_tokens"] >= lm.stats["tokens"]
    # asked again: answered from the memo, no forward
    forwards = lm.stats["forwards"]
    assert lm._loglikelihood_tokens(list(reversed(reqs)), disable_tqdm=True) == list(reversed(got))
    assert lm.stats["forwards"] == forwards


def test_packed_rows_run_fewer_forwards_for_the_same_tokens(strong_model, plain):
    """Packing a subtree into one row changes how the work is batched, not what is computed."""
    reqs = _requests(plain)
    stats = {}
    for row_tokens in (0, prefix_lm.ROW_TOKENS):
        lm = prefix_lm.CocoHFLM(str(strong_model), batch_size=1)
        lm.row_tokens = row_tokens
        lm._loglikelihood_tokens(reqs, disable_tqdm=True)
        stats[row_tokens] = lm.stats
    assert stats[0]["tokens"] == stats[prefix_lm.ROW_TOKENS]["tokens"]
    assert 2 * stats[prefix_lm.ROW_TOKENS]["forwards"] < stats[0]["forwards"]


def _windowed_model(arch: str, vocab_size: int, window: int | None):
    """A tiny 2-layer model with a `window`-token sliding window: "mistral" (every layer windowed) or
    "qwen2-mixed" (layer 0 full attention, layer 1 windowed: HF takes a mask per layer type)."""
    import tiny
    from transformers import MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    config = tiny.tiny_config("mistral", vocab_size=vocab_size, layers=2)
    if arch == "mistral":
        config.sliding_window = window
        return MistralForCausalLM(config)
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "max_position_embeddings", "tie_word_embeddings", "pad_token_id",
            "bos_token_id", "eos_token_id")
    qwen = Qwen2Config(**{k: getattr(config, k) for k in keys}, use_sliding_window=window is not None,
                       sliding_window=window, max_window_layers=1)
    assert window is None or qwen.layer_types == ["full_attention", "sliding_attention"]
    return Qwen2ForCausalLM(qwen)


@pytest.mark.parametrize("arch", ["mistral", "qwen2-mixed"])
@pytest.mark.parametrize("row_tokens", [0, prefix_lm.ROW_TOKENS])
def test_sliding_window_model_equals_full_forwards(tmp_path, row_tokens, arch):
    """A 6-token sliding window: the tree mask drops keys outside the window as HF's own mask does,
    on window layers only (the requests are longer than the window, so a missing or misplaced
    window would show)."""
    import tiny
    from transformers import AutoModelForCausalLM

    torch.manual_seed(2)
    tok = tiny.word_tokenizer(tiny.NEUTRAL + tiny.BIASED + tiny.UNBIASED)
    model = _windowed_model(arch, len(tok), 6)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 1.0 if "embed" in name else 0.3)
    path = tiny.save_model(model, tok, tmp_path / "windowed")
    plain_model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    lm = prefix_lm.CocoHFLM(str(path), batch_size=4)
    lm.row_tokens = row_tokens
    reqs = _requests(plain_model)
    _assert_same(lm._loglikelihood_tokens(reqs, disable_tqdm=True), _reference(plain_model, reqs, lm.max_length))
    unwindowed = _windowed_model(arch, len(tok), None).eval()
    unwindowed.load_state_dict(plain_model.state_dict())
    ctx, cont = reqs[0][1], reqs[0][2]
    assert abs(_full(unwindowed, ctx, cont)[0] - _full(plain_model, ctx, cont)[0]) > 100 * TOL  # the window matters


def test_unsupported_attention_kinds_are_refused():
    from types import SimpleNamespace

    assert layer_kinds(SimpleNamespace(sliding_window=None)) == {"full_attention"}
    assert layer_kinds(SimpleNamespace(sliding_window=8)) == {"sliding_attention"}
    with pytest.raises(CocoError, match="chunked_attention layers; evaluate it with --backend hf-stock"):
        layer_kinds(SimpleNamespace(sliding_window=8, layer_types=["full_attention", "chunked_attention"]))


def test_scorer_equals_stock_hflm(strong_model, plain):
    reqs = _requests(plain)
    stock = _stock(strong_model)._loglikelihood_tokens(reqs, disable_tqdm=True)
    ours = prefix_lm.CocoHFLM(str(strong_model), batch_size=4)._loglikelihood_tokens(reqs, disable_tqdm=True)
    _assert_same(ours, stock)


def test_long_requests_are_truncated_from_the_left_like_hflm(strong_model, plain):
    """max_length 16: inputs are (context + continuation)[-17:][:-1], as HFLM cuts them; after the
    cut, requests that shared a long context share nothing or diverge at token 0."""
    max_length = 16
    rng = random.Random(7)
    ids = list(range(4, 64))
    long_a = rng.choices(ids, k=30)
    long_b = long_a[:25] + rng.choices(ids, k=8)
    specs = [(long_a, [5]), (long_a, [6, 7]), (long_a, [8, 9, 10]), (long_b, [5]), (long_b[:-1], [long_b[-1]]),
             (long_a[:16], [11]),  # exactly max_length + 1 tokens: nothing cut
             (long_a[:17], [11]),  # one more: the first token goes
             (long_a[:5], [12]), (long_b[-3:], [13, 14, 15] * 5 + [16])]  # a continuation of max_length tokens
    reqs = [((f"c{i}", f"x{i}"), ctx, cont) for i, (ctx, cont) in enumerate(specs)]
    lm = prefix_lm.CocoHFLM(str(strong_model), batch_size=4, max_length=max_length)
    stock = _stock(strong_model, max_length=max_length)
    assert lm.max_length == stock.max_length == max_length
    got = lm._loglikelihood_tokens(reqs, disable_tqdm=True)
    _assert_same(got, stock._loglikelihood_tokens(reqs, disable_tqdm=True))
    _assert_same(got, _reference(plain, reqs, max_length))
    untruncated = _reference(plain, reqs, 10_000)
    assert abs(got[0][0] - untruncated[0][0]) > 100 * TOL  # the cut mattered
    assert got[5] == pytest.approx(untruncated[5], abs=TOL)


def test_requests_with_equal_context_plus_continuation_prefix(strong_model, plain):
    """(ctx, [x]) and (ctx[:-1], [ctx[-1], x]) have the same model input; each gets its own
    continuation positions. (lm-eval 0.4.13's HFLM groups such requests by context +
    continuation[:-1] and reads the shorter one's log-prob at the group's first continuation
    position instead of its last, so it is not the reference here: the plain forward is.)"""
    rng = random.Random(5)
    ctx = rng.choices(range(4, 64), k=12)
    specs = [(ctx, [5]), (ctx[:-1], [ctx[-1], 5]), (ctx[:-3], ctx[-3:] + [5]), (ctx, [6])]
    reqs = [((f"c{i}", f"x{i}"), c, x) for i, (c, x) in enumerate(specs)]
    for max_length in (256, 8):
        lm = prefix_lm.CocoHFLM(str(strong_model), batch_size=4, max_length=max_length)
        got = lm._loglikelihood_tokens(reqs, disable_tqdm=True)
        _assert_same(got, _reference(plain, reqs, max_length))
        assert abs(got[0][0] - got[1][0]) > 100 * TOL  # the second adds ctx[-1]'s log-prob


def test_rolling_loglikelihood_equals_hflm(strong_model):
    """loglikelihood_rolling (windows of max_length, requests without a cache key) goes through
    the same scorer: equal to HFLM's."""
    import tiny
    from lm_eval.api.instance import Instance

    rng = random.Random(11)
    texts = [" ".join(rng.choices(tiny.NEUTRAL + tiny.BIASED, k=n)) for n in (5, 23, 40)]
    reqs = [Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(texts)]
    ours = prefix_lm.CocoHFLM(str(strong_model), batch_size=4, max_length=16).loglikelihood_rolling(
        reqs, disable_tqdm=True)
    stock = _stock(strong_model, max_length=16).loglikelihood_rolling(reqs, disable_tqdm=True)
    assert ours == pytest.approx(stock, abs=TOL)


# --------------------------------------------------------------------------- bfloat16 only where native

def test_check_dtype(monkeypatch):
    assert prefix_lm.check_dtype("float32", "cpu") is torch.float32
    with pytest.raises(CocoError, match="float16 is not one of"):
        prefix_lm.check_dtype("float16", "cpu")
    monkeypatch.setattr(prefix_lm, "bf16_supported", lambda device: True)
    assert prefix_lm.check_dtype("bfloat16", "cpu") is torch.bfloat16
    monkeypatch.setattr(prefix_lm, "bf16_supported", lambda device: False)
    with pytest.raises(CocoError, match="use --dtype float32"):
        prefix_lm.check_dtype("bfloat16", "cpu")


def test_bf16_supported_answers_a_bool():
    assert isinstance(prefix_lm.bf16_supported("cpu"), bool)
    if not torch.cuda.is_available():
        assert prefix_lm.bf16_supported("cuda") is False


def test_cocohflm_refuses_emulated_bfloat16(strong_model, monkeypatch):
    monkeypatch.setattr(prefix_lm, "bf16_supported", lambda device: False)
    with pytest.raises(CocoError, match="bfloat16 needs native support"):
        prefix_lm.CocoHFLM(str(strong_model), dtype="bfloat16")


def test_eval_bfloat16_unsupported_exits_2_with_one_line(strong_model, tmp_path, monkeypatch):
    """`coco-tools eval MODEL --dtype bfloat16` where the hardware has no bf16: exit 2, one line,
    before any model or task loads (the model here is the tiny one: the refusal comes first)."""
    monkeypatch.setattr(prefix_lm, "bf16_supported", lambda device: False)
    expect_bad(tmp_path, "eval", strong_model, "--dtype", "bfloat16", "--device", "cpu", "--out", tmp_path / "o",
               match="bfloat16 needs native support", unchanged=[strong_model])
    expect_bad(tmp_path, "eval", strong_model, "--dtype", "bfloat16", "--backend", "hf-stock",
               "--out", tmp_path / "o", match="applies to --backend hf only")


# --------------------------------------------------------------------------- BBQ on the demo model (slow)

CATEGORIES = ("Age", "SES", "Religion")
LIMIT = 12  # documents per category: 4 items x 3 option orders, 36 documents in all (CI time, issue 23)


@pytest.fixture(scope="module", params=[True, False], ids=["chat", "plain"])
def parity(request, demo_model, tmp_path_factory):
    """Samples and results of coco-hf and lm-eval's hf model on the same documents, sum scoring
    (computed), then per-byte scoring: coco-hf answers from its memo, the stock model from lm-eval's
    request cache (use_cache) filled by its sum run. The log-likelihoods do not depend on the
    scoring, so the per-byte runs pick and aggregate with the stock model's own numbers."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    from vllm_coco.tasks.evaluate import task_manager

    chat = request.param
    tasks = [f"stereo_coco_{c}" for c in CATEGORIES]
    cache = str(tmp_path_factory.mktemp("lm-cache") / "stock")
    coco = prefix_lm.CocoHFLM(str(demo_model), batch_size=8)
    stock = HFLM(pretrained=str(demo_model), dtype="float32", batch_size=8, device="cpu")
    out = {}
    for scoring in ("sum", "per-byte"):
        meta = {"coco_scoring": scoring} if scoring != "sum" else None
        common = dict(tasks=tasks, limit=LIMIT, apply_chat_template=chat, log_samples=True, bootstrap_iters=0)
        before = coco.stats["forwards"]
        out[("coco", scoring)] = lm_eval.simple_evaluate(model=coco, task_manager=task_manager(tasks, metadata=meta),
                                                         **common)
        if scoring != "sum":
            assert coco.stats["forwards"] == before  # the memo answered
        out[("stock", scoring)] = lm_eval.simple_evaluate(model=stock, use_cache=cache,
                                                          task_manager=task_manager(tasks, metadata=meta), **common)
    return tasks, out


def _metrics(row):
    """A task's results row with NaN made comparable."""
    return {k: "nan" if isinstance(v, float) and math.isnan(v) else v for k, v in row.items()}


def _rows(results, task):
    return sorted(results["samples"][task], key=lambda r: r["doc_id"])


@pytest.mark.slow
def test_bbq_loglikelihoods_equal_hflm(parity):
    tasks, out = parity
    docs, worst = 0, 0.0
    for task in tasks:
        ours, stock = _rows(out[("coco", "sum")], task), _rows(out[("stock", "sum")], task)
        assert len(ours) == len(stock) == LIMIT
        for a, b in zip(ours, stock):
            assert a["doc_id"] == b["doc_id"] and a["arguments"] == b["arguments"]  # same prompts and options
            assert len(a["filtered_resps"]) == len(a["doc"]["choices"]) == 3
            for (la, ga), (lb, gb) in zip(a["filtered_resps"], b["filtered_resps"]):
                worst = max(worst, abs(float(la) - float(lb)))
                assert ga == gb, (task, a["doc_id"])
            docs += 1
        # the per-byte runs saw the very same numbers (memo / request cache)
        for who in ("coco", "stock"):
            again = _rows(out[(who, "per-byte")], task)
            assert [r["filtered_resps"] for r in again] == [r["filtered_resps"] for r in _rows(out[(who, "sum")], task)]
    assert docs == LIMIT * len(tasks)
    assert worst <= TOL, worst


@pytest.mark.slow
@pytest.mark.parametrize("scoring", ["sum", "per-byte"])
def test_bbq_picks_and_metrics_equal_hflm(parity, scoring):
    from vllm_coco.core.pick import pick

    tasks, out = parity
    ours, stock = out[("coco", scoring)], out[("stock", scoring)]
    for task in tasks:
        a_rows, b_rows = _rows(ours, task), _rows(stock, task)
        assert all(r["doc"]["scoring"] == scoring for r in a_rows + b_rows)
        picks_a = [pick(r["doc"], r["filtered_resps"]) for r in a_rows]
        picks_b = [pick(r["doc"], r["filtered_resps"]) for r in b_rows]
        assert picks_a == picks_b, task
        assert [r["success_rate"] for r in a_rows] == [r["success_rate"] for r in b_rows]  # per-doc records
        assert [r["success_rate"]["pos"] for r in a_rows] == picks_a
        assert _metrics(ours["results"][task]) == _metrics(stock["results"][task])
    assert ours["results"].keys() == stock["results"].keys()
