"""Where private images come from: tensorflow-datasets, a local npz, or image files.

Every source yields a `Dataset`: uint8 images NHWC, int64 labels and class names, so the attack never
needs to know where its data came from. A local npz (`images` uint8 NHWC or NHW, `labels`, optional
`label_names`) is a first-class source: it is how to work offline, where tfds cannot download.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import warnings
import zipfile
from pathlib import Path
from typing import Sequence

import numpy as np

from dlg_jax.errors import UsageError

# The class names of the datasets the CLI knows by name (tfds's order), also captions for --image.
CIFAR100_NAMES = tuple("""apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly
camel can castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup dinosaur dolphin
elephant flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower leopard lion lizard lobster man
maple_tree motorcycle mountain mouse mushroom oak_tree orange orchid otter palm_tree pear pickup_truck pine_tree plain
plate poppy porcupine possum rabbit raccoon ray road rocket rose sea seal shark shrew skunk skyscraper snail snake
spider squirrel streetcar sunflower sweet_pepper table tank telephone television tiger tractor train trout tulip
turtle wardrobe whale willow_tree wolf woman worm""".split())
CIFAR10_NAMES = tuple("airplane automobile bird cat deer dog frog horse ship truck".split())
MNIST_NAMES = tuple(str(d) for d in range(10))

# Shapes, class counts and names of those datasets; the host is where tfds downloads from.
TFDS_DATASETS = {
    "cifar100": dict(shape=(32, 32, 3), num_classes=100, names=CIFAR100_NAMES, host="www.cs.toronto.edu"),
    "cifar10": dict(shape=(32, 32, 3), num_classes=10, names=CIFAR10_NAMES, host="www.cs.toronto.edu"),
    "mnist": dict(shape=(28, 28, 1), num_classes=10, names=MNIST_NAMES, host="storage.googleapis.com"),
}
OFFLINE_HINT = "pass --data FILE.npz (keys images, labels) or --image PATH instead"


@dataclasses.dataclass(frozen=True)
class Dataset:
    images: np.ndarray  # uint8 (N, H, W, C)
    labels: np.ndarray  # int64 (N,); -1 where unknown (an image file without --label)
    label_names: tuple[str, ...]
    source: str

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])

    @property
    def num_classes(self) -> int:
        return len(self.label_names)

    def __len__(self) -> int:
        return len(self.images)

    def content_hash(self) -> str:
        """sha256 of the images, labels and class names: what identifies the data, wherever it lies."""
        import hashlib

        digest = hashlib.sha256()
        for part in (np.ascontiguousarray(self.images), np.ascontiguousarray(self.labels, np.int64)):
            digest.update(str(part.shape).encode())
            digest.update(part.tobytes())
        digest.update("\n".join(self.label_names).encode())
        return digest.hexdigest()

    def check_indices(self, indices: Sequence[int]) -> None:
        for i in indices:
            if not 0 <= i < len(self):
                raise UsageError(f"index {i} is out of range: {self.source} has {len(self)} images (0..{len(self) - 1})")


def as_nhwc(images: np.ndarray, what: str) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise UsageError(f"{what}: images must be NHWC with 1 or 3 channels (or NHW), got shape {images.shape}")
    if images.dtype != np.uint8:
        raise UsageError(f"{what}: images must be uint8 in [0, 255], got {images.dtype}")
    return images


def load_npz(path: str | os.PathLike) -> Dataset:
    """A dataset from an npz with `images` (uint8 NHWC or NHW), `labels` and optional `label_names`."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"--data {path}: no such file")
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):  # a .npy under another name: one array, no keys
            raise UsageError(f"--data {path}: not an npz archive (one array of shape {loaded.shape}); "
                             "save images and labels with numpy.savez")
        with loaded as npz:
            missing = [k for k in ("images", "labels") if k not in npz.files]
            if missing:
                raise UsageError(f"--data {path}: missing key(s) {', '.join(missing)} (has {', '.join(npz.files) or 'none'})")
            images, labels = npz["images"], npz["labels"]
            names = npz["label_names"] if "label_names" in npz.files else None
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as error:
        raise UsageError(f"--data {path}: not a readable npz ({error})") from None
    images = as_nhwc(images, f"--data {path}")
    labels = integer_labels(labels, f"--data {path}")
    if len(labels) != len(images):
        raise UsageError(f"--data {path}: {len(images)} images but {len(labels)} labels")
    num_classes = len(names) if names is not None else int(labels.max()) + 1 if len(labels) else 0
    if names is None:
        num_classes = _guess_num_classes(num_classes)
    label_names = tuple(str(n) for n in names) if names is not None else tuple(str(c) for c in range(num_classes))
    if len(labels) and (labels.min() < 0 or labels.max() >= len(label_names)):
        raise UsageError(f"--data {path}: labels must lie in 0..{len(label_names) - 1}")
    return Dataset(images, labels, label_names, str(path))


