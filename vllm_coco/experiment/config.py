"""The schema of `coco-tools run CONFIG.yaml`: RunConfig, one typed Section per key (core/schema.py),
with the embedded default run's values as defaults; the experiment reads `cfg.<section>.<key>`.

Every key is checked before any work starts: an unknown key (at any level), a wrong type or a
value out of range raises CocoError with one line naming the key path, e.g.
`sweep.edits.le.alpha[1]: inf is not a finite number`. The CLI turns that into exit 2, and nothing
is written.

Relative paths (`out`, `models[].path`, a BBQ directory in `data.source`) are relative to the
current directory, as for every other coco-tools command.
"""

from __future__ import annotations

# Lazy imports: core/models.py, identify/behavior.py and tasks/task_folder.py (numpy, the task folder's
# YAML) load inside the validators that need them, so importing the schema stays light.
import importlib.util
import os
import re
from pathlib import Path
from typing import Annotated, Any, ClassVar

import yaml
from pydantic import AfterValidator, BeforeValidator, Field, model_validator

from vllm_coco.core import names as N
from vllm_coco.core.errors import CocoError
from vllm_coco.core.names import BACKENDS, CONTROL_BASELINES, SCORINGS
from vllm_coco.core.schema import (
    Choice,
    Choices,
    Flag,
    Int,
    Invalid,
    Num,
    Nums,
    Section,
    Text,
    choice,
    nums,
    parse,
    path_of,
)
from vllm_coco.edit import registry
from vllm_coco.experiment import benchmarks
from vllm_coco.identify.settings import IdentifySettings

# The schema: a section per key of CONFIG.yaml (core/schema.py's Section: unknown keys refused, types
# and ranges checked by name); every field's default is the embedded default run's. configs/default.yaml
# spells out exactly these values with a comment on each (a test keeps the two equal), so a key left
# out of any config takes the value the embedded default run uses.

# OUT holds a folder per model, the report stage and two files: no model may take their names.
RESERVED_NAMES = ("report", "REPORT.md", "pipeline.log")
HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def looks_like_hub_id(path: str) -> bool:
    """`org/name` that is not a local path: the first component is no existing directory and
    the string does not start like a path (/, ., ~)."""
    if not HUB_ID.fullmatch(path) or path.startswith((".", "~")):
        return False
    return not Path(path.split("/")[0]).exists()


def _eval_categories() -> list[str]:
    """Categories with a stereo_coco_<category> task in evals/."""
    from vllm_coco.tasks.task_folder import evals_dir, local_tasks

    tasks = local_tasks(evals_dir())
    return [c for c in N.BBQ_CATEGORIES if f"stereo_coco_{c}" in tasks]


def _source(src):
    if not isinstance(src, str) or not src:
        raise Invalid(f"{src!r} is not bbq, a BBQ directory or hf:DATASET_ID")
    if src != "bbq" and not src.startswith("hf:") and not Path(os.path.expanduser(src)).is_dir():
        raise Invalid(f"{src} is neither 'bbq', an existing BBQ directory, nor hf:DATASET_ID")
    return src


def _evaluated(cats: list[str]) -> list[str]:
    evaluated = _eval_categories()
    for i, c in enumerate(cats):
        if c not in evaluated:
            raise Invalid(f"{c} has no stereo_coco_{c} evaluation task; choose from {', '.join(evaluated)}", (i,))
    return cats


class Data(Section):
    source: Annotated[str, BeforeValidator(_source)] = "bbq"
    categories: Annotated[Choices(N.BBQ_CATEGORIES, what="BBQ categories"),
                          AfterValidator(_evaluated)] = list(N.DEFAULT_CATEGORIES)
    chat_template: Flag() = False


def _model_entry(value):
    return {"path": value} if isinstance(value, str) else value


def _model_path(path):
    if not isinstance(path, str) or not path:
        raise Invalid("missing: the model directory or hub id (org/name)")
    p = Path(os.path.expanduser(path))  # a config has no shell: ~ is expanded here (never raises)
    if p.exists():
        if not (p / "config.json").is_file():
            raise Invalid(f"{path} is not a Hugging Face model directory (no config.json)")
    elif not looks_like_hub_id(path):
        raise Invalid(f"{path} does not exist (and is not a hub id org/name); create it, "
                      "e.g. `coco-tools demo-model models/smollm2`")
    return path


