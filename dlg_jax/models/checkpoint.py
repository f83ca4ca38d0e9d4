"""Model weights on disk: one .npz of the parameters and the state (BatchNorm's running statistics).

    save(path, model, params, info)          # arrays under "params/<module>/<name>" and "state/...", and a JSON info
    model, params = load(path, model)        # checked against the model: the same names and shapes, or ValueError

No weights can be downloaded here: checkpoints are what `python -m dlg_jax.train` writes. A checkpoint of
`resnet20` loads into `resnet20-train` too (the same weights; only BatchNorm's mode differs).
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from dlg_jax.models import Model, get_model
from dlg_jax.results.files import write_atomic

INFO_KEY = "info.json"


def _flat(prefix: str, tree) -> dict[str, np.ndarray]:
    return {f"{prefix}/" + "/".join(k): np.asarray(v) for k, v in flatten_dict(tree).items()} if tree else {}


def save(path, model: Model, params, info: dict | None = None, state=None) -> None:
    """Write `params` and `state` (default the model's) to `path` (.npz), with `info` (JSON: model, steps...)."""
    arrays = {**_flat("params", params), **_flat("state", model.state if state is None else state)}
    meta = dict(model=model.name, num_classes=model.num_classes, input_shape=list(model.input_shape), **(info or {}))
    arrays[INFO_KEY] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    write_atomic(Path(path), buffer.getvalue())


def info(path) -> dict:
    with np.load(path) as data:
        return json.loads(bytes(data[INFO_KEY]).decode()) if INFO_KEY in data else {}


def _check(kind: str, path, expected: dict, found: dict) -> None:
    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected))
    if missing:
        raise ValueError(f"checkpoint {path} does not fit the model: it has no {kind} {missing[0]}")
    if extra:
        raise ValueError(f"checkpoint {path} does not fit the model: it has a {kind} {extra[0]} the model has not")
    for name, template in expected.items():
        if tuple(found[name].shape) != tuple(template.shape):
            raise ValueError(f"checkpoint {path} does not fit the model: {kind} {name} has shape "
                             f"{tuple(found[name].shape)}, the model's is {tuple(template.shape)}")


def load(path, model: Model, dtype=None) -> tuple[Model, Any]:
    """The model with the checkpoint's state, and its parameters (in `dtype`, default the checkpoint's)."""
    try:
        data = dict(np.load(path))
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot read checkpoint {path}: {error}") from None
    data.pop(INFO_KEY, None)
    params_template = {"/".join(k): v for k, v in flatten_dict(jax.eval_shape(lambda: model.init(0))).items()}
    state_template = {"/".join(k): v for k, v in flatten_dict(model.state or {}).items()}
    found_params = {k[len("params/"):]: v for k, v in data.items() if k.startswith("params/")}
    found_state = {k[len("state/"):]: v for k, v in data.items() if k.startswith("state/")}
    _check("parameter", path, params_template, found_params)
    _check("state entry", path, state_template, found_state)
    cast = (lambda v: np.asarray(v, dtype)) if dtype is not None else np.asarray
    params = unflatten_dict({tuple(k.split("/")): jax.numpy.asarray(cast(v)) for k, v in found_params.items()})
    state = unflatten_dict({tuple(k.split("/")): np.asarray(v) for k, v in found_state.items()}) if found_state else {}
    return get_model(model.name, model.num_classes, model.input_shape, state=state), params
