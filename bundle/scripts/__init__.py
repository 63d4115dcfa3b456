"""TCMN bundle scripts: only what MONAI, Ignite and PyTorch do not already provide."""
