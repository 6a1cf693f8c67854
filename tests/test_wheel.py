"""The built wheel carries the lm-eval task folder, and an installed (non-editable) copy finds and
loads its tasks: `coco-tools eval` needs no checkout.

Builds from a copy of the sources (pyproject.toml, README.md, vllm_coco/, evals/; the symlink
vllm_coco/tasks/evals -> ../../evals kept as a symlink), offline, with the venv's setuptools.
"""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EVALS = ROOT / "evals"


def _task_files() -> list[str]:
    """Every file of the task folder, relative to it (YAMLs, templates, READMEs, utils.py)."""
    return sorted(p.relative_to(EVALS).as_posix() for p in EVALS.rglob("*")
                  if p.is_file() and "__pycache__" not in p.parts)


def _pip(*args, cwd=None):
    proc = subprocess.run([sys.executable, "-m", "pip", *args, "--no-deps", "--no-index", "-q",
                           "--disable-pip-version-check"], cwd=cwd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "build", "dist")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    for name in ("vllm_coco", "evals"):
        shutil.copytree(ROOT / name, src / name, symlinks=True, ignore=ignore)
    _pip("wheel", "--no-build-isolation", "-w", str(tmp / "dist"), str(src), cwd=tmp)
    (found,) = (tmp / "dist").glob("vllm_coco-*.whl")
    return found


def test_wheel_carries_the_task_folder_and_the_hooks(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    files = _task_files()
    assert any(f.endswith(".yaml") for f in files) and any(f.endswith("_yaml") for f in files)
    missing = [f for f in files if f"vllm_coco/tasks/evals/{f}" not in names]
    assert not missing, f"task files left out of the wheel: {missing}"
    for module in ("lm_eval_hooks", "task_folder", "bbq_docs", "jailbreak", "retention", "metrics",
                   "answer_parser", "custom_dataset", "evaluate"):
        assert f"vllm_coco/tasks/{module}.py" in names
    # every module of the package is in the wheel (the package-data mapping did not replace discovery)
    sources = {p.relative_to(ROOT).as_posix() for p in (ROOT / "vllm_coco").rglob("*.py")
               if "__pycache__" not in p.parts and "evals" not in p.relative_to(ROOT / "vllm_coco").parts}
    assert sources <= names, sorted(sources - names)


def test_installed_wheel_finds_and_loads_its_tasks(wheel, tmp_path):
    target = tmp_path / "site"
    _pip("install", "--target", str(target), str(wheel))
    assert (target / "vllm_coco" / "tasks" / "evals").is_dir()
    assert not (target / "vllm_coco" / "tasks" / "evals").is_symlink()
    # -S: no site processing, so the checkout's editable-install finder is not active; the venv's
    # site-packages (dependencies) come after the installed copy on PYTHONPATH
    code = """
import json, sys
import vllm_coco
from vllm_coco.tasks.evaluate import evals_dir, local_tasks, task_manager
tm = task_manager(["stereo_coco_Religion"], metadata={"max_items": 1})
task = tm.load(["stereo_coco_Religion"])["tasks"]["stereo_coco_Religion"]
doc = task.eval_docs[0]
rec = task.process_results(doc, [(-1.0, False)] * len(doc["choices"]))
utils = [m.__file__ for m in sys.modules.values() if getattr(m, "__file__", None) and m.__file__.endswith("utils.py")
         and "stereo_coco" in m.__file__]
print(json.dumps({"package": vllm_coco.__file__, "evals": str(evals_dir()), "groups": sorted(local_tasks(evals_dir())),
                  "docs": len(task.eval_docs), "keys": sorted(rec), "utils": utils}))
"""
    env = {k: v for k, v in os.environ.items() if k not in ("COCO_EVALS_DIR", "PYTHONPATH")}
    env["PYTHONPATH"] = os.pathsep.join([str(target), sysconfig.get_paths()["purelib"]])
    proc = subprocess.run([sys.executable, "-S", "-c", code], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert Path(out["package"]).is_relative_to(target)
    assert Path(out["evals"]) == (target / "vllm_coco" / "tasks" / "evals").resolve()
    assert {"stereo_coco", "stereo_coco_gen", "stereo_coco_jailbreak", "coco_retention"} <= set(out["groups"])
    assert out["docs"] == 2 * 3 and "success_rate" in out["keys"]
    assert out["utils"] and all(Path(u).is_relative_to(target) for u in out["utils"])