class ModelEntry(Section):
    """A model to run; `parity_of`: the name of an earlier model this one is a twin of (same weights,
    another architecture class): it gets the parity stage (identify + one evaluation, compared number
    by number) instead of a full run."""

    path: Annotated[str, BeforeValidator(_model_path)] = Field(None, validate_default=True)  # required
    name: Text("a usable directory name (letters, digits, . _ -)", null=True) = None
    parity_of: Text("the name of an earlier model", null=True) = None

    @model_validator(mode="after")
    def _name(self):
        if self.name is None:
            self.name = Path(self.path.rstrip("/")).name
        if not NAME.fullmatch(self.name):
            raise Invalid(f"{self.name!r} is not a usable directory name (letters, digits, . _ -)", ("name",))
        if self.name in RESERVED_NAMES:
            raise Invalid(f"{self.name} is the name of the run's own output ({', '.join(RESERVED_NAMES)}); "
                          "give the model another `name:`", ("name",))
        return self


def _device(v, at: tuple = ()):
    from vllm_coco.core.models import check_device

    if v is not None:
        try:
            check_device(v, "", here=False)  # run_pipeline checks it exists here
        except CocoError as exc:
            raise Invalid(str(exc).strip(), at) from None
    return v


Device = Annotated[Text("a torch device name (cpu, cuda, cuda:1)", null=True), AfterValidator(_device)]


class Identify(IdentifySettings):
    """The identify stage: `coco-tools identify`'s options of the same names (identify/settings.py), on
    the identify split, with the run's budget as defaults; data, categories, seed, chat and scoring
    come from the run's own sections."""

    limit: Int(lo=2, null=True) = 48
    null_rounds: Int(lo=0) = 1

    @model_validator(mode="after")
    def _run_checks(self):
        from vllm_coco.identify.behavior import MIN_PER_SET

        _device(self.device, ("device",))
        # behavior mode: at least MIN_PER_SET biased and MIN_PER_SET "unknown" answers per category
        if self.contrast == "behavior" and self.limit is not None and self.limit < 2 * MIN_PER_SET:
            raise Invalid(f"{self.limit} must be at least {2 * MIN_PER_SET}", ("limit",))
        return self


SET_BASELINES = ("coco", "diffmean")  # a set's own selections (the same-count controls: `baselines`)


class NeuronSet(Section):
    """A neuron set edited by the sweep's KIND@SET arms (docs/METHOD.md §2.4, §5.4, §5.6): identified
    anew (no `from`: its own contrast and limit, the identify section's other options) or re-selected
    `from` an earlier set (or from "coco", the identify stage's set)."""

    from_: str | None = Field(None, alias="from")
    contrast: Choice(N.CONTRASTS, null=True) = None
    limit: Int(lo=2, null=True) = None
    abstention_filter: Flag(null=True) = None
    baseline: Choice(SET_BASELINES) = "coco"

    @model_validator(mode="after")
    def _source(self):
        if self.from_ is None and self.contrast is None:
            raise Invalid(f"{None!r} is not one of {', '.join(N.CONTRASTS)}", ("contrast",))
        if self.from_ is not None:
            for key in ("contrast", "limit"):
                if getattr(self, key) is not None:
                    raise Invalid(f"a set re-selected from {self.from_} keeps its {key}; drop it", (key,))
        return self


class Ablation(Section):
    renamed: ClassVar[dict] = {"mode": "ablation.modes (a list of ablation kinds: every set is ablated by each)"}
    modes: Choices(registry.ablations, what="ablation kinds") = ["ablate-zero", "ablate-mean"]
    limit: Int(lo=1, null=True) = 72


def _grid_mapping(v):
    if v is None:
        return {}
    if not isinstance(v, dict) or not v:
        raise Invalid(f"{v!r} is not a mapping of edit kinds ({', '.join(registry.enhancements())}), "
                      "or KIND@SET (a set of `sets`), to their settings' values")
    return v


class Sweep(Section):
    renamed: ClassVar[dict] = {
        "ne_ratio": "sweep.ratio (a list of neuron shares, swept for both edits)",
        "retention_limit": "sweep.neutral_limit (the sweep's retention constraint is KL on neutral text)",
        "retention_floor": "the declared floors (experiment/benchmarks.py: acc_disambig, KL, retention acc)",
        **{f"{k}_{p}": f"sweep.edits.{k}.{p} (edit kind -> setting -> values)"
           for k, ps in (("le", ("alpha",)), ("ne", ("alpha", "beta", "lam"))) for p in ps}}
    # arm (KIND or KIND@SET) -> setting -> values; given, it replaces the default as a whole. Each arm
    # is checked against its kind's parameters (and `sets`) by RunConfig, into {setting: [values]}
    edits: Annotated[dict[str, Any], BeforeValidator(_grid_mapping)] = {
        "le": {"alpha": [0.5, 1.0]}, "le@stereo": {"alpha": [0.5, 1.0]}, "steer@diffmean": {"alpha": [1.0, 2.0, 4.0]}}
    ratio: Nums(lo=0, hi=1, lo_open=True) | None = [0.01]
    limit: Int(lo=1, null=True) = 48
    rungs: Int(lo=1) = 2
    eta: Int(lo=2) = 3
    neutral_limit: Int(lo=1) = 10


