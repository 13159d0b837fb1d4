"""Image classification data in the formats it is distributed in: CIFAR-10's python
pickles, MNIST / Fashion-MNIST's IDX files (gzipped or not), and scikit-learn's bundled
8x8 digits (embedded: no file needed).

Items are ``(image FloatTensor (C, H, W), label int)``, normalised per channel with the
mean and standard deviation of the *training* split (the test split uses the same
numbers); datasets expose ``num_classes``, ``image_size`` (H = W), ``channels``,
``mean``, ``std`` and ``class_names``. Pixels are kept as uint8 and normalised when an
item is read, so CIFAR-10's 60,000 images take 180 MB, not 720.

**CIFAR-10** (``cifar-10-python.tar.gz`` unpacked): the folder ``cifar-10-batches-py``
with ``data_batch_1`` ... ``data_batch_5`` (training, 10,000 images each), ``test_batch``
and optionally ``batches.meta`` (class names). Each batch is a pickled dict with
``b"data"`` (uint8 array (N, 3072): 1024 red, then green, then blue values, row-major
32x32) and ``b"labels"`` (N ints in 0..9). Unpickling runs code named by the file, so
these files are read with a restricted unpickler that only rebuilds numpy arrays and
plain containers (it allows numpy's array-reconstruction functions ``_reconstruct`` and
``_frombuffer``, ``numpy.ndarray``,
``numpy.dtype`` and ``_codecs.encode``, which Python 3 pickles of bytes use, and refuses
every other global): a tampered file raises :class:`DataFormatError` instead of running
anything.

**MNIST / Fashion-MNIST**: ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``, each optionally ``.gz`` (gzip is
recognised by its magic bytes). IDX: two zero bytes, a type code (0x08 = uint8), the
number of dimensions, then each dimension as a big-endian int32, then the values,
big-endian. The magic, the sizes and the agreement of images and labels are checked.

**digits**: ``sklearn.datasets.load_digits()`` (1,797 8x8 grey images with values 0..16,
10 classes), split into train and test by a stratified, seeded split.
"""

from __future__ import annotations

import io
import math
import pickle
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from levyattn.data._common import (
    DataFormatError,
    PathLike,
    check_float,
    check_int,
    find_dataset_root,
    find_file,
    read_bytes,
    require_dir,
)
from levyattn.io import open_bytes, read_at_most

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
MNIST_CLASSES = tuple(str(i) for i in range(10))
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip


class ImageDataset(torch.utils.data.Dataset):
    """Images with labels, normalised when read.

    images: (N, C, H, W) uint8 or float tensor; ``scale`` maps it to [0, 1] (255 for
    bytes, 16 for digits); ``mean`` / ``std``: per-channel statistics of the [0, 1]
    values, applied as ``(x / scale - mean) / std``. ``augment``: random crop (padding
    ``augment_pad``, zero in normalised units) and horizontal flip, using torch's RNG
    (seed it for repeatable epochs); for training sets only.

    Item: ``(FloatTensor (C, H, W), label int)``.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor | Sequence[int],
        *,
        num_classes: int,
        scale: float,
        mean: Sequence[float],
        std: Sequence[float],
        class_names: Sequence[str] | None = None,
        augment: bool = False,
        augment_pad: int = 4,
    ) -> None:
        if images.ndim != 4:
            raise ValueError(f"images must be (N, C, H, W), got shape {tuple(images.shape)}")
        labels = torch.as_tensor(labels, dtype=torch.long)
        if labels.shape != (images.shape[0],):
            raise ValueError(f"labels must be ({images.shape[0]},), got {tuple(labels.shape)}")
        self.images = images
        self.labels = labels
        self.num_classes = check_int("num_classes", num_classes, 2)
        if labels.numel() and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(
                f"labels must be in 0..{self.num_classes - 1}, found {labels.min().item()}..{labels.max().item()}"
            )
        self.channels = int(images.shape[1])
        if images.shape[2] != images.shape[3]:
            raise ValueError(f"images must be square, got {images.shape[2]}x{images.shape[3]}")
        self.image_size = int(images.shape[2])
        self.scale = float(scale)
        if len(mean) != self.channels or len(std) != self.channels:
            raise ValueError(f"mean and std need {self.channels} values, got {len(mean)} and {len(std)}")
        if any(s <= 0 for s in std):
            raise ValueError(f"std must be positive, got {list(std)}")
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self._mean = torch.tensor(self.mean).view(-1, 1, 1)
        self._std = torch.tensor(self.std).view(-1, 1, 1)
        self.class_names = list(class_names) if class_names is not None else [str(i) for i in range(num_classes)]
        self.augment = bool(augment)
        self.augment_pad = check_int("augment_pad", augment_pad, 0)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def draws_random_numbers(self) -> bool:
        """Whether an item draws from torch's generator (read by the trainer)."""
        return self.augment

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x = (self.images[i].float() / self.scale - self._mean) / self._std
        if self.augment:
            x = _random_crop_flip(x, self.augment_pad)
        return x, int(self.labels[i])


