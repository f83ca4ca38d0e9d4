"""`python -m dlg_jax.sweep`: many attacks, resumable (the command line lives in dlg_jax/cli/sweep.py)."""

from dlg_jax.cli.common import exit_with
from dlg_jax.cli.sweep import main

if __name__ == "__main__":
    exit_with(main())
