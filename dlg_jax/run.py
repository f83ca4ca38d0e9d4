"""`python -m dlg_jax.run`: one attack (the command line lives in dlg_jax/cli/run.py)."""

from dlg_jax.cli.common import exit_with
from dlg_jax.cli.run import main

if __name__ == "__main__":
    exit_with(main())
