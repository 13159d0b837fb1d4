"""CIFAR-10 pickles, IDX files (gz and raw) and the embedded digits, from tiny fixtures in
the real formats."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from levyattn.data import DataFormatError, collate_images, load_cifar10, load_digits, load_mnist, read_idx
from levyattn.data.images import ImageDataset, read_cifar_batch

# -- CIFAR-10 ---------------------------------------------------------------------------------


def write_cifar(root: Path, n_per_batch: int = 4, protocol: int = 2, seed: int = 0) -> Path:
    """cifar-10-batches-py with 5 training batches and a test batch of ``n_per_batch`` images."""
    rng = np.random.default_rng(seed)
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {
            b"batch_label": name.encode(),
            b"labels": [int(v) for v in rng.integers(0, 10, n_per_batch)],
            b"data": rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8),
            b"filenames": [f"img_{i}.png".encode() for i in range(n_per_batch)],
        }
        with open(d / name, "wb") as fh:
            pickle.dump(batch, fh, protocol=protocol)
    meta = {b"label_names": [n.encode() for n in "abcdefghij"], b"num_cases_per_batch": n_per_batch}
    with open(d / "batches.meta", "wb") as fh:
        pickle.dump(meta, fh, protocol=protocol)
    return root


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_cifar10_reads_real_layout(tmp_path, protocol):
    write_cifar(tmp_path, protocol=protocol)
    train, test = load_cifar10(tmp_path)
    assert len(train) == 20 and len(test) == 4
    assert (train.num_classes, train.image_size, train.channels) == (10, 32, 3)
    assert train.class_names == list("abcdefghij")
    # channel-major rows: value (c, h, w) is data[c*1024 + h*32 + w]
    with open(tmp_path / "cifar-10-batches-py" / "data_batch_2", "rb") as fh:
        raw = pickle.load(fh)
    row = raw[b"data"][1].astype(np.float64)
    x, y = train[4 + 1]
    assert y == raw[b"labels"][1]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    for c, h, w in [(0, 0, 0), (1, 5, 7), (2, 31, 30)]:
        want = (row[c * 1024 + h * 32 + w] / 255.0 - train.mean[c]) / train.std[c]
        assert float(x[c, h, w]) == pytest.approx(want, abs=1e-5)
    # normalised with the training statistics: mean 0, std 1 per channel over the training set
    xs = torch.stack([train[i][0] for i in range(len(train))])
    assert torch.allclose(xs.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5)
    assert torch.allclose(xs.std(dim=(0, 2, 3), unbiased=False), torch.ones(3), atol=1e-4)
    images, labels = collate_images([train[i] for i in range(3)])
    assert images.shape == (3, 3, 32, 32) and labels.dtype == torch.long


def test_cifar10_accepts_the_batches_folder_itself(tmp_path):
    write_cifar(tmp_path)
    train, _ = load_cifar10(tmp_path / "cifar-10-batches-py")
    assert len(train) == 20


class _Boom:
    """Unpickling this would create ``target``: the restricted unpickler must refuse."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return (Path.touch, (self.target,))


def test_malicious_pickle_cannot_run_code(tmp_path):
    write_cifar(tmp_path)
    sentinel = tmp_path / "pwned"
    bad = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    bad.write_bytes(pickle.dumps({b"data": _Boom(sentinel), b"labels": []}))
    with pytest.raises(DataFormatError, match=r"data_batch_3 cannot be read safely.*not allowed"):
        load_cifar10(tmp_path)
    assert not sentinel.exists()
    # the same file really would run code with the plain unpickler
    pickle.loads(bad.read_bytes())
    assert sentinel.exists()


def test_cifar10_bad_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="CIFAR-10 data directory not found"):
        load_cifar10(tmp_path / "nope")
    (tmp_path / "e").mkdir()
    with pytest.raises(FileNotFoundError, match="not the cifar-10-batches-py folder"):
        load_cifar10(tmp_path / "e")
    root = write_cifar(tmp_path / "a")
    d = root / "cifar-10-batches-py"
    (d / "data_batch_5").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_5"):
        load_cifar10(root)
    root = write_cifar(tmp_path / "b")
    d = root / "cifar-10-batches-py"
    (d / "test_batch").write_bytes(b"")
    with pytest.raises(DataFormatError, match="test_batch is not a valid pickle"):
        load_cifar10(root)
    (d / "test_batch").write_bytes(pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}))
    with pytest.raises(DataFormatError, match=r"test_batch: b'data' must be uint8 of shape \(N, 3072\)"):
        read_cifar_batch(d / "test_batch")
    (d / "test_batch").write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}))
    with pytest.raises(DataFormatError, match="2 images but 1 labels"):
        read_cifar_batch(d / "test_batch")
    (d / "test_batch").write_bytes(pickle.dumps({b"data": np.zeros((1, 3072), np.uint8), b"labels": [10]}))
    with pytest.raises(DataFormatError, match=r"labels must be in 0\.\.9"):
        read_cifar_batch(d / "test_batch")
    # a float label would be cut to an integer class
    (d / "test_batch").write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0.5, 3.7]}))
    with pytest.raises(DataFormatError, match="test_batch: labels must be integers, got float64"):
        read_cifar_batch(d / "test_batch")
    (d / "test_batch").write_bytes(pickle.dumps([1, 2]))
    with pytest.raises(DataFormatError, match="holds a list"):
        read_cifar_batch(d / "test_batch")