def _random_crop_flip(x: torch.Tensor, pad: int) -> torch.Tensor:
    if pad > 0:
        h, w = x.shape[-2:]
        padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
        top, left = (int(v) for v in torch.randint(0, 2 * pad + 1, (2,)))
        x = padded[:, top : top + h, left : left + w]
    if bool(torch.rand(()) < 0.5):
        x = x.flip(-1)
    return x.contiguous()


def channel_stats(images: torch.Tensor, scale: float) -> tuple[list[float], list[float]]:
    """Per-channel mean and standard deviation of ``images / scale`` (images (N, C, H, W))."""
    x = images.double() / scale
    mean = x.mean(dim=(0, 2, 3))
    std = x.std(dim=(0, 2, 3), unbiased=False).clamp_min(1e-6)
    return mean.tolist(), std.tolist()


# -- CIFAR-10 -----------------------------------------------------------------------------------

_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"),  # protocol-5 pickles rebuild arrays from a buffer
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),  # Python 3 protocol-2 pickles spell bytes as _codecs.encode(str, "latin1")
}


class _RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that rebuilds numpy arrays and plain containers, and nothing else.

    ``find_class`` is where a pickle names the callables it will run; allowing only
    numpy's array reconstruction (and ``_codecs.encode``) means a malicious file cannot
    reach ``os.system`` or any other function.
    """

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed (only numpy arrays may be unpickled)")


def safe_unpickle(path: PathLike, what: str = "pickle file") -> Any:
    """Unpickle ``path`` with the restricted unpickler (bytes strings kept as bytes, as in
    the Python 2 pickles of CIFAR-10)."""
    data = read_bytes(path, what)
    try:
        return _RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()
    except pickle.UnpicklingError as err:
        raise DataFormatError(f"{what} {path} cannot be read safely: {err}") from err
    except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as err:
        raise DataFormatError(f"{what} {path} is not a valid pickle: {type(err).__name__}: {err}") from err


def _get(d: dict, key: str) -> Any:
    for k in (key.encode(), key):
        if k in d:
            return d[k]
    return None


def read_cifar_batch(path: PathLike, num_classes: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR batch: ``(images uint8 (N, 3, 32, 32), labels int64 (N,))``."""
    what = "CIFAR batch"
    d = safe_unpickle(path, what)
    if not isinstance(d, dict):
        raise DataFormatError(f"{what} {path} holds a {type(d).__name__}, expected a dict with b'data' and b'labels'")
    data, labels = _get(d, "data"), _get(d, "labels")
    if labels is None:
        labels = _get(d, "fine_labels")
    if data is None or labels is None:
        raise DataFormatError(f"{what} {path} lacks b'data' or b'labels' (keys: {sorted(map(str, d))})")
    data = np.asarray(data)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise DataFormatError(
            f"{what} {path}: b'data' must be uint8 of shape (N, 3072), got {data.dtype} {tuple(data.shape)}"
        )
    labels = np.asarray(labels)
    if labels.size and labels.dtype.kind not in "iu":  # a float label would be cut to an integer
        raise DataFormatError(f"{what} {path}: labels must be integers, got {labels.dtype}")
    labels = labels.astype(np.int64)
    if labels.shape != (data.shape[0],):
        raise DataFormatError(f"{what} {path}: {data.shape[0]} images but {labels.size} labels")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataFormatError(
            f"{what} {path}: labels must be in 0..{num_classes - 1}, found {labels.min()}..{labels.max()}"
        )
    return data.reshape(-1, 3, 32, 32), labels


def find_cifar10(data_dir: PathLike) -> Path:
    """The ``cifar-10-batches-py`` folder: ``data_dir`` itself or its child of that name."""
    return find_dataset_root(
        data_dir, "cifar-10-batches-py", ("test_batch", "data_batch_1"), "CIFAR-10 data directory",
        "data_batch_1..5 and test_batch not found (unpack cifar-10-python.tar.gz)",
    )  # fmt: skip