def _fractions(v):
    return v if v == [] else nums(v, lo=0, hi=0.5, lo_open=True)


class Stability(Section):
    fractions: Annotated[list[float], BeforeValidator(_fractions)] = [0.5, 0.25]
    ablate: Flag() = False
    limit: Int(lo=1, null=True) = None


class BenchmarkSettings(Section):
    limit: Int(lo=1, null=True) = None


def _benchmarks(given):
    if not isinstance(given, dict) or benchmarks.PRIMARY not in given:
        raise Invalid(f"{given!r} is not a mapping of benchmarks ({', '.join(benchmarks.names())}) to "
                      f"their settings that includes {benchmarks.PRIMARY} (the sweep chooses on it)")
    for name in given:
        try:
            choice(name, benchmarks.names())
        except Invalid as exc:
            raise Invalid(exc.message, (name,)) from None
    # a benchmark left out or null: its declared size
    return {name: {"limit": benchmarks.get(name).limit, **(s if isinstance(s, dict) else {})}
            if s is None or isinstance(s, dict) else s for name, s in given.items()}


class Final(Section):
    renamed: ClassVar[dict] = {f"{old}": f"final.benchmarks.{new}.limit (benchmark -> its settings)"
                               for old, new in (("limit", "stereo"), ("jailbreak_limit", "jailbreak"),
                                                ("retention_limit", "retention"))}
    # benchmark (experiment/benchmarks.py) -> its settings; given, it replaces the default as a whole
    benchmarks: Annotated[dict[str, BenchmarkSettings], BeforeValidator(_benchmarks)] = Field(
        default_factory=lambda: {b.name: BenchmarkSettings(limit=b.limit) for b in benchmarks.BUILT_IN
                                 if b.in_default})


class Parity(Section):
    identify_limit: Int(lo=2) = 4
    limit: Int(lo=1) = 6
    tolerance: Num(lo=0) = 1e-4


class Eval(Section):
    backend: Choice(BACKENDS) = "hf"
    batch_size: Int(lo=1, null=True) = N.BATCH_SIZE
    device: Device = "cpu"  # null: cuda if available, else cpu
    max_model_len: Int(lo=16) = N.MAX_MODEL_LEN
    scoring: Choice(SCORINGS) = "per-byte"
    dtype: Choice(N.EVAL_DTYPES) = N.EVAL_DTYPES[0]
    tensor_parallel_size: Int(lo=1) = 1
    pipeline_parallel_size: Int(lo=1) = 1
    data_parallel_size: Int(lo=1) = 1
    distributed_executor_backend: Choice(N.EXECUTOR_BACKENDS, null=True) = None

    @model_validator(mode="after")
    def _backend_options(self):
        if self.dtype != "float32" and self.backend == "vllm":
            raise Invalid(f"{self.dtype} applies to backend hf; vllm evaluates float32", ("dtype",))
        for key in N.PARALLEL_OPTIONS:
            if getattr(self, key) > 1 and self.backend != "vllm":
                raise Invalid(f"{getattr(self, key)} applies to backend vllm only (hf runs on one device: "
                              "eval.device)", (key,))
        if self.distributed_executor_backend is not None and self.backend != "vllm":
            raise Invalid("applies to backend vllm only", ("distributed_executor_backend",))
        return self


def _out(v):
    if not isinstance(v, str) or not v:
        raise Invalid(f"{v!r} is not a directory path")
    out = Path(os.path.expanduser(v))
    if out.exists() and not out.is_dir():
        raise Invalid(f"{v} exists and is not a directory")
    return v


def _models(value):
    if not isinstance(value, list) or not value:
        raise Invalid("must be a non-empty list of {path: MODEL_DIR_OR_HUB_ID, name: OPTIONAL_NAME}"
                      if value is not None else
                      "missing: list at least one model, e.g. models: [{path: models/smollm2}]")
    return [_model_entry(v) for v in value]


