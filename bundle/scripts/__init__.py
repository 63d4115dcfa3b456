"""TCMN bundle scripts: only what MONAI, Ignite and PyTorch do not already provide."""

from __future__ import annotations

from collections.abc import Mapping


def prepare_job(flags: Mapping[str, Mapping] | None = None) -> None:
    """Called first by every job (each config's `initialize`, the benchmarks' `main`): nothing happens at import.

    - The command line is checked against the config's `flags` (`flags.check_flags`): a mistyped flag or a bad value
      ends the job with one `error:` line and `--help` lists the flags, before any work.
    - A failed run's last line names the bad input (`errors.install_error_report`), not MONAI's generic wrapper.
    - Denormal floats are flushed to zero: trained affinities produce them, they are very slow on x86 CPUs, and
      flushing them costs no accuracy here.
    """
    import torch

    from scripts.errors import install_error_report
    from scripts.flags import check_flags

    if flags is not None:
        check_flags(flags)
    install_error_report()
    torch.set_flush_denormal(True)
