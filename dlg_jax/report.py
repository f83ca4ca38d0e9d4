"""`python -m dlg_jax.report DIR`: redo a sweep's summary (the command line lives in dlg_jax/cli/report.py)."""

from dlg_jax.cli.common import exit_with
from dlg_jax.cli.report import main

if __name__ == "__main__":
    exit_with(main())
