"""lm-eval hooks (`!function utils.NAME`) for the tasks in this folder.

lm-eval imports this file by path, so it cannot import a sibling package; it loads the shared
evals/coco_eval.py once (module name `coco_eval`) and re-exports it: one copy of the logic.
"""

import importlib.util
import sys
from pathlib import Path

if "coco_eval" not in sys.modules:
    _spec = importlib.util.spec_from_file_location("coco_eval", Path(__file__).resolve().parents[1] / "coco_eval.py")
    _module = importlib.util.module_from_spec(_spec)
    sys.modules["coco_eval"] = _module
    try:
        _spec.loader.exec_module(_module)
    except BaseException:
        del sys.modules["coco_eval"]  # no half-initialised module for the next import
        raise

from coco_eval import *  # noqa: E402,F401,F403
