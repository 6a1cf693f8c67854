"""The schema of `coco-tools run CONFIG.yaml`: defaults, validation, and the resolved config.

Every key is checked before any work starts: an unknown key (at any level), a wrong type or a
value out of range raises CocoError with one line naming the key path, e.g.
`sweep.edits.le.alpha[1]: inf is not a finite number`. The CLI turns that into exit 2, and nothing
is written.

Relative paths (`out`, `models[].path`, a BBQ directory in `data.source`) are relative to the
current directory, as for every other coco-tools command.
"""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path

import yaml

from vllm_coco.core import names as N
from vllm_coco.core.checks import finite
from vllm_coco.core.errors import CocoError
from vllm_coco.core.names import BACKENDS, CONTRASTS, CONTROL_BASELINES, DTYPES, SCORINGS, WEIGHTINGS
from vllm_coco.edit import registry
from vllm_coco.experiment import benchmarks

# The schema: every key with its default. A dict is a section (its keys are the only ones
# allowed); `models` is a list of MODEL_KEYS dicts.
# configs/default.yaml spells out exactly these values with a comment on each (a test keeps the two
# equal), so a key left out of any config takes the value the embedded default run uses.
DEFAULTS: dict = {
    "out": "runs/main",
    "seed": N.SEED,
    "keep_models": False,
    "data": {"source": "bbq", "categories": list(N.DEFAULT_CATEGORIES), "chat_template": False},
    "models": None,  # required
    "identify": {"contrast": N.CONTRASTS[0], "limit": 48, "ratio": N.RATIO, "weighting": N.WEIGHTINGS[0],
                 "tau": N.TAU, "null_rounds": 1, "batch_size": N.BATCH_SIZE, "dtype": N.DTYPES[0],
                 "device": "cpu", "device_map": None, "backend": N.IDENTIFY_BACKENDS[0]},
    "baselines": ["rand"],
    # more neuron sets, edited by the sweep's KIND@SET arms (docs/METHOD.md §2.4, §5.4, §5.6): a set is
    # identified anew (its own contrast; the identify section's other options) or re-selected `from` an
    # earlier one (or from "coco", the identify stage's set)
    "sets": {"stereo": {"contrast": "stereotype", "limit": 24, "abstention_filter": True},
             "diffmean": {"from": "stereo", "baseline": "diffmean"}},
    "ablation": {"modes": ["ablate-zero", "ablate-mean"], "limit": 72},
    "sweep": {"edits": {"le": {"alpha": [0.5, 1.0]}, "le@stereo": {"alpha": [0.5, 1.0]},
                        "steer@diffmean": {"alpha": [1.0, 2.0, 4.0]}},
              "ratio": [0.01], "limit": 48, "rungs": 2, "eta": 3, "neutral_limit": 10},
    "stability": {"fractions": [0.5, 0.25], "ablate": False, "limit": None},
    # benchmark (experiment/benchmarks.py) -> its settings; the built-in ones at their declared sizes
    "final": {"benchmarks": {b.name: {"limit": b.limit} for b in benchmarks.BUILT_IN if b.in_default}},
    "parity": {"identify_limit": 4, "limit": 6, "tolerance": 1e-4},
    "eval": {"backend": "hf", "batch_size": N.BATCH_SIZE, "device": "cpu", "max_model_len": N.MAX_MODEL_LEN,
             "scoring": "per-byte", "dtype": N.EVAL_DTYPES[0],
             **{k: 1 for k in N.PARALLEL_OPTIONS}, "distributed_executor_backend": None},
}
# keys of earlier versions: what replaced them (the error says so instead of "unknown key")
RENAMED = {"ablation.mode": "ablation.modes (a list of ablation kinds: every set is ablated by each)",
           "sweep.ne_ratio": "sweep.ratio (a list of neuron shares, swept for both edits)",
           "sweep.retention_limit": "sweep.neutral_limit (the sweep's retention constraint is KL on neutral text)",
           "sweep.retention_floor": "the declared floors (experiment/benchmarks.py: acc_disambig, KL, retention acc)",
           **{f"sweep.{k}_{p}": f"sweep.edits.{k}.{p} (edit kind -> setting -> values)"
              for k, ps in (("le", ("alpha",)), ("ne", ("alpha", "beta", "lam"))) for p in ps},
           **{f"final.{old}": f"final.benchmarks.{new}.limit (benchmark -> its settings)"
              for old, new in (("limit", "stereo"), ("jailbreak_limit", "jailbreak"),
                               ("retention_limit", "retention"))}}