def test_augmentation_keeps_shape_and_draws_from_torch_rng(tmp_path):
    write_cifar(tmp_path)
    train, test = load_cifar10(tmp_path, augment=True)
    assert train.augment and not test.augment
    torch.manual_seed(0)
    a = train[0][0]
    torch.manual_seed(0)
    b = train[0][0]
    assert a.shape == (3, 32, 32) and torch.equal(a, b)
    assert torch.equal(test[0][0], test[0][0])


# -- IDX -----------------------------------------------------------------------------------------


def idx_bytes(a: np.ndarray) -> bytes:
    codes = {np.uint8: 0x08, np.int8: 0x09, np.int16: 0x0B, np.int32: 0x0C, np.float32: 0x0D, np.float64: 0x0E}
    code = codes[a.dtype.type]
    head = bytes([0, 0, code, a.ndim]) + struct.pack(f">{a.ndim}I", *a.shape)
    return head + a.astype(a.dtype.newbyteorder(">")).tobytes()


def write_mnist(root: Path, gz: bool, n_train: int = 6, n_test: int = 3, seed: int = 0, layout: str = "") -> Path:
    rng = np.random.default_rng(seed)
    d = root / layout if layout else root
    d.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train).astype(np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test).astype(np.uint8),
    }
    for name, a in arrays.items():
        data = idx_bytes(a)
        if gz:
            (d / (name + ".gz")).write_bytes(gzip.compress(data))
        else:
            (d / name).write_bytes(data)
    return root


