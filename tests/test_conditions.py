"""In-memory edit conditions (`edit/conditions.py`) equal the directories `coco-tools bake` and
`coco-tools ne` write, switch back to the base model bit for bit, mix per batch row, and refuse
inputs made for another model.

Each equality runs on the planted tiny model (fast) and on the SmolLM2 demo model with real BBQ
requests (stereo_coco_Age, 6 documents; slow: the demo model's edits and base numbers take ~1 min).
"""

import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import run_cli

from vllm_coco.core.errors import CocoError
from vllm_coco.edit import conditions as cond
from vllm_coco.tasks.prefix_lm import CocoHFLM

NE_HYPER = {"alpha": 1.5, "beta": 3.0, "lam": 0.25}  # none of them the default
MODES = ("ablate-zero", "ablate-mean", "le", "steer", "ne")
STRENGTH = {"le": 1.5, "steer": 2.0}  # not the defaults, so the strength is carried through
TOL = 1e-4  # in-memory vs on-disk (float32 rounding of the baked weights)
MIX_TOL = 1e-5  # one condition scored through two paths with the same batches
# Mixed batches (prefetch) group the requests into other batch shapes than scoring one condition
# alone does, and float32 matmuls round differently per shape: on the demo model (30 layers) even
# the base condition moves by ~1.1e-5 between the two, the edited ones by up to ~1.8e-5.
BATCH_TOL = 5e-5


def _ll(lm, args):
    """Option log-likelihoods of (context, continuation) string pairs under lm's current condition."""
    from lm_eval.api.instance import Instance

    reqs = [Instance("loglikelihood", {}, a, i) for i, a in enumerate(args)]
    return [ll for ll, _ in lm.loglikelihood(reqs, disable_tqdm=True)]


def _maxdiff(a, b):
    assert len(a) == len(b)
    return max(abs(x - y) for x, y in zip(a, b))


def _stock(model_dir=None, model=None, tokenizer=None):
    """lm-eval's own hf model: a directory loaded the normal way, or a loaded model."""
    import logging

    from lm_eval.models.huggingface import HFLM

    if model is None:
        return HFLM(pretrained=str(model_dir), dtype="float32", batch_size=8, device="cpu")
    log = logging.getLogger("lm_eval.models.huggingface")
    level = log.level
    log.setLevel(logging.ERROR)  # it warns that an in-memory model ignores model arguments
    try:
        return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=8, device="cpu")
    finally:
        log.setLevel(level)


def _identify(model_dir, out, *args):
    code, _, err = run_cli("identify", model_dir, "--out", out, "--null-rounds", "0", "--quiet", *args)
    assert code == 0, err
    return out


def _export(model_dir, neurons, root):
    """The on-disk counterparts: `coco-tools bake` per linear mode and `coco-tools ne`."""
    dirs = {}
    for mode in MODES[:-1]:
        extra = ("--alpha", STRENGTH[mode]) if mode in STRENGTH else ()
        dirs[mode] = root / mode
        code, _, err = run_cli("bake", model_dir, neurons, "--mode", mode, *extra, "--out", dirs[mode])
        assert code == 0, err
    dirs["ne"] = root / "ne"
    hyper = [x for k, v in NE_HYPER.items() for x in (f"--{k}", v)]
    code, _, err = run_cli("ne", model_dir, neurons, "--out", dirs["ne"], *hyper)
    assert code == 0, err
    return dirs


def _edits(neurons, model_dir):
    """The in-memory conditions (model_dir checks the artifact's fingerprint and layout)."""
    edits = {m: cond.linear_edit(neurons, m, alpha=STRENGTH.get(m), model_dir=model_dir) for m in MODES[:-1]}
    edits["ne"] = cond.ne_edit(neurons, model_dir=model_dir, **NE_HYPER)
    return edits


def _planted_args(pairs_file, n=6):
    import json

    rows = [json.loads(line) for line in Path(pairs_file).read_text().splitlines()][:n]
    return [(r["prompt"], " " + r[k]) for r in rows for k in ("biased", "unbiased")]


def _bbq_args(limit=6):
    """The (context, continuation) requests of stereo_coco_Age's first documents, plain prompts."""
    from vllm_coco.tasks.evaluate import task_manager

    task = task_manager(["stereo_coco_Age"]).load(["stereo_coco_Age"])["tasks"]["stereo_coco_Age"]
    task.build_all_requests(limit=limit, rank=0, world_size=1)
    return [inst.args for inst in task.instances]