# mappings whose keys are the user's (edit kinds, benchmarks): given, they replace the default as a whole
FREE = {"sweep.edits", "final.benchmarks", "sets"}
SET_KEYS = {"from": None, "contrast": None, "limit": None, "abstention_filter": None, "baseline": "coco"}
SET_BASELINES = ("coco", "diffmean")  # a set's own selections (the same-count controls: `baselines`)
# parity_of: the name of an earlier model this one is a twin of (same weights, another architecture
# class): it gets the parity stage (identify + one evaluation, compared number by number) instead of a full run.
MODEL_KEYS = {"path": None, "name": None, "parity_of": None}
# OUT holds a folder per model, the report stage and two files: no model may take their names.
RESERVED_NAMES = ("report", "REPORT.md", "pipeline.log")
HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def _fail(path: str, msg: str):
    raise CocoError(f"{path}: {msg}")


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _int(cfg: dict, path: str, key: str, lo: int | None = None, nullable: bool = False):
    v = cfg[key]
    where = f"{path}.{key}" if path else key
    if v is None and nullable:
        return None
    if not isinstance(v, int) or isinstance(v, bool):
        _fail(where, f"{v!r} is not an integer" + (" (or null)" if nullable else ""))
    if lo is not None and v < lo:
        _fail(where, f"{v} must be at least {lo}")
    return v


def _num(v, where: str, lo: float | None = None, hi: float | None = None, lo_open: bool = False) -> float:
    if not _is_num(v):
        _fail(where, f"{v!r} is not a number")
    return finite(v, f"{where}:", lo=lo, hi=hi, lo_open=lo_open)  # the one number validation (core/checks.py)


def _choice(v, where: str, choices) -> str:
    if v not in choices:
        _fail(where, f"{v!r} is not one of {', '.join(choices)}")
    return v


def _num_list(v, where: str, **bounds) -> list[float]:
    if not isinstance(v, list) or not v:
        _fail(where, f"{v!r} is not a non-empty list of numbers")
    out = [_num(x, f"{where}[{i}]", **bounds) for i, x in enumerate(v)]
    for i, x in enumerate(out):
        if x in out[:i]:
            _fail(f"{where}[{i}]", f"{x} is listed twice")
    return out


def _merge(defaults: dict, given, path: str) -> dict:
    """defaults updated with `given`; CocoError on an unknown key or a non-mapping section."""
    if given is None:
        given = {}
    if not isinstance(given, dict):
        _fail(path or "config", f"expected a mapping of keys, got {type(given).__name__}")
    out = copy.deepcopy(defaults)
    for key, value in given.items():
        where = f"{path}.{key}" if path else str(key)
        if key not in defaults:
            if where in RENAMED:
                _fail(where, f"was replaced by {RENAMED[where]}")
            valid = ", ".join(defaults)
            _fail(where, f"unknown key (valid keys{' in ' + path if path else ''}: {valid})")
        if isinstance(defaults[key], dict) and where not in FREE:
            out[key] = _merge(defaults[key], value, where)
        else:
            out[key] = value
    return out


def looks_like_hub_id(path: str) -> bool:
    """`org/name` that is not a local path: the first component is no existing directory and
    the string does not start like a path (/, ., ~)."""
    if not HUB_ID.fullmatch(path) or path.startswith((".", "~")):
        return False
    return not Path(path.split("/")[0]).exists()


