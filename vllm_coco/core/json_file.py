"""Reading a JSON file the user gave us (config.json, a shard index, neurons.json, lm-eval results,
tokenizer_config.json): one place that turns every way it can be unreadable into one line."""

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