@pytest.fixture(scope="module")
def planted_art(planted, tmp_path_factory):
    model, pairs = planted
    root = tmp_path_factory.mktemp("cond-planted")
    return _identify(model, root / "neurons", "--data", pairs, "--split", "all", "--ratio", "0.05")


@pytest.fixture(scope="module", params=["planted", pytest.param("demo", marks=pytest.mark.slow)])
def case(request, tmp_path_factory):
    """A model, its identify artifact, the on-disk edits, requests and a CocoHFLM carrying every
    condition, with its base numbers taken before any condition ran."""
    root = tmp_path_factory.mktemp(f"cond-{request.param}")
    if request.param == "planted":
        model_dir, pairs = request.getfixturevalue("planted")
        neurons = request.getfixturevalue("planted_art")
        args = _planted_args(pairs)
    else:
        model_dir = request.getfixturevalue("demo_model")
        neurons = request.getfixturevalue("demo_neurons")  # shared (conftest), not written to
        args = _bbq_args()
    dirs = _export(model_dir, neurons, root)
    edits = _edits(neurons, model_dir)
    lm = CocoHFLM(str(model_dir), batch_size=8)
    for name, edit in edits.items():
        lm.add_condition(name, edit)
    base = _ll(lm, args)
    return SimpleNamespace(name=request.param, model_dir=model_dir, neurons=neurons, dirs=dirs, edits=edits,
                           args=args, lm=lm, base=base, alone={})


def _alone(case, name):
    """`name`'s numbers on the shared model, each condition scored in its own call."""
    if name not in case.alone:
        case.lm.use(name)
        case.alone[name] = _ll(case.lm, case.args)
        case.lm.use("base")
    return case.alone[name]


# --------------------------------------------------------------------------- in memory == on disk

@pytest.mark.parametrize("mode", MODES)
def test_condition_equals_its_directory(case, mode):
    got = _alone(case, mode)
    assert _maxdiff(got, case.base) > 1e-3  # the edit changes the numbers: the comparison can fail
    if mode == "ne":
        from vllm_coco.serve.hf_reference import load_ne_model

        model, tok = load_ne_model(case.dirs["ne"])
        on_disk = _ll(_stock(model=model, tokenizer=tok), case.args)
        assert _maxdiff(_ll(CocoHFLM(str(case.dirs["ne"]), batch_size=8), case.args), on_disk) <= TOL
    else:
        on_disk = _ll(_stock(case.dirs[mode]), case.args)
    assert _maxdiff(got, on_disk) <= TOL, mode


def test_ne_directory_gate_as_a_condition(case):
    """The exported gate registered on the loaded base (ne_dir_edit, fingerprint checked) is the
    in-memory NE condition."""
    lm = CocoHFLM(str(case.model_dir), batch_size=8)
    lm.add_condition("ne-dir", cond.ne_dir_edit(case.dirs["ne"], model_dir=case.model_dir))
    lm.use("ne-dir")
    # the directory stores the gate's tensors in float32 (the in-memory gate computes them in float64):
    # an on-disk counterpart, so TOL (measured on the demo model: 1.5e-5)
    assert _maxdiff(_ll(lm, case.args), _alone(case, "ne")) <= TOL


def test_switching_back_to_base_is_bit_for_bit(case):
    from transformers import AutoModelForCausalLM

    lm = case.lm
    for name in MODES:
        _alone(case, name)
        lm.use("base")
        lm._memo.clear()  # score again, not from the memo
        assert _ll(lm, case.args) == case.base, name
    # a direct forward of the wrapped model under "base" is the unwrapped model's, bit for bit
    plain = AutoModelForCausalLM.from_pretrained(case.model_dir, dtype=torch.float32).eval()
    ids = torch.tensor([lm.tok_encode(case.args[0][0] + case.args[0][1])])  # [1, T]
    with torch.no_grad():
        want = plain(ids).logits
        lm.use("le")
        edited = lm.model(ids).logits
        lm.use("base")
        got = lm.model(ids).logits
    assert not torch.equal(edited, want)
    assert torch.equal(got, want)


