"""TCMN bundle scripts: only what MONAI, Ignite and PyTorch do not already provide."""

import sys
from types import TracebackType

_previous_excepthook = sys.excepthook


def _report_input_error(exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
    """After the usual traceback, print the `InputError` behind it (the file and the problem) as the last line.

    `python -m monai.bundle run` wraps every error raised while a config is evaluated in a generic
    `RuntimeError: Failed to evaluate ConfigExpression`, which would otherwise be the last line a user reads.
    """
    _previous_excepthook(exc_type, exc, tb)
    from scripts.io import InputError

    cause, seen = exc, set()
    while cause is not None and id(cause) not in seen and not isinstance(cause, InputError):
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    if isinstance(cause, InputError) and cause is not exc:
        print(f"error: {cause}", file=sys.stderr)


sys.excepthook = _report_input_error
