"""``tiny-audio`` commands run inside a Python process with their output captured: for ``conftest.run_here`` (in
the test process) and ``conftest.run_in_one_process`` (several in a new one). Imports nothing heavy: the child of
the latter reads its environment's settings when it imports the libraries, as the real command does."""

from __future__ import annotations

import contextlib
import io
import logging
import subprocess
import traceback
from collections.abc import Sequence


def run_main(args: Sequence[str]) -> subprocess.CompletedProcess:
    """``tiny-audio ARGS`` through :func:`tiny_audio_pl.cli.main`, in this process and its current folder.

    Its stdout and stderr are what it printed and logged: the logging handlers that write to a terminal write to its
    stderr meanwhile, as does one added on the root logger (in a process of its own, Lightning's handler or Python's
    last-resort one prints those records); warnings go to pytest's report instead. The return code is its exit
    status; an exception gives 1 and its traceback on stderr."""
    from tiny_audio_pl.cli import main

    out, err = io.StringIO(), io.StringIO()
    loggers = [logging.getLogger(), *(v for v in logging.Logger.manager.loggerDict.values()
                                      if isinstance(v, logging.Logger))]
    terminals = [h for logger in loggers for h in logger.handlers if type(h) is logging.StreamHandler]
    streams = [handler.stream for handler in terminals]
    last_resort = logging.StreamHandler(err)
    logging.getLogger().addHandler(last_resort)
    try:
        # Not setStream, which flushes the stream it replaces: a library that made its handler inside a test with
        # capsys (datasets, when test_cli.py runs alone) holds that capture's stream, closed since.
        for handler in terminals:
            handler.stream = err
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main(list(args))
                code = 0
            except SystemExit as stop:
                code = stop.code if isinstance(stop.code, int) else int(stop.code is not None)
                if isinstance(stop.code, str):
                    print(stop.code, file=err)
            except Exception:
                traceback.print_exc(file=err)
                code = 1
    finally:
        for handler, stream in zip(terminals, streams):
            handler.stream = stream
        logging.getLogger().removeHandler(last_resort)
    return subprocess.CompletedProcess(["tiny-audio", *args], code, out.getvalue(), err.getvalue())