def _models(value) -> list[dict]:
    if not isinstance(value, list) or not value:
        _fail("models", "must be a non-empty list of {path: MODEL_DIR_OR_HUB_ID, name: OPTIONAL_NAME}"
              if value is not None else "missing: list at least one model, e.g. models: [{path: models/smollm2}]")
    out, names = [], {}
    for i, entry in enumerate(value):
        where = f"models[{i}]"
        if isinstance(entry, str):
            entry = {"path": entry}
        m = _merge(MODEL_KEYS, entry, where)
        path = m["path"]
        if not isinstance(path, str) or not path:
            _fail(f"{where}.path", "missing: the model directory or hub id (org/name)")
        p = Path(os.path.expanduser(path))  # a config has no shell: ~ is expanded here (never raises)
        if p.exists():
            if not (p / "config.json").is_file():
                _fail(f"{where}.path", f"{path} is not a Hugging Face model directory (no config.json)")
        elif not looks_like_hub_id(path):
            _fail(f"{where}.path", f"{path} does not exist (and is not a hub id org/name); create it, "
                  "e.g. `coco-tools demo-model models/smollm2`")
        name = m["name"] if m["name"] is not None else Path(path.rstrip("/")).name
        if not isinstance(name, str) or not NAME.fullmatch(name):
            _fail(f"{where}.name", f"{name!r} is not a usable directory name (letters, digits, . _ -)")
        if name in RESERVED_NAMES:
            _fail(f"{where}.name", f"{name} is the name of the run's own output ({', '.join(RESERVED_NAMES)}); "
                  "give the model another `name:`")
        if name in names:
            _fail(f"{where}.name", f"{name} is already the name of models[{names[name]}]; give one a `name:`")
        names[name] = i
        twin = m["parity_of"]
        if twin is not None:
            if twin not in names or twin == name:
                _fail(f"{where}.parity_of", f"{twin!r} is not the name of an earlier model in `models`")
            if out[names[twin]]["parity_of"] is not None:
                _fail(f"{where}.parity_of", f"{twin} is itself a parity twin; name a fully run model")
        out.append({"path": path, "name": name, "parity_of": twin})
    return out


def _eval_categories() -> list[str]:
    """Categories with a stereo_coco_<category> task in evals/."""
    from vllm_coco.tasks.task_folder import evals_dir, local_tasks

    tasks = local_tasks(evals_dir())
    return [c for c in N.BBQ_CATEGORIES if f"stereo_coco_{c}" in tasks]


def validate(raw) -> dict:
    """The resolved config (defaults filled in) or CocoError naming the first bad key."""
    cfg = _merge(DEFAULTS, raw, "")
    _check_top(cfg)
    _check_data(cfg["data"])
    cfg["models"] = _models(cfg["models"])
    for check in (_check_identify, _check_baselines, _check_sets, _check_ablation, _check_sweep, _check_stability,
                  _check_final, _check_eval, _check_parity):
        check(cfg)
    return cfg


def _check_top(cfg: dict) -> None:
    if not isinstance(cfg["out"], str) or not cfg["out"]:
        _fail("out", f"{cfg['out']!r} is not a directory path")
    out = Path(os.path.expanduser(cfg["out"]))
    if out.exists() and not out.is_dir():
        _fail("out", f"{cfg['out']} exists and is not a directory")
    _int(cfg, "", "seed", lo=0)
    if not isinstance(cfg["keep_models"], bool):
        _fail("keep_models", f"{cfg['keep_models']!r} is not true or false")


def _check_data(data: dict) -> None:
    from vllm_coco.data.contrast import BBQ_CATEGORIES

    src = data["source"]
    if not isinstance(src, str) or not src:
        _fail("data.source", f"{src!r} is not bbq, a BBQ directory or hf:DATASET_ID")
    if src != "bbq" and not src.startswith("hf:") and not Path(os.path.expanduser(src)).is_dir():
        _fail("data.source", f"{src} is neither 'bbq', an existing BBQ directory, nor hf:DATASET_ID")
    cats = data["categories"]
    if not isinstance(cats, list) or not cats:
        _fail("data.categories", f"{cats!r} is not a non-empty list of BBQ categories")
    evaluated = _eval_categories()
    for i, c in enumerate(cats):
        _choice(c, f"data.categories[{i}]", BBQ_CATEGORIES)
        if c in cats[:i]:
            _fail(f"data.categories[{i}]", f"{c} is listed twice")
        if c not in evaluated:
            _fail(f"data.categories[{i}]", f"{c} has no stereo_coco_{c} evaluation task; choose from "
                  f"{', '.join(evaluated)}")
    if not isinstance(data["chat_template"], bool):
        _fail("data.chat_template", f"{data['chat_template']!r} is not true or false")


