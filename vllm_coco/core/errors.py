"""User-facing errors: one line naming the problem and the fix; the CLI exits 2."""

from __future__ import annotations

import contextlib


class CocoError(Exception):
    """Bad input. The message is shown to the user as a single line."""

    exit_code = 2


def _stderr_handlers() -> list:
    """logging StreamHandlers that write to this process's stderr (transformers installs its own)."""
    import logging
    import sys

    loggers = [logging.getLogger()] + [lg for lg in list(logging.Logger.manager.loggerDict.values())
                                       if isinstance(lg, logging.Logger)]
    return [h for lg in loggers for h in lg.handlers
            if type(h) is logging.StreamHandler and h.stream in (sys.stderr, sys.__stderr__)]


@contextlib.contextmanager
def held_stderr():
    """Hold what libraries write to stderr inside the block (a warning at import, argparse's usage
    text, transformers' load report): dropped when the block raises CocoError, whose one line is then
    all the user sees; written out as it was when the block ends in any other way."""
    import io
    import sys

    held, real = io.StringIO(), sys.stderr
    handlers = _stderr_handlers()
    streams = [h.setStream(held) for h in handlers]  # setStream returns the stream it replaces
    try:
        with contextlib.redirect_stderr(held):  # print(file=sys.stderr), warnings, logging.lastResort
            yield
    except CocoError:
        held = None
        raise
    finally:
        for h, s in zip(handlers, streams):
            h.setStream(s)
        if held is not None and held.getvalue():
            real.write(held.getvalue())
            real.flush()
