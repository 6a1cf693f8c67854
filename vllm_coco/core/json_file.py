"""Reading a JSON file the user gave us (config.json, a shard index, neurons.json, lm-eval results,
tokenizer_config.json): one place that turns every way it can be unreadable into one line; and a
model directory's config.json, checked to be one."""

from __future__ import annotations

import json
from pathlib import Path

from vllm_coco.core.errors import CocoError


def read_json(path, fix: str):
    """The JSON value in `path`, or a CocoError naming the file, what is wrong, and `fix`."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:  # before ValueError: it is one
        why = "not UTF-8 text"
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, a number over the digit limit, deep nesting
        why = f"invalid JSON: {getattr(exc, 'msg', type(exc).__name__)}"
    except OSError as exc:
        why = exc.strerror or type(exc).__name__
    raise CocoError(f"{path} is not a readable JSON file ({why}); {fix}")


def read_config(model_dir: Path) -> dict:
    """config.json as a dict with a `model_type`; CocoError naming the file on any problem."""
    path = Path(model_dir) / "config.json"
    fix = "fix it or regenerate the model directory with save_pretrained"
    cfg = read_json(path, fix)
    if not isinstance(cfg, dict):
        raise CocoError(f"{path} holds a {type(cfg).__name__}, not a model config object; {fix}")
    if not isinstance(cfg.get("model_type"), str) or not cfg["model_type"]:
        raise CocoError(f"{path} has no model_type; {fix}")
    archs = cfg.get("architectures")
    if archs is not None and (not isinstance(archs, list) or not all(isinstance(a, str) for a in archs)):
        raise CocoError(f"{path}: architectures is {archs!r}, not a list of class names; {fix}")
    return cfg
