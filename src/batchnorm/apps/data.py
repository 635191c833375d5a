"""Data for the demo: scikit-learn's bundled digits (no download) and an MNIST IDX reader.

Every loader returns a :class:`Dataset` of float64 images of shape (N, 1, H, W) with pixels in
[0, 1] and int64 labels.
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "DATASETS",
    "MNIST_FILES",
    "Dataset",
    "load_dataset",
    "load_digits",
    "load_mnist",
    "read_idx",
]

DATASETS = ("digits", "mnist", "fashion-mnist")

# MNIST and Fashion-MNIST ship the same four file names.
MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}

_IDX_IMAGES = 0x00000803  # unsigned bytes, 3 dims
_IDX_LABELS = 0x00000801  # unsigned bytes, 1 dim


@dataclass(frozen=True)
class Dataset:
    """A train/test split of labelled images.

    Attributes
    ----------
    name : str
    x_train : ndarray of shape (N_train, C, H, W), float64 in [0, 1]
    y_train : ndarray of shape (N_train,), int64
    x_test : ndarray of shape (N_test, C, H, W), float64 in [0, 1]
    y_test : ndarray of shape (N_test,), int64
    num_classes : int
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int = 10

    @property
    def image_shape(self) -> tuple[int, ...]:
        """Shape of one image, (C, H, W)."""
        return tuple(self.x_train.shape[1:])

    def flat(self) -> Dataset:
        """The same data with each image flattened to a vector: (N, C*H*W)."""
        return Dataset(
            self.name,
            self.x_train.reshape(len(self.x_train), -1),
            self.y_train,
            self.x_test.reshape(len(self.x_test), -1),
            self.y_test,
            self.num_classes,
        )

    def subset(self, n_train: int | None = None, seed: int = 0) -> Dataset:
        """The first `n_train` examples of a fixed shuffle of the training set (all if None)."""
        if n_train is None or n_train >= len(self.x_train):
            return self
        if n_train < 1:
            raise ValueError(f"expected a positive training-set size, got {n_train}")
        idx = np.sort(np.random.default_rng(seed).permutation(len(self.x_train))[:n_train])
        return Dataset(self.name, self.x_train[idx], self.y_train[idx], self.x_test,
                       self.y_test, self.num_classes)

    def __repr__(self) -> str:
        return (
            f"Dataset({self.name!r}, train={self.x_train.shape}, test={self.x_test.shape}, "
            f"classes={self.num_classes})"
        )


def load_digits(test_size: int = 360, seed: int = 0) -> Dataset:
    """scikit-learn's bundled 8x8 handwritten digits (1,797 images), split at random.

    Parameters
    ----------
    test_size : int, default 360
        Images held out for testing (20%); the other 1,437 train.
    seed : int, default 0
        Seed of the split; fixed so that every run sees the same split.

    Returns
    -------
    Dataset
        Images of shape (N, 1, 8, 8), the 0..16 grey levels scaled to [0, 1].
    """
    try:
        from sklearn.datasets import load_digits as _sk_load_digits
    except ImportError as err:  # pragma: no cover - scikit-learn is in the demo extra
        raise ImportError(
            "the digits data set needs scikit-learn: pip install 'batchnorm[demo]'"
        ) from err
    bunch = _sk_load_digits()
    x = (bunch.images / 16.0).astype(np.float64)[:, None, :, :]
    y = bunch.target.astype(np.int64)
    if not 0 < test_size < len(x):
        raise ValueError(f"expected 0 < test_size < {len(x)}, got {test_size}")
    perm = np.random.default_rng(seed).permutation(len(x))
    test, train = np.sort(perm[:test_size]), np.sort(perm[test_size:])
    return Dataset("digits", x[train], y[train], x[test], y[test], 10)