@settings(max_examples=25, deadline=None)
@given(
    shape=st.lists(st.integers(0, 5), min_size=1, max_size=4),
    dtype=st.sampled_from([np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64]),
    gz=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_idx_round_trip(tmp_path_factory, shape, dtype, gz, seed):
    rng = np.random.default_rng(seed)
    a = (rng.standard_normal(shape) * 100).astype(dtype)
    data = idx_bytes(a)
    p = tmp_path_factory.mktemp("idx") / "f.idx"
    p.write_bytes(gzip.compress(data) if gz else data)
    b = read_idx(p)
    assert b.shape == a.shape and b.dtype == a.dtype
    assert np.array_equal(a, b)


@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize("kind", ["mnist", "fashion_mnist"])
def test_mnist_from_idx(tmp_path, gz, kind):
    write_mnist(tmp_path, gz)
    train, test = load_mnist(tmp_path, kind=kind)
    assert (len(train), len(test)) == (6, 3)
    assert (train.channels, train.image_size, train.num_classes) == (1, 28, 10)
    raw_images = read_idx(next(tmp_path.glob("train-images*")))
    raw_labels = read_idx(next(tmp_path.glob("train-labels*")))
    x, y = train[2]
    assert y == int(raw_labels[2])
    assert torch.allclose(x[0], (torch.from_numpy(raw_images[2]).float() / 255 - train.mean[0]) / train.std[0])
    assert (train.class_names[0] == "T-shirt/top") == (kind == "fashion_mnist")


def test_mnist_torchvision_layout(tmp_path):
    write_mnist(tmp_path, gz=True, layout="MNIST/raw")
    train, test = load_mnist(tmp_path)
    assert len(train) == 6


def test_idx_errors_name_file_and_problem(tmp_path):
    p = tmp_path / "x-idx1-ubyte"
    p.write_bytes(b"\x00\x00")
    with pytest.raises(DataFormatError, match="x-idx1-ubyte is too short"):
        read_idx(p)
    p.write_bytes(bytes([8, 0, 8, 1, 0, 0, 0, 1, 5]))
    with pytest.raises(DataFormatError, match="bad magic number 0x08000801"):
        read_idx(p)
    p.write_bytes(bytes([0, 0, 0x07, 1, 0, 0, 0, 1, 5]))
    with pytest.raises(DataFormatError, match="unknown data type code 0x07"):
        read_idx(p)
    p.write_bytes(bytes([0, 0, 8, 3, 0, 0, 0, 1]))
    with pytest.raises(DataFormatError, match="truncated header"):
        read_idx(p)
    p.write_bytes(bytes([0, 0, 8, 1, 0, 0, 0, 4, 1, 2, 3]))
    with pytest.raises(DataFormatError, match=r"need 4 bytes of data, the file has 3"):
        read_idx(p)
    # four dimensions of 2^16 hold 2^64 items: more than an int64 product can count
    p.write_bytes(bytes([0, 0, 8, 4]) + struct.pack(">4I", *[1 << 16] * 4) + b"\x00")
    with pytest.raises(DataFormatError, match=rf"need {2**64} bytes of data, the file has 1"):
        read_idx(p)
    p.write_bytes(b"\x1f\x8bnot really gzip")
    with pytest.raises(DataFormatError, match="not a valid gzip file"):
        read_idx(p)


def test_idx_payload_larger_than_its_header_is_refused_without_expanding_it(tmp_path):
    """A small gzip file whose payload expands far past the size the header declares (a zip
    bomb or a corrupt header) is refused after reading one byte too many, not after
    expanding all of it in memory."""
    import tracemalloc

    p = tmp_path / "bomb-idx1-ubyte.gz"
    zeros = bytes(1 << 20)
    with gzip.open(p, "wb") as fh:
        fh.write(bytes([0, 0, 8, 1, 0, 0, 0, 10]))
        for _ in range(48):  # 48 MiB of payload, about 50 kB on disk
            fh.write(zeros)
    assert p.stat().st_size < 1 << 20
    tracemalloc.start()
    try:
        with pytest.raises(DataFormatError, match=r"bomb-idx1-ubyte\.gz: .*need 10 bytes of data, the file has more"):
            read_idx(p)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, f"{peak / 2**20:.0f} MiB allocated"


def test_mnist_missing_or_inconsistent_files(tmp_path):
    write_mnist(tmp_path / "a", gz=False)
    (tmp_path / "a" / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(FileNotFoundError, match=r"t10k-labels-idx1-ubyte\[\.gz\]"):
        load_mnist(tmp_path / "a")
    write_mnist(tmp_path / "b", gz=False)
    (tmp_path / "b" / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(2, np.uint8)))
    with pytest.raises(DataFormatError, match="holds 3 images but .*t10k-labels-idx1-ubyte holds 2 labels"):
        load_mnist(tmp_path / "b")
    (tmp_path / "b" / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(np.full(3, 12, np.uint8)))
    with pytest.raises(DataFormatError, match=r"labels must be in 0\.\.9"):
        load_mnist(tmp_path / "b")
    (tmp_path / "b" / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(np.array([0.5, 1.0, 2.7], np.float32)))
    with pytest.raises(DataFormatError, match="t10k-labels-idx1-ubyte: labels must be 1-D integers, got float32"):
        load_mnist(tmp_path / "b")
    with pytest.raises(ValueError, match="kind"):
        load_mnist(tmp_path / "b", kind="emnist")


# -- digits ----------------------------------------------------------------------------------------


def test_digits_embedded_stratified_and_seeded():
    train, test = load_digits(seed=0)
    assert (len(train), len(test)) == (1437, 360)
    assert (train.channels, train.image_size, train.num_classes) == (1, 8, 10)
    counts_train = torch.bincount(train.labels, minlength=10).float()
    counts_test = torch.bincount(test.labels, minlength=10).float()
    # stratified: each class is ~20% test
    frac = counts_test / (counts_train + counts_test)
    assert ((frac - 0.2).abs() < 0.02).all()
    xs = torch.stack([train[i][0] for i in range(len(train))])
    assert abs(float(xs.mean())) < 1e-5 and abs(float(xs.std(unbiased=False)) - 1) < 1e-4
    again, _ = load_digits(seed=0)
    other, _ = load_digits(seed=1)
    assert torch.equal(again.labels, train.labels) and torch.equal(again[5][0], train[5][0])
    assert not torch.equal(other.labels, train.labels)
    with pytest.raises(ValueError, match="test_fraction"):
        load_digits(test_fraction=1.0)


def test_image_dataset_refuses_labels_outside_its_classes():
    images = torch.zeros(3, 1, 4, 4, dtype=torch.uint8)
    kw = dict(num_classes=10, scale=255.0, mean=[0.5], std=[0.25])
    with pytest.raises(ValueError, match=r"labels must be in 0\.\.9, found 0\.\.10"):
        ImageDataset(images, [0, 10, 3], **kw)
    with pytest.raises(ValueError, match=r"labels must be in 0\.\.9, found -1\.\.3"):
        ImageDataset(images, [0, -1, 3], **kw)
    assert ImageDataset(images, [0, 9, 3], **kw)[1][1] == 9
