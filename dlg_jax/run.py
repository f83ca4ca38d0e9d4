"""`python -m dlg_jax.run`: one attack (the command line lives in dlg_jax/cli/run.py)."""

import sys

from dlg_jax.cli.run import main

if __name__ == "__main__":
    sys.exit(main())
