"""The one error type for bad user input, and the report that makes a failed or interrupted job end in one line.

Kept apart from every reader and writer so that any module (and the package's ``__init__``) can raise or report it
without importing NIfTI, DICOM or video code.
"""

from __future__ import annotations

import argparse
import os
import sys
from types import TracebackType

DEBUG_ENV = "TCMN_DEBUG"  # TCMN_DEBUG=1 (like --debug true) prints the full traceback of a failed job
# what an interrupted job leaves behind, by job (`run_id`); the staged outputs of the others are rolled back
INTERRUPTED = {
    "batch_inference": "interrupted; the videos finished before are kept, the one in progress is not written",
    "training": "interrupted; the checkpoints saved so far are kept",
}
INTERRUPTED_DEFAULT = "interrupted, nothing written"


class InputError(ValueError):
    """A user-supplied file or directory cannot be used; the message names it and says why."""


class OneLineParser(argparse.ArgumentParser):
    """argparse for the developer tools, ending a bad command line in one ``error:`` line as the bundle's jobs do
    (argparse prints the usage too)."""

    def error(self, message: str) -> None:
        raise SystemExit(f"error: {message}")

    def check_output_file(self, flag: str, path: os.PathLike, overwrite: bool) -> None:
        """A file the tool will write: its folder exists, and an existing file is replaced only when asked."""
        path = os.fspath(path)
        if os.path.exists(path) and not overwrite:
            self.error(f"{flag} {path}: exists; add --overwrite to replace it")
        if not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            self.error(f"{flag} {path}: no folder {os.path.dirname(path) or '.'}")


_previous_excepthook = sys.excepthook
_state = {"debug": False, "interrupted": INTERRUPTED_DEFAULT}


def debugging() -> bool:
    """Whether a failed job shows its traceback: ``--debug true`` or ``TCMN_DEBUG`` set to 1/true/yes/on."""
    return _state["debug"] or os.environ.get(DEBUG_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def input_error_behind(exc: BaseException) -> InputError | None:
    """The `InputError` an exception is, or was raised from (MONAI wraps errors of config expressions and components
    in its own `RuntimeError`s, once or twice), or None."""
    cause, seen = exc, set()
    while cause is not None and id(cause) not in seen and not isinstance(cause, InputError):
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return cause if isinstance(cause, InputError) else None


def _report(exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
    """The last words of a job that did not finish: one line, the traceback only with `debugging()`.

    - Bad input or a failed write (an `InputError`, however deeply MONAI wrapped it): `error: <path>: <problem>`.
    - Ctrl-C: what the job leaves behind (`INTERRUPTED`); Python then ends the process by SIGINT, which a shell
      reports as exit status 130.
    - Anything else is a bug, whose traceback is what a report of it needs: printed as before.
    """
    if debugging():
        _previous_excepthook(exc_type, exc, tb)
    if issubclass(exc_type, KeyboardInterrupt):
        print(_state["interrupted"], file=sys.stderr)
        return
    cause = input_error_behind(exc)
    if cause is None:
        if not debugging():
            _previous_excepthook(exc_type, exc, tb)
        return
    print(f"error: {cause}", file=sys.stderr)


def install_error_report(job: str | None = None, debug: bool = False) -> None:
    """Make ``sys.excepthook`` end a failed or interrupted `job` (its `run_id`) with one line; `debug` keeps the
    traceback too. Calling it again only updates `job` and `debug`."""
    global _previous_excepthook
    _state["debug"] = debug
    _state["interrupted"] = INTERRUPTED.get(job or "", INTERRUPTED_DEFAULT)
    if sys.excepthook is not _report:
        _previous_excepthook = sys.excepthook
        sys.excepthook = _report
