"""The lifetime of a vLLM engine this project starts: stopped explicitly, before the interpreter exits.

Why (issue 27): a `vllm.LLM` left to interpreter exit is shut down by finalizers while Python
finalizes its daemon threads. vLLM's client keeps background threads (the engine-core monitor,
the output socket's reader); one that wakes inside native code as the interpreter tears down is
ended with pthread_exit, whose forced unwind through a C++ frame calls std::terminate: "terminate
called without an active exception" and SIGABRT after the work had finished. Stopping the engine
core (process, workers, sockets, those threads) while the interpreter is whole removes the race.

No vLLM import here: the functions take whatever engine object they are given.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator

JOIN_TIMEOUT_S = 10.0


def shutdown(llm) -> None:
    """Stop a `vllm.LLM`'s engine core now (its process, workers, sockets) and wait for its output
    thread, which shutdown() only signals; idempotent, and a no-op for anything without one
    (lm-eval's Ray data-parallel replicas are stopped by Ray). The client's monitor thread returns
    by itself once the engine process it watches is gone, which shutdown() waits for."""
    core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if core is not None:
        core.shutdown()
        thread = getattr(core, "output_queue_thread", None)  # SyncMPClient's socket reader
        if thread is not None:
            thread.join(JOIN_TIMEOUT_S)
    gc.collect()  # the engine's remaining finalizers run now, not at exit


@contextlib.contextmanager
def closing(llm) -> Iterator:
    """`with closing(LLM(...)) as llm:` the engine is stopped when the block ends, however it ends."""
    try:
        yield llm
    finally:
        shutdown(llm)