def load_cifar10(data_dir: PathLike, *, augment: bool = False) -> tuple[ImageDataset, ImageDataset]:
    """CIFAR-10 train (50,000) and test (10,000) sets from its python-pickle batches.

    Images (3, 32, 32) normalised with the training split's per-channel statistics.
    ``augment=True`` gives the training set random crops (pad 4) and flips.
    """
    root = find_cifar10(data_dir)
    names = [f"data_batch_{i}" for i in range(1, 6)]
    for name in [*names, "test_batch"]:
        if not (root / name).is_file():
            raise FileNotFoundError(f"CIFAR-10 batch file not found: {root / name}")
    train = [read_cifar_batch(root / n) for n in names]
    x_train = torch.from_numpy(np.concatenate([b[0] for b in train]))
    y_train = torch.from_numpy(np.concatenate([b[1] for b in train]))
    x_test, y_test = (torch.from_numpy(a) for a in read_cifar_batch(root / "test_batch"))
    class_names = list(CIFAR10_CLASSES)
    meta = root / "batches.meta"
    if meta.is_file():
        m = safe_unpickle(meta, "CIFAR meta file")
        names_meta = _get(m, "label_names") if isinstance(m, dict) else None
        if not isinstance(names_meta, list) or len(names_meta) != 10:
            raise DataFormatError(f"CIFAR meta file {meta}: b'label_names' must be a list of 10 names")
        class_names = [n.decode() if isinstance(n, bytes) else str(n) for n in names_meta]
    mean, std = channel_stats(x_train, 255.0)
    kw = dict(num_classes=10, scale=255.0, mean=mean, std=std, class_names=class_names)
    return ImageDataset(x_train, y_train, augment=augment, **kw), ImageDataset(x_test, y_test, **kw)


# -- IDX (MNIST, Fashion-MNIST) -----------------------------------------------------------------

_IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: PathLike) -> np.ndarray:
    """An IDX file (gzipped or not) as a numpy array in native byte order.

    Checks the magic (0, 0, type, ndim), the type code and that the payload holds
    exactly prod(dims) values; errors name the file and what is wrong. The payload is
    streamed and reading stops one byte past the size the header declares, so a small
    gzip file that expands to far more data than its header says (a "zip bomb", or a
    corrupt header) is refused without ever being expanded in memory.
    """
    what = "IDX file"
    with open_bytes(path, what) as fh:
        magic = read_at_most(fh, 4)
        if len(magic) < 4:
            raise DataFormatError(f"{what} {path} is too short ({len(magic)} bytes) to hold the 4-byte magic number")
        zero1, zero2, code, ndim = magic
        if zero1 != 0 or zero2 != 0:
            raise DataFormatError(f"{what} {path}: bad magic number 0x{magic.hex()} (must start with two zero bytes)")
        if code not in _IDX_TYPES:
            raise DataFormatError(f"{what} {path}: unknown data type code 0x{code:02x} (valid: 08, 09, 0b, 0c, 0d, 0e)")
        if ndim == 0:
            raise DataFormatError(f"{what} {path}: zero dimensions")
        header = 4 + 4 * ndim
        raw_dims = read_at_most(fh, 4 * ndim)
        if len(raw_dims) < 4 * ndim:
            raise DataFormatError(
                f"{what} {path}: truncated header ({4 + len(raw_dims)} bytes, {ndim} dimensions need {header})"
            )
        dims = struct.unpack(f">{ndim}I", raw_dims)
        dtype = np.dtype(_IDX_TYPES[code])
        expected = math.prod(dims) * dtype.itemsize  # Python ints: 4 dimensions of 2^16 overflow int64
        payload = read_at_most(fh, expected + 1)
    if len(payload) != expected:
        found = f"more than {expected}" if len(payload) > expected else str(len(payload))
        raise DataFormatError(f"{what} {path}: dimensions {dims} need {expected} bytes of data, the file has {found}")
    return np.frombuffer(payload, dtype=dtype).reshape(dims).astype(dtype.newbyteorder("="))


_MNIST_FILES = {
    "train_images": ("train-images-idx3-ubyte", "train-images.idx3-ubyte"),
    "train_labels": ("train-labels-idx1-ubyte", "train-labels.idx1-ubyte"),
    "test_images": ("t10k-images-idx3-ubyte", "t10k-images.idx3-ubyte"),
    "test_labels": ("t10k-labels-idx1-ubyte", "t10k-labels.idx1-ubyte"),
}


def _mnist_dir(root: Path) -> Path:
    """``root`` or the torchvision layout below it (``raw/``, ``MNIST/raw/``, ``FashionMNIST/raw/``)."""
    for d in (root, root / "raw", root / "MNIST" / "raw", root / "FashionMNIST" / "raw"):
        if any((d / n).is_file() or (d / (n + ".gz")).is_file() for n in _MNIST_FILES["train_images"]):
            return d
    return root