def read_idx(path: str | os.PathLike, expected_magic: int | None = None) -> np.ndarray:
    """Read an IDX file of unsigned bytes (the MNIST format), plain or gzip-compressed.

    Parameters
    ----------
    path : path-like
        Gzip is recognised by its first two bytes, whatever the file is called.
    expected_magic : int, optional
        ``0x00000803`` for images, ``0x00000801`` for labels; another magic number is an error.

    Returns
    -------
    array : ndarray of uint8
        Shape given by the file's header: (N, rows, cols) for images, (N,) for labels.

    Raises
    ------
    ValueError
        Naming the file, for a bad magic number, a truncated header or body, extra bytes, or a
        broken gzip stream.
    """
    path = Path(path)
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (EOFError, OSError, zlib.error) as err:
            raise ValueError(f"{path}: broken or truncated gzip data ({err})") from err
    if len(raw) < 4:
        raise ValueError(f"{path}: truncated IDX file: {len(raw)} bytes, no complete header")
    (magic,) = struct.unpack(">I", raw[:4])
    if expected_magic is not None and magic != expected_magic:
        raise ValueError(
            f"{path}: wrong magic number 0x{magic:08x}, expected 0x{expected_magic:08x} "
            "(is this the right file, and not an HTML error page or a different format?)"
        )
    if magic >> 16 != 0 or (magic >> 8) & 0xFF != 0x08:
        raise ValueError(
            f"{path}: not an IDX file of unsigned bytes (magic number 0x{magic:08x}, "
            "expected 0x000008NN)"
        )
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header: {len(raw)} bytes for {ndim} dims")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    expected = int(np.prod(dims, dtype=np.int64))
    got = len(raw) - header
    if got != expected:
        what = "truncated" if got < expected else "has extra bytes"
        raise ValueError(
            f"{path}: {what}: header says {'x'.join(map(str, dims))} = {expected} bytes of "
            f"data, the file holds {got}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _find(data_dir: Path, base: str) -> Path | None:
    for name in (base, base + ".gz"):
        if (data_dir / name).is_file():
            return data_dir / name
    return None


def load_mnist(data_dir: str | os.PathLike, name: str = "mnist") -> Dataset:
    """MNIST or Fashion-MNIST from the four IDX files in `data_dir`.

    Parameters
    ----------
    data_dir : path-like
        Directory holding ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
        ``t10k-images-idx3-ubyte`` and ``t10k-labels-idx1-ubyte``, each plain or with ``.gz``.
    name : {"mnist", "fashion-mnist"}
        Only names the result: both data sets use the same file names.

    Returns
    -------
    Dataset
        Images of shape (N, 1, 28, 28), pixels scaled to [0, 1]; 60,000 train, 10,000 test for
        the real files.

    Raises
    ------
    FileNotFoundError
        Listing every file name looked for, when any of the four is missing.
    ValueError
        Naming the file, when a file is malformed or images and labels do not match.
    """
    data_dir = Path(data_dir)
    found = {key: _find(data_dir, base) for key, base in MNIST_FILES.items()}
    missing = [MNIST_FILES[k] for k, p in found.items() if p is None]
    if missing:
        looked = ", ".join(f"{b} or {b}.gz" for b in missing)
        raise FileNotFoundError(
            f"{name}: missing file(s) in {data_dir}: looked for {looked}. Download the four "
            f"IDX files of {name} into that directory (gzip or not)."
        )
    arrays = {}
    for key, path in found.items():
        magic = _IDX_IMAGES if key.endswith("images") else _IDX_LABELS
        arrays[key] = read_idx(path, magic)
    for part in ("train", "test"):
        images, labels = arrays[f"{part}_images"], arrays[f"{part}_labels"]
        if len(images) != len(labels):
            raise ValueError(
                f"{found[part + '_images']} has {len(images)} images but "
                f"{found[part + '_labels']} has {len(labels)} labels"
            )
        if labels.size and labels.max() > 9:
            raise ValueError(
                f"{found[part + '_labels']}: expected labels 0..9, found {labels.max()}"
            )

    def images(a: np.ndarray) -> np.ndarray:
        return (a.astype(np.float64) / 255.0)[:, None, :, :]

    return Dataset(
        name,
        images(arrays["train_images"]),
        arrays["train_labels"].astype(np.int64),
        images(arrays["test_images"]),
        arrays["test_labels"].astype(np.int64),
        10,
    )


def load_dataset(
    name: str = "digits", data_dir: str | os.PathLike | None = None
) -> Dataset:
    """Load a data set by name.

    Parameters
    ----------
    name : {"digits", "mnist", "fashion-mnist"}
    data_dir : path-like, optional
        Required for MNIST and Fashion-MNIST (see :func:`load_mnist`).
    """
    if name == "digits":
        return load_digits()
    if name in ("mnist", "fashion-mnist"):
        if data_dir is None:
            files = ", ".join(MNIST_FILES.values())
            raise FileNotFoundError(
                f"{name} needs --data-dir, a directory with the IDX files {files} "
                "(each plain or .gz)"
            )
        return load_mnist(data_dir, name)
    raise ValueError(f"expected a data set in {DATASETS}, got {name!r}")
