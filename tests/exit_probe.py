"""Run `coco-tools ARGS...` in this process and report, just before the interpreter would exit, what
is still running: Python threads (name, daemon), child processes, and native thread names.

Used by tests/test_evals_slow.py (issue 27): a vLLM engine left alive to interpreter exit is torn
down while Python finalizes its daemon threads, and a thread ended inside native code aborts the
process ("terminate called without an active exception", SIGABRT) after the work had finished;
whether it does is a race. What the race needs is deterministic: the engine's client threads and
its engine-core process still alive when the command returns. This reports them as one JSON line
on stderr, prefixed EXIT_PROBE, then exits with the command's code.
"""

import json
import multiprocessing
import os
import sys
import threading
from pathlib import Path


def _native_threads() -> list[str]:
    tasks = Path(f"/proc/{os.getpid()}/task")
    return sorted((t / "comm").read_text().strip() for t in tasks.iterdir()) if tasks.is_dir() else []


def main() -> int:
    from vllm_coco.cli import main as coco_tools

    code = 0
    try:
        coco_tools(sys.argv[1:])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    report = {"code": code,
              "threads": [[t.name, t.daemon] for t in threading.enumerate() if t is not threading.main_thread()],
              "children": [p.pid for p in multiprocessing.active_children()],
              "native_threads": _native_threads()}
    print("EXIT_PROBE " + json.dumps(report), file=sys.stderr, flush=True)
    return code


if __name__ == "__main__":  # vLLM spawns its engine process: the main module must be importable
    sys.exit(main())
