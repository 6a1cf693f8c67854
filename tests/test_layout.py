"""The package layout's import rules (README.md, "Module map"), checked on the source.

- core/ imports no stage; a stage imports only core/ and stages before it in the pipeline
  (data -> identify -> edit -> serve -> tasks -> experiment), lazily or not; only the CLI and
  the experiment import tasks.evaluate (the `coco-tools eval` runner);
- the imports form no cycle, imports inside functions included (those are lazy only to keep
  `--help` and vLLM's plugin loading light, never to hide a cycle);
- an import inside a function defers a heavy dependency (HEAVY, directly or through the modules
  the imported one loads at its top), or sits in an entry point (the CLI, the vLLM plugin); a
  module with such imports says so once at its top (`# Lazy imports:`).
"""

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "vllm_coco"
STAGES = ("data", "identify", "edit", "serve", "tasks", "experiment")


def _module(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(imported vllm_coco module, at module level?) for every import in the file."""
    tree = ast.parse(path.read_text())
    top = {id(n) for n in tree.body}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("vllm_coco"):
            names = [f"{node.module}.{a.name}" for a in node.names]
            out += [(n if (PKG.parent / (n.replace(".", "/") + ".py")).exists() else node.module, id(node) in top)
                    for n in names]
        elif isinstance(node, ast.Import):
            out += [(a.name, id(node) in top) for a in node.names if a.name.startswith("vllm_coco")]
    return out


GRAPH = {_module(p): _imports(p) for p in PKG.rglob("*.py")}
# what an import inside a function may defer: the libraries that take long to import or are optional
HEAVY = {"torch", "transformers", "vllm", "lm_eval", "datasets", "numpy", "safetensors", "matplotlib",
         "accelerate", "gguf", "huggingface_hub", "pydantic", "yaml"}
ENTRY_POINTS = {"vllm_coco.cli", "vllm_coco.serve.plugin"}


def _all_imports(path: Path) -> list[tuple[str, bool]]:
    """(imported module, at module level?) for every absolute import in the file, any package."""
    tree = ast.parse(path.read_text())
    top = {id(n) for b in tree.body for n in ast.walk(b) if not isinstance(b, (ast.FunctionDef, ast.ClassDef))}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out += [(f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in GRAPH else node.module, id(node) in top)
                    for a in node.names]
        elif isinstance(node, ast.Import):
            out += [(a.name, id(node) in top) for a in node.names]
    return out


FILES = {_module(p): p for p in PKG.rglob("*.py")}


def _loads_heavy(module: str, seen: frozenset = frozenset()) -> bool:
    """Whether importing `module` imports a HEAVY library (through top-level imports only)."""
    if not module.startswith("vllm_coco"):
        return module.split(".")[0] in HEAVY
    if module not in FILES or module in seen:
        return False
    return any(_loads_heavy(m, seen | {module}) for m, top in _all_imports(FILES[module]) if top)


def _stage(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in (*STAGES, "core") else None


def test_core_imports_no_stage():
    bad = [(m, i) for m, imps in GRAPH.items() if _stage(m) == "core"
           for i, _ in imps if _stage(i) in STAGES]
    assert not bad, bad


def test_nothing_below_the_front_ends_imports_them():
    front = ("vllm_coco.cli", "vllm_coco.experiment", "vllm_coco.tasks.evaluate")
    bad = [(m, i) for m, imps in GRAPH.items() if not m.startswith(("vllm_coco.cli", "vllm_coco.experiment"))
           for i, _ in imps if i.startswith(front) and i != m]
    assert not bad, bad


def test_no_import_cycle():
    edges = {m: {i for i, _ in imps if i in GRAPH and i != m} for m, imps in GRAPH.items()}
    state: dict[str, int] = {}

    def visit(m, path):
        state[m] = 1
        for n in sorted(edges[m]):
            assert state.get(n) != 1, " -> ".join(path + [n])
            if n not in state:
                visit(n, path + [n])
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m, [m])


def test_stages_import_only_earlier_stages():
    order = {s: i for i, s in enumerate(STAGES)}
    bad = [(m, i) for m, imps in GRAPH.items() if _stage(m) in order
           for i, _ in imps if _stage(i) in order and order[_stage(i)] > order[_stage(m)]]
    assert not bad, bad


def test_function_level_imports_defer_heavy_dependencies_and_say_so():
    light, unsaid = [], []
    for module, path in FILES.items():
        lazy = [m for m, top in _all_imports(path) if not top]
        if module not in ENTRY_POINTS:
            light += [(module, m) for m in lazy if not _loads_heavy(m)]
        if lazy and "# Lazy imports:" not in path.read_text():
            unsaid.append(module)
    assert not light, f"import these at the module's top (they load nothing heavy): {light}"
    assert not unsaid, f"say once at the top why these import inside functions (# Lazy imports: ...): {unsaid}"
