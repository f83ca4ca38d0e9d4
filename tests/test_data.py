import numpy as np
import pytest
from PIL import Image

from dlg_jax import data
from dlg_jax.errors import UsageError


def test_npz_source_reads_shared_cifar100(cifar100, tmp_path):
    from tests.conftest import CIFAR100

    ds = data.load_npz(CIFAR100)
    assert ds.images.shape == (50, 32, 32, 3) and ds.images.dtype == np.uint8
    assert ds.labels[25] == 84 and ds.label_names[84] == "table" and ds.num_classes == 100


def test_npz_nhw_grayscale_and_missing_names(tmp_path):
    path = tmp_path / "gray.npz"
    np.savez(path, images=np.zeros((3, 28, 28), np.uint8), labels=np.array([0, 9, 3]))
    ds = data.load_npz(path)
    assert ds.images.shape == (3, 28, 28, 1) and ds.num_classes == 10


@pytest.mark.parametrize("contents, message", [
    (dict(labels=np.zeros(2, np.int64)), "missing key(s) images"),
    (dict(images=np.zeros((2, 8, 8, 3), np.uint8)), "missing key(s) labels"),
    (dict(images=np.zeros((2, 8, 8, 3), np.float32), labels=np.zeros(2)), "must be uint8"),
    (dict(images=np.zeros((2, 8, 8, 3), np.uint8), labels=np.zeros(3)), "2 images but 3 labels"),
])
def test_npz_bad_contents_are_usage_errors(tmp_path, contents, message):
    path = tmp_path / "bad.npz"
    np.savez(path, **contents)
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)")):
        data.load_npz(path)


def test_npz_missing_or_corrupt_file(tmp_path):
    with pytest.raises(UsageError, match="no such file"):
        data.load_npz(tmp_path / "nope.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(UsageError, match="not a readable npz"):
        data.load_npz(tmp_path / "junk.npz")


def test_image_files_any_size_and_mode_are_converted(tmp_path):
    rgba = tmp_path / "a.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 70, 4), np.uint8), "RGBA").save(rgba)
    gray = tmp_path / "b.jpg"
    Image.fromarray(np.full((10, 10), 200, np.uint8), "L").save(gray)
    ds = data.load_images([rgba, gray], (32, 32, 3), [5, 7], [str(c) for c in range(10)])
    assert ds.images.shape == (2, 32, 32, 3) and ds.images.dtype == np.uint8
    assert abs(int(ds.images[1].mean()) - 200) <= 2  # grey replicated to RGB
    mono = data.load_images([rgba], (28, 28, 1), None, [str(c) for c in range(10)])
    assert mono.images.shape == (1, 28, 28, 1) and mono.labels[0] == -1


def test_image_errors(tmp_path):
    with pytest.raises(UsageError, match="no such file"):
        data.load_images([tmp_path / "missing.png"], (32, 32, 3), None, ["a"])
    (tmp_path / "text.png").write_text("hello")
    with pytest.raises(UsageError, match="not a readable image"):
        data.load_images([tmp_path / "text.png"], (32, 32, 3), None, ["a"])


def test_index_range_check():
    ds = data.Dataset(np.zeros((4, 8, 8, 3), np.uint8), np.zeros(4, np.int64), ("a",), "x.npz")
    ds.check_indices([0, 3])
    with pytest.raises(UsageError, match="index 4 is out of range: x.npz has 4 images"):
        ds.check_indices([4])


def test_tfds_path_with_mock_data():
    tfds = pytest.importorskip("tensorflow_datasets")
    pytest.importorskip("tensorflow", reason="tfds mock data and CIFAR preparation need TensorFlow ([tfds] extra)")
    with tfds.testing.mock_data(num_examples=6):
        ds = data.load_tfds("cifar100", "train", [1, 5])
        assert ds.images.shape == (2, 32, 32, 3) and ds.images.dtype == np.uint8
        assert ds.num_classes == 100 and ds.labels.dtype == np.int64
        with pytest.raises(UsageError, match="index 6 is out of range"):
            data.load_tfds("cifar100", "train", [6])
        assert data.load_tfds("mnist", "test", [0]).images.shape == (1, 28, 28, 1)


def test_tfds_offline_is_one_clear_line(tmp_path, monkeypatch):
    pytest.importorskip("tensorflow_datasets")
    monkeypatch.setattr(data, "_reachable", lambda host, timeout=5.0: False)  # offline, even where there is network
    with pytest.raises(UsageError) as info:
        data.load_tfds("cifar10", "train", [0], data_dir=str(tmp_path))
    message = str(info.value)
    assert "\n" not in message and "--data" in message and "--image" in message


def test_unknown_dataset():
    with pytest.raises(UsageError, match="unknown dataset"):
        data.load_tfds("imagenet", "train", [0])
