"""The PyTorch original of DLG, for checking dlg_jax against it (needs torch: `pip install torch`).

`dlg_jax.reference.torch_dlg` holds the reference LeNet, its seeded initialisation, the reference attack
(torch.optim.LBFGS, 300 steps) and weight/image transfer between the Flax and torch models. Importing this
package without torch raises ImportError with an install hint; the rest of dlg_jax never imports it.
"""

try:
    import torch  # noqa: F401
except ImportError as error:  # pragma: no cover - exercised only where torch is absent
    raise ImportError(
        "dlg_jax.reference needs PyTorch, which is not installed: pip install torch "
        "(the CPU wheel is enough; see https://pytorch.org/get-started/locally/)"
    ) from error

from dlg_jax.reference.torch_dlg import (  # noqa: E402
    TorchLeNet,
    flax_to_torch,
    init_reference_weights,
    labels_to_torch,
    nchw_to_nhwc,
    nhwc_to_nchw,
    reference_dummy,
    reference_setup,
    shared_gradient,
    torch_dlg,
    torch_to_flax,
)

__all__ = [
    "TorchLeNet",
    "flax_to_torch",
    "init_reference_weights",
    "labels_to_torch",
    "nchw_to_nhwc",
    "nhwc_to_nchw",
    "reference_dummy",
    "reference_setup",
    "shared_gradient",
    "torch_dlg",
    "torch_to_flax",
]