def test_mixed_conditions_in_one_batch_equal_each_alone(case):
    """prefetch: one loglikelihood call scores base and every condition in mixed batches; the
    later evaluations of each condition come from the memo and equal scoring it alone."""
    lm = CocoHFLM(str(case.model_dir), batch_size=8)
    for name, edit in case.edits.items():
        lm.add_condition(name, edit)
    lm.prefetch(list(MODES))
    assert _maxdiff(_ll(lm, case.args), case.base) <= BATCH_TOL
    forwards = lm.stats["forwards"]
    for name in MODES:
        lm.use(name)
        assert _maxdiff(_ll(lm, case.args), _alone(case, name)) <= BATCH_TOL, name
    assert lm.stats["forwards"] == forwards  # all answered by the mixed call


def test_rows_on_a_direct_forward_equal_each_alone(case):
    """conditions.rows: row i of one forward runs condition i (names or ids). Each row equals, bit
    for bit, the same row of a batch of the same shape run under that condition alone, and a
    one-row forward of it within float32 batch-shape noise (the NE gate's W_hat matmul rounds
    differently for 1 and 7 rows: ~3e-5 on demo logits of magnitude ~20)."""
    lm = case.lm
    table = lm.conditions
    ids = torch.tensor([lm.tok_encode(case.args[0][0] + case.args[0][1])])  # [1, T]
    names = ["base", *MODES, "le"]
    batch = ids.expand(len(names), -1)  # [rows, T]
    with torch.no_grad():
        with table.rows([table.index(n) if i % 2 else n for i, n in enumerate(names)]):
            mixed = lm.model(batch).logits  # [rows, T, vocab]
        for r, name in enumerate(names):
            table.use(name)
            assert torch.equal(mixed[r], lm.model(batch).logits[r]), name
            alone = lm.model(ids).logits[0]  # [T, vocab]
            assert (mixed[r] - alone).abs().max().item() <= 1e-4, name
        table.use("base")
    assert table.default == 0 and table._rows is None
    assert not torch.equal(mixed[0], mixed[1])  # the rows did differ


def test_replacing_a_condition(case):
    """add_condition under a used name replaces its edit and forgets its memoized numbers."""
    lm = CocoHFLM(str(case.model_dir), batch_size=8)
    lm.add_condition("x", case.edits["le"])
    lm.use("x")
    assert _maxdiff(_ll(lm, case.args), _alone(case, "le")) <= MIX_TOL
    lm.add_condition("x", case.edits["ablate-zero"])
    assert _maxdiff(_ll(lm, case.args), _alone(case, "ablate-zero")) <= MIX_TOL
    assert lm.conditions.names == ["base", "x"]


def test_fused_projection_follows_the_model_weights(planted):
    """install() runs q/k/v as one matmul on a fused weight whose rows the three projections view:
    the wrapped model equals the plain one bit for bit, a load_state_dict into it (which copies into
    the views) changes both alike, and a projection given a new tensor is fused again."""
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(planted[0], dtype=torch.float32).eval()
    wrapped = AutoModelForCausalLM.from_pretrained(planted[0], dtype=torch.float32).eval()
    cond.install(wrapped)
    ids = torch.arange(1, 9)[None]  # [1, 8]
    with torch.no_grad():
        assert torch.equal(plain(ids).logits, wrapped(ids).logits)
        for p in plain.parameters():
            p.mul_(1.01)
        sd = plain.state_dict()
        def wrapped_key(key):  # the wrapper's names: self_attn.inner.*, and q_proj.linear.* for q/k/v
            key = key.replace("self_attn.", "self_attn.inner.")
            return re.sub(r"([qkv]_proj)\.", r"\1.linear.", key)

        wrapped.load_state_dict({wrapped_key(k): v for k, v in sd.items()}, strict=True)
        assert torch.equal(plain(ids).logits, wrapped(ids).logits)
        attn = wrapped.model.layers[0].self_attn
        attn.inner.v_proj.linear.weight = torch.nn.Parameter(attn.inner.v_proj.linear.weight * 0.5)
        plain.model.layers[0].self_attn.v_proj.weight.mul_(0.5)
        assert torch.equal(plain(ids).logits, wrapped(ids).logits)
    assert len(wrapped.state_dict()) == len(sd)  # the fused weight is no extra state


# --------------------------------------------------------------------------- bad input

@pytest.fixture(scope="module")
def planted_lm(planted):
    return CocoHFLM(str(planted[0]), batch_size=8)


def _linear(layer, channels):
    n = len(channels)
    return cond.LinearEdit("le", {layer: np.asarray(channels, dtype=np.int64)}, {layer: np.full(n, 2.0)},
                           {layer: np.zeros(n)})


