"""The one error type for bad user input, and the report that makes it the last line a user reads.

Kept apart from every reader and writer so that any module (and the package's ``__init__``) can raise or report it
without importing NIfTI, DICOM or video code.
"""

from __future__ import annotations

import sys
from types import TracebackType


class InputError(ValueError):
    """A user-supplied file or directory cannot be used; the message names it and says why."""


_previous_excepthook = sys.excepthook


def _report_input_error(exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
    """After the usual traceback, print the `InputError` behind it (the file and the problem) as the last line.

    `python -m monai.bundle run` wraps every error raised while a config is evaluated in a generic
    `RuntimeError: Failed to evaluate ConfigExpression`, which would otherwise be the last line a user reads.
    """
    _previous_excepthook(exc_type, exc, tb)
    cause, seen = exc, set()
    while cause is not None and id(cause) not in seen and not isinstance(cause, InputError):
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    if isinstance(cause, InputError) and cause is not exc:
        print(f"error: {cause}", file=sys.stderr)


def install_error_report() -> None:
    """Make ``sys.excepthook`` also print the ``InputError`` behind an uncaught error; calling it again does nothing."""
    global _previous_excepthook
    if sys.excepthook is not _report_input_error:
        _previous_excepthook = sys.excepthook
        sys.excepthook = _report_input_error
