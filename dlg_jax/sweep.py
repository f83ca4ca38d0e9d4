"""`python -m dlg_jax.sweep`: many attacks, resumable (the command line lives in dlg_jax/cli/sweep.py)."""

import os
import sys

from dlg_jax.cli.sweep import main

if __name__ == "__main__":
    code = main()
    if code == 130:  # Ctrl-C: the one line is out; leave without tearing down JAX's threads (which can crash)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
