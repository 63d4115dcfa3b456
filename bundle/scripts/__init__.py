"""TCMN bundle scripts: only what MONAI, Ignite and PyTorch do not already provide."""


def prepare_job() -> None:
    """Called first by every job (each config's `initialize`, the benchmarks' `main`): nothing happens at import.

    - A failed run's last line names the bad input (`errors.install_error_report`), not MONAI's generic wrapper.
    - Denormal floats are flushed to zero: trained affinities produce them, they are very slow on x86 CPUs, and
      flushing them costs no accuracy here.
    """
    import torch

    from scripts.errors import install_error_report

    install_error_report()
    torch.set_flush_denormal(True)