def _check_identify(cfg: dict) -> None:
    from vllm_coco.core.models import check_device
    from vllm_coco.identify.behavior import MIN_PER_SET

    ident = cfg["identify"]
    _choice(ident["contrast"], "identify.contrast", CONTRASTS)
    # behavior mode: at least MIN_PER_SET biased and MIN_PER_SET "unknown" answers per category
    _int(ident, "identify", "limit", lo=2 * MIN_PER_SET if ident["contrast"] == "behavior" else 2, nullable=True)
    ident["ratio"] = _num(ident["ratio"], "identify.ratio", lo=0, hi=1, lo_open=True)
    _choice(ident["weighting"], "identify.weighting", WEIGHTINGS)
    ident["tau"] = _num(ident["tau"], "identify.tau", lo=N.TAU_RANGE[0], hi=N.TAU_RANGE[1])
    _int(ident, "identify", "null_rounds", lo=0)
    _int(ident, "identify", "batch_size", lo=1)
    _choice(ident["dtype"], "identify.dtype", DTYPES)
    if not isinstance(ident["device"], str) or not ident["device"]:
        _fail("identify.device", f"{ident['device']!r} is not a torch device name (cpu, cuda, cuda:1)")
    check_device(ident["device"], "identify.device:", here=False)  # run_pipeline checks it exists here
    if ident["device_map"] is not None:
        _choice(ident["device_map"], "identify.device_map", N.DEVICE_MAPS)
    _choice(ident["backend"], "identify.backend", N.IDENTIFY_BACKENDS)


def _check_baselines(cfg: dict) -> None:
    bl = cfg["baselines"]
    if not isinstance(bl, list):
        _fail("baselines", f"{bl!r} is not a list (of rand, norm, mact)")
    for i, b in enumerate(bl):
        _choice(b, f"baselines[{i}]", CONTROL_BASELINES)
        if b in bl[:i]:
            _fail(f"baselines[{i}]", f"{b} is listed twice")


def _check_sets(cfg: dict) -> None:
    """sets: name -> {from, contrast, limit, abstention_filter, baseline} (SET_KEYS), each identified
    anew (no `from`: `contrast` required) or re-selected from "coco" or another set; stored in an
    order where every set comes after the one it is re-selected from."""
    given = cfg["sets"] if cfg["sets"] is not None else {}
    if not isinstance(given, dict):
        _fail("sets", f"{given!r} is not a mapping of set names to their settings")
    sets = {}
    for name, raw in given.items():
        where = f"sets.{name}"
        if not isinstance(name, str) or not NAME.fullmatch(name) or name == "coco":
            _fail(where, f"{name!r} is not a set name (letters, digits, . _ -; not coco, the identify stage's set)")
        s = sets[name] = _merge(SET_KEYS, raw, where)
        if s["from"] is None:
            _choice(s["contrast"], f"{where}.contrast", CONTRASTS)
            _int(s, where, "limit", lo=2, nullable=True)
        elif s["from"] != "coco" and (s["from"] not in given or s["from"] == name):
            _fail(f"{where}.from", f"{s['from']!r} is not coco or another set")
        else:
            for key in ("contrast", "limit"):
                if s[key] is not None:
                    _fail(f"{where}.{key}", f"a set re-selected from {s['from']} keeps its {key}; drop it")
        if s["abstention_filter"] is not None and not isinstance(s["abstention_filter"], bool):
            _fail(f"{where}.abstention_filter", f"{s['abstention_filter']!r} is not true, false or null")
        _choice(s["baseline"], f"{where}.baseline", SET_BASELINES)
    cfg["sets"] = _set_order(sets, cfg["identify"]["contrast"])