def test_the_name_base_is_reserved(planted_lm):
    with pytest.raises(CocoError, match="'base' names the unedited model"):
        planted_lm.add_condition("base", _linear(0, [1]))
    with pytest.raises(CocoError, match="no edit condition named 'nope'; registered: base"):
        planted_lm.use("nope")
    with pytest.raises(CocoError, match="no edit condition named"):
        planted_lm.prefetch(["base", "nope"])


def test_channels_outside_the_layer_are_refused(planted_lm, planted_art, planted):
    width = planted_lm.conditions.widths[0]
    with pytest.raises(CocoError, match=f"names channel {width} of layer 0, outside its q/k/v width {width}"):
        planted_lm.add_condition("wide", _linear(0, [0, width]))
    with pytest.raises(CocoError, match="outside its q/k/v width"):
        planted_lm.add_condition("negative", _linear(1, [-1]))
    layers = len(planted_lm.conditions.widths)
    with pytest.raises(CocoError, match=f"names layer {layers}, and the model has {layers}"):
        planted_lm.add_condition("deep", _linear(layers, [0]))
    ne = cond.ne_edit(planted_art, model_dir=planted[0])
    layer = next(iter(ne.gates))
    gates = {layer: {**ne.gates[layer], "channels": ne.gates[layer]["channels"] + width}}
    with pytest.raises(CocoError, match="outside its q/k/v width"):
        planted_lm.add_condition("ne-wide", cond.NEEdit(gates, ne.alpha, ne.beta, ne.lam))


def test_a_refused_edit_leaves_no_condition_behind(planted):
    lm = CocoHFLM(str(planted[0]), batch_size=8)
    width = lm.conditions.widths[1]
    bad = cond.LinearEdit("le", {0: np.array([1, 2]), 1: np.array([width])}, {0: np.full(2, 2.0), 1: np.ones(1)},
                          {0: np.zeros(2), 1: np.zeros(1)})
    with pytest.raises(CocoError):
        lm.add_condition("bad", bad)
    assert lm.conditions.names == ["base"] and not lm.conditions.layers[0].linear


def test_ne_directory_of_another_model_is_refused(planted, planted_art, tmp_path):
    """An NE directory exported from a different model (here an LE-baked copy) on the base: a
    CocoError naming the fix, before anything is registered."""
    model = planted[0]
    le = tmp_path / "le"
    code, _, err = run_cli("bake", model, planted_art, "--alpha", "1.5", "--out", le)
    assert code == 0, err
    code, _, err = run_cli("ne", le, planted_art, "--out", tmp_path / "ne-le", "--force")  # --force: LE != base
    assert code == 0, err
    with pytest.raises(CocoError, match=r"was exported from another model than .*export it again with "
                                        r"`coco-tools ne .* NEURONS`"):
        cond.ne_dir_edit(tmp_path / "ne-le", model_dir=model)
    edit = cond.ne_dir_edit(tmp_path / "ne-le", model_dir=le)  # the model it came from
    assert edit.alpha == 1.0 and edit.gates
    cond.ne_dir_edit(tmp_path / "ne-le")  # no model to check against


def test_artifact_of_another_model_is_refused(planted, planted_art, tmp_path):
    """Same layout, other weights: the fingerprint check refuses linear_edit and ne_edit."""
    import tiny

    other = tiny.random_model(tmp_path / "other", seed=3)
    for mode in ("le", "ablate-zero"):
        with pytest.raises(CocoError, match="does not hold the weights the neurons were identified on"):
            cond.linear_edit(planted_art, mode, model_dir=other)
    with pytest.raises(CocoError, match="does not hold the weights"):
        cond.ne_edit(planted_art, model_dir=other)
    with pytest.raises(CocoError, match="--alpha does not apply to mode ablate-zero"):
        cond.linear_edit(planted_art, "ablate-zero", alpha=1.0)
    with pytest.raises(CocoError, match="unknown edit mode"):
        cond.linear_edit(planted_art, "scale")


@pytest.mark.slow
def test_planted_artifact_on_the_demo_model_is_refused(planted_art, demo_model):
    with pytest.raises(CocoError, match="the neuron artifact was made for a model with"):
        cond.linear_edit(planted_art, "le", model_dir=demo_model)
    with pytest.raises(CocoError, match="the neuron artifact was made for a model with"):
        cond.ne_edit(planted_art, model_dir=demo_model)
