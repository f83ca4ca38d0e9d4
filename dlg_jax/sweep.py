"""`python -m dlg_jax.sweep`: many attacks, resumable (the command line lives in dlg_jax/cli/sweep.py)."""

import sys

from dlg_jax.cli.sweep import main

if __name__ == "__main__":
    sys.exit(main())
