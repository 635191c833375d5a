"""The digits loader and the MNIST IDX reader, on small IDX files the tests write."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest

from batchnorm.apps.data import (
    MNIST_FILES,
    Dataset,
    load_dataset,
    load_digits,
    load_mnist,
    read_idx,
)


def idx_bytes(a: np.ndarray) -> bytes:
    a = np.asarray(a, dtype=np.uint8)
    header = struct.pack(">I", 0x0800 | a.ndim) + struct.pack(f">{a.ndim}I", *a.shape)
    return header + a.tobytes()


def write_mnist(d, n_train=5, n_test=3, gz=False, seed=0):
    rng = np.random.default_rng(seed)
    arrays = {
        "train_images": rng.integers(0, 256, (n_train, 28, 28)),
        "train_labels": rng.integers(0, 10, n_train),
        "test_images": rng.integers(0, 256, (n_test, 28, 28)),
        "test_labels": rng.integers(0, 10, n_test),
    }
    for key, a in arrays.items():
        raw = idx_bytes(a)
        name = MNIST_FILES[key] + (".gz" if gz else "")
        (d / name).write_bytes(gzip.compress(raw) if gz else raw)
    return arrays


def test_digits_split_is_fixed_and_disjoint():
    a, b = load_digits(), load_digits()
    assert a.x_train.shape == (1437, 1, 8, 8) and a.x_test.shape == (360, 1, 8, 8)
    np.testing.assert_array_equal(a.x_train, b.x_train)
    np.testing.assert_array_equal(a.y_test, b.y_test)
    assert a.x_train.dtype == np.float64 and a.y_train.dtype == np.int64
    assert a.x_train.min() == 0.0 and a.x_train.max() == 1.0
    assert set(np.unique(a.y_test)) == set(range(10))
    # No test image is also a training image (up to the few exact duplicates in the data set).
    train = {r.tobytes() for r in a.x_train}
    assert sum(r.tobytes() in train for r in a.x_test) <= 5
    c = load_digits(seed=1)
    assert not np.array_equal(a.y_test, c.y_test)


def test_dataset_flat_and_subset():
    d = load_digits().flat()
    assert d.x_train.shape == (1437, 64) and d.image_shape == (64,)
    s = d.subset(100, seed=0)
    assert s.x_train.shape == (100, 64) and s.x_test is d.x_test
    np.testing.assert_array_equal(s.x_train, d.subset(100, seed=0).x_train)
    assert d.subset(None) is d


@pytest.mark.parametrize("gz", [False, True])
def test_read_mnist_files(tmp_path, gz):
    arrays = write_mnist(tmp_path, gz=gz)
    data = load_mnist(tmp_path, "fashion-mnist")
    assert isinstance(data, Dataset) and data.name == "fashion-mnist"
    assert data.x_train.shape == (5, 1, 28, 28) and data.x_test.shape == (3, 1, 28, 28)
    np.testing.assert_allclose(data.x_train[:, 0], arrays["train_images"] / 255.0)
    np.testing.assert_array_equal(data.y_test, arrays["test_labels"])
    assert 0.0 <= data.x_train.min() and data.x_train.max() <= 1.0


def test_gzip_is_recognised_by_content(tmp_path):
    a = np.arange(6, dtype=np.uint8)
    path = tmp_path / "labels-without-suffix"
    path.write_bytes(gzip.compress(idx_bytes(a)))
    np.testing.assert_array_equal(read_idx(path, 0x801), a)


def test_missing_files_are_listed(tmp_path):
    write_mnist(tmp_path)
    (tmp_path / MNIST_FILES["test_labels"]).unlink()
    (tmp_path / MNIST_FILES["train_images"]).unlink()
    with pytest.raises(FileNotFoundError) as err:
        load_mnist(tmp_path)
    msg = str(err.value)
    for base in (MNIST_FILES["test_labels"], MNIST_FILES["train_images"]):
        assert base in msg and base + ".gz" in msg
    assert MNIST_FILES["train_labels"] + " or" not in msg
    assert str(tmp_path) in msg


def test_mnist_needs_a_data_dir():
    with pytest.raises(FileNotFoundError, match="--data-dir"):
        load_dataset("mnist")
    with pytest.raises(ValueError, match="expected a data set"):
        load_dataset("cifar")


@pytest.mark.parametrize("gz", [False, True])
def test_truncated_file_names_the_file(tmp_path, gz):
    write_mnist(tmp_path)
    path = tmp_path / MNIST_FILES["train_images"]
    raw = path.read_bytes()[:-100]
    if gz:
        path.unlink()
        path = tmp_path / (MNIST_FILES["train_images"] + ".gz")
        path.write_bytes(gzip.compress(raw))
    else:
        path.write_bytes(raw)
    with pytest.raises(ValueError, match="truncated") as err:
        load_mnist(tmp_path)
    assert str(path) in str(err.value)


def test_truncated_gzip_stream_names_the_file(tmp_path):
    path = tmp_path / "x.gz"
    path.write_bytes(gzip.compress(idx_bytes(np.zeros((3, 4, 4))))[:-12])
    with pytest.raises(ValueError, match="gzip") as err:
        read_idx(path)
    assert str(path) in str(err.value)


def test_truncated_header(tmp_path):
    path = tmp_path / "short"
    path.write_bytes(struct.pack(">I", 0x803) + b"\x00\x00\x00\x05")
    with pytest.raises(ValueError, match="truncated IDX header") as err:
        read_idx(path)
    assert str(path) in str(err.value)
    path.write_bytes(b"\x00\x00")
    with pytest.raises(ValueError, match="truncated"):
        read_idx(path)


def test_extra_bytes(tmp_path):
    path = tmp_path / "long"
    path.write_bytes(idx_bytes(np.zeros(4)) + b"\x00")
    with pytest.raises(ValueError, match="extra bytes"):
        read_idx(path)


def test_wrong_magic_names_the_file(tmp_path):
    write_mnist(tmp_path)
    # Labels where images belong: a valid IDX file with the wrong magic number.
    img = tmp_path / MNIST_FILES["test_images"]
    img.write_bytes((tmp_path / MNIST_FILES["test_labels"]).read_bytes())
    with pytest.raises(ValueError, match="wrong magic number 0x00000801") as err:
        load_mnist(tmp_path)
    assert str(img) in str(err.value)
    html = tmp_path / "page"
    html.write_bytes(b"<!DOCTYPE html><html></html>")
    with pytest.raises(ValueError, match="not an IDX file") as err:
        read_idx(html)
    assert str(html) in str(err.value)


def test_image_label_count_mismatch(tmp_path):
    write_mnist(tmp_path)
    (tmp_path / MNIST_FILES["train_labels"]).write_bytes(idx_bytes(np.zeros(4)))
    with pytest.raises(ValueError, match="5 images but .* 4 labels"):
        load_mnist(tmp_path)


def test_labels_out_of_range(tmp_path):
    write_mnist(tmp_path)
    (tmp_path / MNIST_FILES["test_labels"]).write_bytes(idx_bytes(np.array([1, 12, 3])))
    with pytest.raises(ValueError, match="labels 0..9"):
        load_mnist(tmp_path)