def integer_labels(labels, what: str) -> np.ndarray:
    """Labels as int64 (N,): integers, or floats that are whole numbers; anything else is a usage error (84.7 must
    not quietly become 84, a string or NaN must not become a traceback)."""
    labels = np.asarray(labels).reshape(-1)
    if np.issubdtype(labels.dtype, np.integer) or labels.dtype == bool:
        return labels.astype(np.int64)
    if np.issubdtype(labels.dtype, np.floating):
        if not np.all(np.isfinite(labels)):
            raise UsageError(f"{what}: labels must be whole numbers, found NaN or inf")
        if np.any(labels != np.round(labels)):
            bad = labels[labels != np.round(labels)][0]
            raise UsageError(f"{what}: labels must be whole numbers, found {bad}")
        return labels.astype(np.int64)
    raise UsageError(f"{what}: labels must be integers, got dtype {labels.dtype}")


def _guess_num_classes(needed: int) -> int:
    """Without names, the smallest standard class count that fits the labels (10, 100, else as needed)."""
    return next((n for n in (10, 100) if needed <= n), needed)


def load_images(paths: Sequence[str | os.PathLike], shape: tuple[int, int, int], labels: Sequence[int] | None,
                label_names: Sequence[str]) -> Dataset:
    """Image files (any format and mode PIL reads), converted to `shape` = (H, W, C) by resizing."""
    from PIL import Image, UnidentifiedImageError

    h, w, c = shape
    arrays = []
    for path in paths:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)  # a huge image: refused, not a warning
                image = Image.open(path)
            with image:
                image = image.convert("L" if c == 1 else "RGB").resize((w, h), Image.Resampling.BICUBIC)
                arrays.append(np.asarray(image, np.uint8).reshape(h, w, c))
        except FileNotFoundError:
            raise UsageError(f"--image {path}: no such file") from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
            raise UsageError(f"--image {path}: too large to decode safely ({str(error).split('.')[0]})") from None
        except (UnidentifiedImageError, OSError, ValueError) as error:
            raise UsageError(f"--image {path}: not a readable image ({error})") from None
    if labels is None:
        labels = [-1] * len(arrays)
    for label in labels:
        if not -1 <= label < len(label_names):
            raise UsageError(f"--label {label}: must lie in 0..{len(label_names) - 1}")
    return Dataset(np.stack(arrays), np.asarray(labels, np.int64), tuple(label_names), ", ".join(map(str, paths)))


def load_tfds(name: str, split: str, indices: Sequence[int], data_dir: str | None = None) -> Dataset:
    """The requested examples of a tensorflow-datasets dataset, read by random access (`tfds.data_source`).

    Preparing CIFAR or MNIST the first time downloads the archive and needs TensorFlow (the `tfds` extra).
    Without network that fails: we check first and say so in one line instead of retrying for minutes.
    """
    if name not in TFDS_DATASETS:
        raise UsageError(f"--dataset {name}: unknown dataset (choose from {', '.join(TFDS_DATASETS)}, or use --data)")
    try:
        import tensorflow_datasets as tfds
        from absl import logging as absl_logging
    except ImportError:
        raise UsageError(f"tensorflow-datasets is not installed: pip install 'dlg_jax[tfds]', or {OFFLINE_HINT}") from None
    absl_logging.set_verbosity(absl_logging.ERROR)  # tfds's warnings would break our one-line errors
    try:
        try:  # already prepared (or mocked by tfds.testing.mock_data): no network needed
            source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
        except (NotImplementedError, AssertionError, FileNotFoundError, KeyError):
            if not _reachable(TFDS_DATASETS[name]["host"]):
                raise UsageError(f"cannot download {name} with tensorflow-datasets (no network?): {OFFLINE_HINT}") from None
            source = tfds.data_source(name, split=split, data_dir=data_dir)
    except ImportError as error:
        raise UsageError(f"preparing {name} needs TensorFlow ({error}): pip install 'dlg_jax[tfds]', or {OFFLINE_HINT}") from None
    except ValueError as error:
        raise UsageError(f"--split {split}: {error}".splitlines()[0]) from None
    except OSError as error:
        raise UsageError(f"cannot download {name} with tensorflow-datasets ({type(error).__name__}): {OFFLINE_HINT}") from None
    builder = tfds.builder(name, data_dir=data_dir)
    where = f"tfds {name}[{split}]"
    for i in indices:
        if not 0 <= i < len(source):
            raise UsageError(f"index {i} is out of range: {where} has {len(source)} images (0..{len(source) - 1})")
    examples = [source[int(i)] for i in indices]
    images = as_nhwc(np.stack([np.asarray(e["image"]) for e in examples]), where)
    labels = np.asarray([int(e["label"]) for e in examples], np.int64)
    names = tuple(builder.info.features["label"].names)
    return Dataset(images, labels, names, where)


def _reachable(host: str, timeout: float = 5.0) -> bool:
    """Whether tfds could download from `host`; never, with DLG_JAX_OFFLINE=1 set."""
    if os.environ.get("DLG_JAX_OFFLINE", "") not in ("", "0"):
        return False
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False
