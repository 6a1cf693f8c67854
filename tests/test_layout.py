"""The package layout's import rules (README.md, "Module map"), checked on the source.

- core/ imports no stage; a stage imports only core/ and stages before it in the pipeline
  (data -> identify -> edit -> serve -> tasks -> experiment), lazily or not; only the CLI and
  the experiment import tasks.evaluate (the `coco-tools eval` runner);
- the imports form no cycle, imports inside functions included (those are lazy only to keep
  `--help` and vLLM's plugin loading light, never to hide a cycle).
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