def _read_idx_pair(images_path: Path, labels_path: Path, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    x, y = read_idx(images_path), read_idx(labels_path)
    if x.ndim != 3 or x.dtype != np.uint8:
        raise DataFormatError(f"IDX file {images_path}: images must be uint8 (N, H, W), got {x.dtype} {x.shape}")
    if y.ndim != 1 or y.dtype.kind not in "iu":  # a float label would be cut to an integer
        raise DataFormatError(f"IDX file {labels_path}: labels must be 1-D integers, got {y.dtype} {y.shape}")
    if x.shape[0] != y.shape[0]:
        raise DataFormatError(f"{images_path} holds {x.shape[0]} images but {labels_path} holds {y.shape[0]} labels")
    if y.size and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise DataFormatError(
            f"IDX file {labels_path}: labels must be in 0..{num_classes - 1}, found {y.min()}..{y.max()}"
        )
    return x, y.astype(np.int64)


def load_mnist(data_dir: PathLike, *, kind: str = "mnist") -> tuple[ImageDataset, ImageDataset]:
    """MNIST or Fashion-MNIST (``kind`` "mnist" / "fashion_mnist"; same file names) train
    (60,000) and test (10,000) sets from the IDX files in ``data_dir`` (also found in the
    torchvision layout ``raw/``). Images (1, 28, 28), normalised with the training mean/std.
    """
    if kind not in ("mnist", "fashion_mnist"):
        raise ValueError(f"kind must be 'mnist' or 'fashion_mnist', got {kind!r}")
    root = _mnist_dir(require_dir(data_dir, f"{kind} data directory"))
    what = "Fashion-MNIST file" if kind == "fashion_mnist" else "MNIST file"
    paths = {k: find_file(root, names, f"{what} {k.replace('_', ' ')}") for k, names in _MNIST_FILES.items()}
    x_tr, y_tr = _read_idx_pair(paths["train_images"], paths["train_labels"], 10)
    x_te, y_te = _read_idx_pair(paths["test_images"], paths["test_labels"], 10)
    if x_tr.shape[1:] != x_te.shape[1:]:
        raise DataFormatError(f"training images are {x_tr.shape[1:]} but test images {x_te.shape[1:]} ({root})")
    x_train = torch.from_numpy(x_tr.copy()).unsqueeze(1)
    x_test = torch.from_numpy(x_te.copy()).unsqueeze(1)
    mean, std = channel_stats(x_train, 255.0)
    names = FASHION_MNIST_CLASSES if kind == "fashion_mnist" else MNIST_CLASSES
    kw = dict(num_classes=10, scale=255.0, mean=mean, std=std, class_names=names)
    return ImageDataset(x_train, torch.from_numpy(y_tr), **kw), ImageDataset(x_test, torch.from_numpy(y_te), **kw)


def load_fashion_mnist(data_dir: PathLike) -> tuple[ImageDataset, ImageDataset]:
    """:func:`load_mnist` with ``kind="fashion_mnist"``."""
    return load_mnist(data_dir, kind="fashion_mnist")


# -- scikit-learn digits (embedded) -------------------------------------------------------------


def load_digits(*, seed: int = 0, test_fraction: float = 0.2) -> tuple[ImageDataset, ImageDataset]:
    """scikit-learn's bundled digits: 1,797 images (1, 8, 8), 10 classes, no download.

    A stratified split (every class in the same proportion in both parts) fixed by
    ``seed``: ``test_fraction`` of the images (0.2: 360) are the test set. Pixel values
    0..16 are scaled to [0, 1] and normalised with the training split's mean and std.
    """
    from sklearn.datasets import load_digits as _sk_digits
    from sklearn.model_selection import train_test_split

    test_fraction = check_float("test_fraction", test_fraction, 0.0, 1.0, lo_open=True, hi_open=True)
    d = _sk_digits()
    x = torch.as_tensor(d.images, dtype=torch.float32).unsqueeze(1)
    y = torch.as_tensor(d.target, dtype=torch.long)
    idx = np.arange(len(y))
    tr, te = train_test_split(idx, test_size=test_fraction, random_state=int(seed), stratify=d.target)
    tr, te = np.sort(tr), np.sort(te)
    x_train, x_test = x[torch.from_numpy(tr)], x[torch.from_numpy(te)]
    mean, std = channel_stats(x_train, 16.0)
    kw = dict(num_classes=10, scale=16.0, mean=mean, std=std, class_names=MNIST_CLASSES)
    return ImageDataset(x_train, y[torch.from_numpy(tr)], **kw), ImageDataset(x_test, y[torch.from_numpy(te)], **kw)


def collate_images(samples: Sequence[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images (B, C, H, W) float, labels (B,) long)``."""
    if len(samples) == 0:
        raise ValueError("cannot collate an empty batch")
    return torch.stack([s[0] for s in samples]), torch.as_tensor([int(s[1]) for s in samples], dtype=torch.long)


__all__ = [
    "CIFAR10_CLASSES",
    "FASHION_MNIST_CLASSES",
    "ImageDataset",
    "MNIST_CLASSES",
    "channel_stats",
    "collate_images",
    "load_cifar10",
    "load_digits",
    "load_fashion_mnist",
    "load_mnist",
    "read_cifar_batch",
    "read_idx",
    "safe_unpickle",
]