def _set_order(sets: dict, identify_contrast: str) -> dict:
    """`sets` with each set after its source; refuses a cycle and a filter without the stereotype contrast."""
    contrast_of, out = {"coco": identify_contrast}, {}
    while len(out) < len(sets):
        ready = [n for n, s in sets.items() if n not in out and (s["from"] is None or s["from"] in contrast_of)]
        if not ready:
            cycle = sorted(n for n in sets if n not in out)
            _fail(f"sets.{cycle[0]}.from", f"the sets {', '.join(cycle)} are re-selected from each other in a cycle")
        for n in ready:
            s = out[n] = sets[n]
            contrast_of[n] = s["contrast"] or contrast_of[s["from"]]
            if s["abstention_filter"] and contrast_of[n] != "stereotype":
                _fail(f"sets.{n}.abstention_filter", "needs the stereotype contrast (its abstention control)")
    return out


def _check_ablation(cfg: dict) -> None:
    modes = cfg["ablation"]["modes"]
    if not isinstance(modes, list) or not modes:
        _fail("ablation.modes", f"{modes!r} is not a non-empty list of ablation kinds "
              f"({', '.join(registry.ablations())})")
    for i, mode in enumerate(modes):
        _choice(mode, f"ablation.modes[{i}]", registry.ablations())
        if mode in modes[:i]:
            _fail(f"ablation.modes[{i}]", f"{mode} is listed twice")
    _int(cfg["ablation"], "ablation", "limit", lo=1, nullable=True)


def _check_sweep(cfg: dict) -> None:
    sw = cfg["sweep"]
    grid = sw["edits"]
    if not isinstance(grid, dict) or not grid:
        _fail("sweep.edits", f"{grid!r} is not a mapping of edit kinds ({', '.join(registry.enhancements())}), "
              "or KIND@SET (a set of `sets`), to their settings' values")
    sw["edits"] = {arm: _kind_grid(arm, values, cfg["identify"]["weighting"], cfg["sets"])
                   for arm, values in grid.items()}
    if sw["ratio"] is not None:
        sw["ratio"] = _num_list(sw["ratio"], "sweep.ratio", lo=0, hi=1, lo_open=True)
    _int(sw, "sweep", "limit", lo=1, nullable=True)
    _int(sw, "sweep", "rungs", lo=1)
    _int(sw, "sweep", "eta", lo=2)
    _int(sw, "sweep", "neutral_limit", lo=1)


def _kind_grid(arm, values, weighting: str, sets: dict) -> dict[str, list[float]]:
    """One arm's sweep grid (an edit kind, or KIND@SET: the kind on a set of `sets`): each of its
    settings a list of values (a setting left out: [its default]), each within the range the kind
    gives it, as `coco-tools bake` / `ne` would refuse: caught here, not hours in."""
    where = f"sweep.edits.{arm}"
    kind, _, on = str(arm).partition("@")
    _choice(kind, where, registry.enhancements())
    if "@" in str(arm) and on not in sets:
        _fail(where, f"{on!r} is not a set of `sets` ({', '.join(sets) or 'none configured'})")
    params = {p.name: p for p in registry.any_kind(kind).params}
    if values is None:
        values = {}
    if not isinstance(values, dict):
        _fail(where, f"{values!r} is not a mapping of settings ({', '.join(params) or 'none'}) to lists of values")
    for name in values:
        if name not in params:
            _fail(f"{where}.{name}", f"{kind} takes no setting {name} (it takes {', '.join(params) or 'none'})")
    out = {}
    for name, p in params.items():
        # with signed weights (w in [-1, 1]) a strength above 1 would make some factor 1 + alpha w negative
        hi = min(p.hi, 1.0) if name == "alpha" and weighting == "signed" and p.hi is not None else p.hi
        out[name] = _num_list(values.get(name, [p.default]), f"{where}.{name}", lo=p.lo, hi=hi, lo_open=p.lo_open)
    return out


def _check_stability(cfg: dict) -> None:
    st = cfg["stability"]
    if st["fractions"] != []:
        st["fractions"] = _num_list(st["fractions"], "stability.fractions", lo=0, hi=0.5, lo_open=True)
    if not isinstance(st["ablate"], bool):
        _fail("stability.ablate", f"{st['ablate']!r} is not true or false")
    _int(st, "stability", "limit", lo=1, nullable=True)


