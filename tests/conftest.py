import os
from pathlib import Path

import numpy as np
import pytest

# One compilation cache for the whole test session, CLI subprocesses included (they read DLG_JAX_CACHE_DIR): the
# same programs recur across tests.
os.environ.setdefault("DLG_JAX_CACHE_DIR", str(Path(__file__).resolve().parents[1] / ".xla-cache"))

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
CIFAR100 = SHARED_DATA / "cifar100_train_0-49.npz"


@pytest.fixture(scope="session")
def cifar100():
    if not CIFAR100.exists():
        if os.environ.get("CI") == "true":  # CI has the shared data: its absence there is a failure, not a skip
            pytest.fail(f"shared data not found at {CIFAR100}")
        pytest.skip(f"shared data not found at {CIFAR100}")
    with np.load(CIFAR100) as npz:
        return {k: npz[k] for k in npz.files}


@pytest.fixture(scope="session", autouse=True)
def compilation_cache():
    from dlg_jax.cli.common import enable_compilation_cache

    enable_compilation_cache()
