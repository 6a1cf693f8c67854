"""User-facing errors: one line naming the problem and the fix; the CLI exits 2."""

from __future__ import annotations

import contextlib
import io
import logging
import sys


class CocoError(Exception):
    """Bad input. The message is shown to the user as a single line."""

    exit_code = 2


def _stream_handlers() -> list:
    """Every logging.StreamHandler on any logger (transformers installs its own)."""
    loggers = [logging.getLogger()] + [lg for lg in list(logging.Logger.manager.loggerDict.values())
                                       if isinstance(lg, logging.Logger)]
    return [h for lg in loggers for h in lg.handlers if isinstance(h, logging.StreamHandler)]


def _stderr_handlers() -> list:
    """The stream handlers that write to this process's stderr (not files: FileHandler is a subclass)."""
    return [h for h in _stream_handlers() if type(h) is logging.StreamHandler
            and h.stream in (sys.stderr, sys.__stderr__)]


@contextlib.contextmanager
def held_stderr():
    """Hold what libraries write to stderr inside the block (a warning at import, argparse's usage
    text, transformers' load report): dropped when the block raises CocoError, whose one line is then
    all the user sees; written out as it was when the block ends in any other way."""
    held = buffer = io.StringIO()
    real = sys.stderr
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
        # handlers made inside the block (by a first import) hold the buffer: they write to stderr from now on
        for h in (h for h in _stream_handlers() if h.stream is buffer):
            h.setStream(real)
        if held is not None and held.getvalue():
            real.write(held.getvalue())
            real.flush()
