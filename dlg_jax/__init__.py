"""dlg_jax: Deep Leakage from Gradients (Zhu, Liu and Han, NeurIPS 2019) in JAX.

    import dlg_jax
    result = dlg_jax.attack(dlg_jax.load_npz("cifar100_train_0-49.npz"), index=25)
    print(result.psnr, result.status)

The API is dlg_jax/api.py (`attack`, `run_sweep`, `make_config`, `setup`); the command lines are `python -m
dlg_jax.run`, `python -m dlg_jax.sweep` and `python -m dlg_jax.report`.
"""

from importlib import metadata as _metadata

try:
    __version__ = _metadata.version("dlg_jax")
except _metadata.PackageNotFoundError:  # a source tree on sys.path, not installed
    __version__ = "0.1.0"


def _api():
    import importlib

    return importlib.import_module("dlg_jax.api")


def __getattr__(name):  # the API on first use: `import dlg_jax` stays light (no JAX) for the command lines
    api = _api()
    if name in api.__all__:
        return getattr(api, name)
    raise AttributeError(f"module 'dlg_jax' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + _api().__all__)