def _check_final(cfg: dict) -> None:
    """final.benchmarks: registered benchmarks, each {limit: documents per task} (left out: its
    declared size); the primary one (the sweep chooses on it) is always run."""
    given = cfg["final"]["benchmarks"]
    if not isinstance(given, dict) or benchmarks.PRIMARY not in given:
        _fail("final.benchmarks", f"{given!r} is not a mapping of benchmarks ({', '.join(benchmarks.names())}) to "
              f"their settings that includes {benchmarks.PRIMARY} (the sweep chooses on it)")
    out = {}
    for name, settings in given.items():
        where = f"final.benchmarks.{name}"
        bench = benchmarks.get(_choice(name, where, benchmarks.names()))
        out[name] = _merge({"limit": bench.limit}, settings, where)
        _int(out[name], where, "limit", lo=1, nullable=True)
        shared = [c for c in getattr(bench, "fixed_groups", None) or () if c in cfg["data"]["categories"]]
        if getattr(bench, "held_out", False) and shared:
            _fail(where, f"{', '.join(shared)} is held out by this benchmark and also in data.categories; "
                  "take it out of one of them")
    cfg["final"]["benchmarks"] = out


def _check_eval(cfg: dict) -> None:
    from vllm_coco.core.models import check_device

    ev = cfg["eval"]
    _choice(ev["backend"], "eval.backend", BACKENDS)
    _int(ev, "eval", "batch_size", lo=1, nullable=True)
    if ev["device"] is not None and (not isinstance(ev["device"], str) or not ev["device"]):
        _fail("eval.device", f"{ev['device']!r} is not a torch device name (or null: cuda if available, else cpu)")
    if ev["device"] is not None:
        check_device(ev["device"], "eval.device:", here=False)
    _int(ev, "eval", "max_model_len", lo=16)
    _choice(ev["scoring"], "eval.scoring", SCORINGS)
    _choice(ev["dtype"], "eval.dtype", N.EVAL_DTYPES)
    if ev["dtype"] != "float32" and ev["backend"] == "vllm":
        _fail("eval.dtype", f"{ev['dtype']} applies to backend hf; vllm evaluates float32")
    for key in N.PARALLEL_OPTIONS:
        if _int(ev, "eval", key, lo=1) > 1 and ev["backend"] != "vllm":
            _fail(f"eval.{key}", f"{ev[key]} applies to backend vllm only (hf runs on one device: eval.device)")
    if ev["distributed_executor_backend"] is not None:
        _choice(ev["distributed_executor_backend"], "eval.distributed_executor_backend", N.EXECUTOR_BACKENDS)
        if ev["backend"] != "vllm":
            _fail("eval.distributed_executor_backend", "applies to backend vllm only")


def _check_parity(cfg: dict) -> None:
    par = cfg["parity"]
    _int(par, "parity", "identify_limit", lo=2)
    _int(par, "parity", "limit", lo=1)
    par["tolerance"] = _num(par["tolerance"], "parity.tolerance", lo=0)
    if all(m["parity_of"] is not None for m in cfg["models"]):
        _fail("models", "every model is a parity twin; at least one must get the full run")


# Limits of a config file: far above any real config (configs/full.yaml: ~3 KB, 3 levels, no aliases),
# far below what would exhaust the parser's recursion or the memory of everything that walks the result.
MAX_CONFIG_BYTES = 1 << 20
MAX_DEPTH = 32  # nested collections
MAX_VALUES = 100_000  # scalars and collections, counting every use of an alias (YAML's "billion laughs")


class _Refused(yaml.YAMLError):
    """A limit or rule of _ConfigLoader, at a place in the file."""

    def __init__(self, problem: str, mark):
        super().__init__(problem)
        self.problem, self.problem_mark = problem, mark