class RunConfig(Section):
    """`coco-tools run CONFIG.yaml`: every key, typed, with the embedded default run's values."""

    out: Annotated[str, BeforeValidator(_out)] = "runs/main"
    seed: Int(lo=0) = N.SEED
    keep_models: Flag() = False
    data: Data = Data()
    models: Annotated[list[ModelEntry], BeforeValidator(_models)] = Field(None, validate_default=True)  # required
    identify: Identify = Identify()
    baselines: Choices(CONTROL_BASELINES, empty=True, what="rand, norm, mact") = ["rand"]
    # name -> NeuronSet; given, it replaces the default as a whole; stored with each set after its source
    sets: dict[str, NeuronSet] = {"stereo": NeuronSet(**{"contrast": "stereotype", "limit": 24,
                                                         "abstention_filter": True}),
                                  "diffmean": NeuronSet(**{"from": "stereo", "baseline": "diffmean"})}
    ablation: Ablation = Ablation()
    sweep: Sweep = Sweep()
    stability: Stability = Stability()
    final: Final = Final()
    parity: Parity = Parity()
    eval: Eval = Eval()

    @model_validator(mode="before")
    @classmethod
    def _no_sets(cls, data):
        if isinstance(data, dict) and "sets" in data and data["sets"] is None:  # null: no sets
            data = {**data, "sets": {}}
        return data

    @model_validator(mode="after")
    def _across_sections(self):
        _check_models(self.models)
        _check_set_names(self.sets)
        self.sets = _set_order(self.sets, self.identify.contrast)
        self.sweep.edits = {arm: _kind_grid(arm, values, self.identify.weighting, self.sets)
                            for arm, values in self.sweep.edits.items()}
        for name in self.final.benchmarks:
            bench = benchmarks.get(name)
            shared = [c for c in getattr(bench, "fixed_groups", None) or () if c in self.data.categories]
            if getattr(bench, "held_out", False) and shared:
                _fail(f"final.benchmarks.{name}", f"{', '.join(shared)} is held out by this benchmark and also in "
                      "data.categories; take it out of one of them")
        if all(m.parity_of is not None for m in self.models):
            _fail("models", "every model is a parity twin; at least one must get the full run")
        return self

    def dump(self) -> dict:
        """The resolved config as plain data (what a stage's hash and the report record)."""
        return self.model_dump(by_alias=True)


def _fail(path: str, msg: str):
    raise CocoError(f"{path}: {msg}")


def _check_models(models: list[ModelEntry]) -> None:
    names: dict[str, int] = {}
    for i, m in enumerate(models):
        if m.name in names:
            _fail(f"models[{i}].name", f"{m.name} is already the name of models[{names[m.name]}]; give one a `name:`")
        names[m.name] = i
        twin = m.parity_of
        if twin is not None:
            if twin not in names or twin == m.name:
                _fail(f"models[{i}].parity_of", f"{twin!r} is not the name of an earlier model in `models`")
            if models[names[twin]].parity_of is not None:
                _fail(f"models[{i}].parity_of", f"{twin} is itself a parity twin; name a fully run model")


def _check_set_names(sets: dict) -> None:
    for name, s in sets.items():
        if not NAME.fullmatch(name) or name == "coco":
            _fail(f"sets.{name}", f"{name!r} is not a set name (letters, digits, . _ -; not coco, the identify "
                  "stage's set)")
        if s.from_ is not None and s.from_ != "coco" and (s.from_ not in sets or s.from_ == name):
            _fail(f"sets.{name}.from", f"{s.from_!r} is not coco or another set")


def _set_order(sets: dict, identify_contrast: str) -> dict:
    """`sets` with each set after its source; refuses a cycle and a filter without the stereotype contrast."""
    contrast_of, out = {"coco": identify_contrast}, {}
    while len(out) < len(sets):
        ready = [n for n, s in sets.items() if n not in out and (s.from_ is None or s.from_ in contrast_of)]
        if not ready:
            cycle = sorted(n for n in sets if n not in out)
            _fail(f"sets.{cycle[0]}.from", f"the sets {', '.join(cycle)} are re-selected from each other in a cycle")
        for n in ready:
            s = out[n] = sets[n]
            contrast_of[n] = s.contrast or contrast_of[s.from_]
            if s.abstention_filter and contrast_of[n] != "stereotype":
                _fail(f"sets.{n}.abstention_filter", "needs the stereotype contrast (its abstention control)")
    return out


def _kind_grid(arm, values, weighting: str, sets: dict) -> dict[str, list[float]]:
    """One arm's sweep grid (an edit kind, or KIND@SET: the kind on a set of `sets`): each of its
    settings a list of values (a setting left out: [its default]), each within the range the kind
    gives it, as `coco-tools bake` / `ne` would refuse: caught here, not hours in."""
    where = f"sweep.edits.{arm}"
    kind, _, on = str(arm).partition("@")
    try:
        choice(kind, registry.enhancements())
    except Invalid as exc:
        _fail(where, exc.message)
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
        try:
            out[name] = nums(values.get(name, [p.default]), lo=p.lo, hi=hi, lo_open=p.lo_open)
        except Invalid as exc:
            _fail(path_of((f"{where}.{name}", *exc.at)), exc.message)
    return out


def validate(raw) -> RunConfig:
    """The resolved config (defaults filled in) or CocoError naming the first bad key."""
    return parse(RunConfig, raw)


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


def load(path: str, overrides: dict | None = None) -> RunConfig:
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

    return "vllm" if importlib.util.find_spec("vllm") is not None else "hf"
