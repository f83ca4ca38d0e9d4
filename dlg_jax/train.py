"""`python -m dlg_jax.train`: train a registry model on an npz and save a checkpoint (the command line lives in
dlg_jax/cli/train.py)."""

from dlg_jax.cli.common import exit_with
from dlg_jax.cli.train import main

if __name__ == "__main__":
    exit_with(main())