class _ConfigLoader(yaml.SafeLoader):
    """yaml.SafeLoader with limits: nesting depth and the size of the value once every alias is
    expanded are bounded while composing (before anything recurses or expands), an alias may not
    refer to the collection holding it, and a key given twice in one mapping is refused instead of
    the last one silently winning (`<<` merge keys may still be overridden)."""

    def __init__(self, stream):
        super().__init__(stream)
        self._depth = 0
        self._sizes: dict[int, int] = {}  # id(node) -> values it expands to; every node stays alive in the tree

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            node = self.anchors.get(event.anchor)
            if node is not None and id(node) not in self._sizes:
                raise _Refused(f"alias *{event.anchor} refers to the collection that holds it; remove the cycle",
                               event.start_mark)
            return super().compose_node(parent, index)  # an unknown anchor: the composer's own error
        if self._depth >= MAX_DEPTH:
            raise _Refused(f"nested deeper than {MAX_DEPTH} levels; a config is a few levels deep",
                           event.start_mark)
        self._depth += 1
        try:
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        children = (node.value if isinstance(node, yaml.SequenceNode) else
                    [n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode) else [])
        size = 1 + sum(self._sizes[id(c)] for c in children)
        if size > MAX_VALUES:
            raise _Refused(f"expands to more than {MAX_VALUES} values through aliases; write the values out",
                           event.start_mark)
        self._sizes[id(node)] = size
        if isinstance(node, yaml.MappingNode):
            _no_duplicate_keys(node)
        return node



def _no_duplicate_keys(node: yaml.MappingNode) -> None:
    """A mapping as written (before `<<` merges fold other mappings into it, which PyYAML does in
    place) gives each plain key once; `<<` merge keys may still be overridden."""
    seen = {}
    for key_node, _ in node.value:
        if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
            continue
        first = seen.setdefault((key_node.tag, key_node.value), key_node.start_mark)
        if first is not key_node.start_mark:
            raise _Refused(f"key {key_node.value!r} is given twice (first at line {first.line + 1}); keep one",
                           key_node.start_mark)


def read_yaml(path: Path):
    """The YAML value in `path`, read with _ConfigLoader's limits; CocoError naming the file (and the line)."""
    try:
        with open(path, "rb") as fh:
            data = fh.read(MAX_CONFIG_BYTES + 1)
        if len(data) > MAX_CONFIG_BYTES:
            raise CocoError(f"config {path} is larger than {MAX_CONFIG_BYTES >> 20} MiB; a config is a few KB "
                            "(start from configs/default.yaml)")
        return yaml.load(data.decode("utf-8"), Loader=_ConfigLoader)  # a SafeLoader: no Python objects
    except (OSError, UnicodeDecodeError) as exc:
        raise CocoError(f"cannot read config {path} ({type(exc).__name__})") from None
    except ValueError as exc:  # e.g. an integer over Python's digit limit (yaml.YAMLError is not one)
        raise CocoError(f"config {path} holds an unreadable value ({str(exc)[:60]})") from None
    except RecursionError:  # a backstop: MAX_DEPTH stops nesting long before
        raise CocoError(f"config {path} is nested too deeply; a config is a few levels deep") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = " ".join(str(getattr(exc, "problem", None) or exc).split())
        if isinstance(exc, _Refused):  # valid YAML, but not a config
            raise CocoError(f"config {path}{where}: {problem}") from None
        raise CocoError(f"config {path} is not valid YAML{where}: {problem}") from None


def load(path: str, overrides: dict | None = None) -> dict:
    """Read and validate CONFIG.yaml (CocoError naming the file or the key on any problem);
    `overrides` replace top-level keys before validation (e.g. {"out": ...} from the command line)."""
    p = Path(path)
    if not p.is_file():
        raise CocoError(f"config {path} does not exist; pass a YAML file such as configs/default.yaml")
    raw = read_yaml(p)
    if raw is None:
        raise CocoError(f"config {path} is empty; start from configs/default.yaml")
    if isinstance(raw, dict) and overrides:
        raw = {**raw, **overrides}
    return validate(raw)


def resolve_backend(backend: str) -> str:
    """auto -> vllm when it can be imported, else hf."""
    if backend != "auto":
        return backend
    import importlib.util

    return "vllm" if importlib.util.find_spec("vllm") is not None else "hf"
