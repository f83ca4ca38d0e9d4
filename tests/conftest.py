import os
from pathlib import Path

import numpy as np
import pytest

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
