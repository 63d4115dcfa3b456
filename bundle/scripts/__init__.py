"""TCMN bundle scripts: only what MONAI, Ignite and PyTorch do not already provide."""

from __future__ import annotations

from collections.abc import Mapping


def prepare_job(flags: Mapping[str, Mapping] | None = None) -> None:
    """Called first by every job (each config's `initialize`, the benchmarks' `main`): nothing happens at import.

    - The command line is checked against the config's `flags` (`flags.check_flags`): a mistyped flag or a bad value
      ends the job with one `error:` line and `--help` lists the flags, before any work.
    - A failed run ends with one line naming the bad input (`errors.install_error_report`), not with MONAI's
      chained tracebacks; Ctrl-C with one line saying what was kept. `--debug true` or `TCMN_DEBUG=1` keeps the
      traceback.
    - Denormal floats are flushed to zero: trained affinities produce them, they are very slow on x86 CPUs, and
      flushing them costs no accuracy here.
    """
    import torch

    from scripts.errors import install_error_report
    from scripts.flags import check_flags, job_and_debug

    install_error_report(*job_and_debug())
    if flags is not None:
        check_flags(flags)
    torch.set_flush_denormal(True)
