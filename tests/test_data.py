"""Tests for riftlab.data: real on-disk formats (written into tmp_path), splits, synthetic sets, batches.

Every fixture file is written in the format the real datasets ship in:

* CIFAR-10 / CIFAR-100: Python-2 pickles (byte-string keys and raw data, as the published archives
  hold them), ``data`` uint8 (N, 3072) laid out as 1024 red, 1024 green, 1024 blue values, each a
  32x32 image in row-major order;
* Tiny-ImageNet: the cs231n tree (wnids.txt, words.txt, train/<wnid>/images/*.JPEG, a flat
  val/images folder labelled only by val/val_annotations.txt);
* Fashion-MNIST: gzipped big-endian idx files.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import os
import pickle
import struct
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import riftlab.data as data
from riftlab.data import (Batches, DatasetNotFoundError, ImageSet, augment_batch, dataset_info, download_dataset,
                          list_datasets, load_dataset, make_synthetic, read_idx)


# ----------------------------------------------------------------------------------------------
# Fixture writers


class _Py2Pickler(pickle._Pickler):
    """Pickles ``bytes`` as Python-2 ``str`` (SHORT_BINSTRING / BINSTRING), as the CIFAR archives were written.

    Such pickles only load in Python 3 with ``encoding="latin1"`` (or "bytes"); a plain
    ``pickle.load`` fails with UnicodeDecodeError on the raw image bytes.
    """

    dispatch = pickle._Pickler.dispatch.copy()

    def _save_str8(self, obj: bytes) -> None:
        n = len(obj)
        if n < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([n]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", n) + obj)
        self.memoize(obj)

    dispatch[bytes] = _save_str8


def _write_py2_pickle(path: Path, obj: dict) -> None:
    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump(obj)
    # the published files name numpy.core (numpy 1.x); numpy 2 still resolves it
    raw = buf.getvalue().replace(b"cnumpy._core.multiarray\n_reconstruct\n", b"cnumpy.core.multiarray\n_reconstruct\n")
    path.write_bytes(raw)


def _pattern(ids: np.ndarray) -> np.ndarray:
    """Expected (N, 3, 32, 32) pixels of the patterned CIFAR images: value depends on id, channel, row, col."""
    i = ids[:, None, None, None]
    ch = np.arange(3)[None, :, None, None]
    r = np.arange(32)[None, None, :, None]
    c = np.arange(32)[None, None, None, :]
    return ((i + 7 * ch + 3 * r + 5 * c) % 256).astype(np.uint8)


def _cifar_rows(ids: np.ndarray) -> np.ndarray:
    """The same images in CIFAR's on-disk layout, built element by element from the published description."""
    rows = np.empty((len(ids), 3072), dtype=np.uint8)
    for ch in range(3):
        for r in range(32):
            for c in range(32):
                rows[:, 1024 * ch + 32 * r + c] = (ids + 7 * ch + 3 * r + 5 * c) % 256
    return rows


CIFAR_PER_BATCH = 20
CIFAR_N_TRAIN = 5 * CIFAR_PER_BATCH  # ids 0..99, in file order data_batch_1 .. data_batch_5
CIFAR_N_TEST = 12  # test images 0, 1, 2 are pure red, green and blue; the rest are patterned


def _cifar10_label(i):
    return (3 * i + 1) % 10


def _cifar_test_rows() -> tuple[np.ndarray, list[int]]:
    ids = np.arange(200, 200 + CIFAR_N_TEST)
    rows = _cifar_rows(ids)
    rows[:3] = 0
    for k in range(3):  # pure red / green / blue
        rows[k, 1024 * k : 1024 * (k + 1)] = 255
    return rows, [int(_cifar10_label(i)) for i in ids]


def write_cifar10(root: Path) -> Path:
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True)
    for b in range(5):
        ids = np.arange(b * CIFAR_PER_BATCH, (b + 1) * CIFAR_PER_BATCH)
        _write_py2_pickle(base / f"data_batch_{b + 1}", {
            b"batch_label": f"training batch {b + 1} of 5".encode(),
            b"labels": [int(_cifar10_label(i)) for i in ids],
            b"data": _cifar_rows(ids),
            b"filenames": [f"img_{i}.png".encode() for i in ids],
        })
    rows, labels = _cifar_test_rows()
    _write_py2_pickle(base / "test_batch", {b"batch_label": b"testing batch 1 of 1", b"labels": labels, b"data": rows,
                                            b"filenames": [f"test_{i}.png".encode() for i in range(len(rows))]})
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    _write_py2_pickle(base / "batches.meta", {b"num_cases_per_batch": CIFAR_PER_BATCH, b"label_names": names, b"num_vis": 3072})
    return root


def _fine(i):
    return (37 * i + 11) % 100


def _coarse(i):
    return (_fine(i) + 3) % 20  # deliberately unrelated to the fine label


def write_cifar100(root: Path, n_train: int = 30, n_test: int = 8) -> Path:
    base = root / "cifar-100-python"
    base.mkdir(parents=True)
    for split, ids in (("train", np.arange(n_train)), ("test", np.arange(100, 100 + n_test))):
        _write_py2_pickle(base / split, {
            b"filenames": [f"{split}_{i}.png".encode() for i in ids],
            b"batch_label": f"{split}ing batch 1 of 1".encode(),
            b"fine_labels": [int(_fine(i)) for i in ids],
            b"coarse_labels": [int(_coarse(i)) for i in ids],
            b"data": _cifar_rows(ids),
        })
    _write_py2_pickle(base / "meta", {b"fine_label_names": [f"fine{k}".encode() for k in range(100)],
                                      b"coarse_label_names": [f"coarse{k}".encode() for k in range(20)]})
    return root


TINY_WNIDS = ["n01443537", "n01629819", "n02124075"]
TINY_COLOURS = [(220, 30, 30), (30, 200, 40), (40, 40, 210)]  # one solid colour per class
TINY_TRAIN_PER_CLASS = 4
# classes of val_0 .. val_11: not grouped or sorted by class, and with >= 11 files, so that the
# lexicographic file order (val_0, val_1, val_10, val_11, val_2, ...) differs from the annotation order
TINY_VAL_CLASSES = [2, 0, 1, 0, 2, 1, 1, 2, 0, 2, 1, 0]


def _solid_jpeg(path: Path, colour) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (64, 64), colour).save(path, "JPEG", quality=95)


def write_tinyimagenet(root: Path, annotations: bool = True) -> Path:
    base = root / "tiny-imagenet-200"
    base.mkdir(parents=True)
    (base / "wnids.txt").write_text("".join(w + "\n" for w in TINY_WNIDS))
    (base / "words.txt").write_text("n00001740\tentity\n" + "n01443537\tgoldfish, Carassius auratus\n"
                                    "n01629819\tEuropean fire salamander, Salamandra salamandra\n"
                                    "n02124075\tEgyptian cat\n" + "n09999999\tnot in wnids\n")
    for w, colour in zip(TINY_WNIDS, TINY_COLOURS):
        lines = []
        for i in range(TINY_TRAIN_PER_CLASS):
            _solid_jpeg(base / "train" / w / "images" / f"{w}_{i}.JPEG", colour)
            lines.append(f"{w}_{i}.JPEG\t0\t0\t63\t63\n")
        (base / "train" / w / f"{w}_boxes.txt").write_text("".join(lines))
    lines = []
    for i, k in enumerate(TINY_VAL_CLASSES):
        _solid_jpeg(base / "val" / "images" / f"val_{i}.JPEG", TINY_COLOURS[k])
        lines.append(f"val_{i}.JPEG\t{TINY_WNIDS[k]}\t{i}\t{2 * i}\t{40 + i}\t{50 + i}\n")
    if annotations:
        (base / "val" / "val_annotations.txt").write_text("".join(lines))
    (base / "test" / "images").mkdir(parents=True)  # the official test split is unlabelled
    _solid_jpeg(base / "test" / "images" / "test_0.JPEG", (0, 0, 0))
    return root


def _colour_class(images: torch.Tensor) -> torch.Tensor:
    """Index of the nearest class colour to each image's mean colour."""
    mean = images.double().mean(dim=(2, 3))  # (N, 3)
    colours = torch.tensor(TINY_COLOURS, dtype=torch.float64)
    return torch.cdist(mean, colours).argmin(dim=1)


def _idx_bytes(array: np.ndarray) -> bytes:
    magic = 0x00000800 | array.ndim  # 0x00000803 for images, 0x00000801 for labels
    return struct.pack(">I", magic) + struct.pack(">" + "I" * array.ndim, *array.shape) + array.astype(np.uint8).tobytes()


def _fashion_images(n: int, offset: int) -> np.ndarray:
    i = np.arange(offset, offset + n)[:, None, None]
    r = np.arange(28)[None, :, None]
    c = np.arange(28)[None, None, :]
    return ((i + 9 * r + 2 * c) % 256).astype(np.uint8)


def _fashion_labels(n: int, offset: int) -> np.ndarray:
    return ((np.arange(offset, offset + n) * 7) % 10).astype(np.uint8)


FASHION_N_TRAIN, FASHION_N_TEST = 12, 5


def write_fashion(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for prefix, n, offset in (("train", FASHION_N_TRAIN, 0), ("t10k", FASHION_N_TEST, 100)):
        with gzip.open(root / f"{prefix}-images-idx3-ubyte.gz", "wb") as fh:
            fh.write(_idx_bytes(_fashion_images(n, offset)))
        with gzip.open(root / f"{prefix}-labels-idx1-ubyte.gz", "wb") as fh:
            fh.write(_idx_bytes(_fashion_labels(n, offset)))
    return root


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture
def cifar10_root(tmp_path):
    return write_cifar10(tmp_path / "cifar")


# ----------------------------------------------------------------------------------------------
# Registry


def test_registry_lists_real_and_synthetic_sets():
    names = list_datasets()
    for name in ("cifar10", "cifar100", "tinyimagenet", "fashion-mnist", "synthetic-cifar10", "synthetic-cifar100",
                 "synthetic-tinyimagenet"):
        assert name in names
    assert names == sorted(names)
    assert (dataset_info("cifar100").num_classes, dataset_info("tinyimagenet").image_size) == (100, 64)
    synth = dataset_info("synthetic-tinyimagenet")
    assert (synth.synthetic, synth.num_classes, synth.image_size, synth.channels) == (True, 200, 64, 3)
    assert dataset_info("fashion-mnist").channels == 1


def test_unknown_dataset_raises_value_error_listing_valid_names():
    with pytest.raises(ValueError) as exc:
        load_dataset("cifar11")
    message = str(exc.value)
    assert "cifar11" in message
    for name in list_datasets():
        assert name in message


# ----------------------------------------------------------------------------------------------
# CIFAR


def test_cifar_fixture_is_a_python2_pickle(cifar10_root):
    """Guards the fixture itself: like the published batches, it needs encoding='latin1' to load."""
    path = cifar10_root / "cifar-10-batches-py" / "data_batch_1"
    with pytest.raises(UnicodeDecodeError):
        pickle.loads(path.read_bytes())
    entry = pickle.loads(path.read_bytes(), encoding="latin1")
    assert entry["data"].shape == (CIFAR_PER_BATCH, 3072) and entry["data"].dtype == np.uint8


def test_cifar10_layout_labels_and_file_order(cifar10_root):
    splits = load_dataset("cifar10", root=cifar10_root, val_size=0)
    assert splits.sizes() == {"train": CIFAR_N_TRAIN, "val": 0, "test": CIFAR_N_TEST}
    assert splits.info.name == "cifar10"
    train, test = splits.train, splits.test
    assert train.images.dtype == torch.uint8 and train.images.shape == (CIFAR_N_TRAIN, 3, 32, 32)
    assert train.labels.dtype == torch.int64
    # with no validation split the training set is data_batch_1 .. data_batch_5 in file order
    ids = np.arange(CIFAR_N_TRAIN)
    np.testing.assert_array_equal(train.images.numpy(), _pattern(ids))
    np.testing.assert_array_equal(train.labels.numpy(), _cifar10_label(ids))
    # the test batch: pure red, green, blue images land in channel 0, 1, 2
    for k in range(3):
        img = test.images[k]
        assert bool((img[k] == 255).all())
        assert int(img.sum()) == 255 * 32 * 32
    test_ids = np.arange(200, 200 + CIFAR_N_TEST)
    np.testing.assert_array_equal(test.images[3:].numpy(), _pattern(test_ids[3:]))
    np.testing.assert_array_equal(test.labels.numpy(), _cifar10_label(test_ids))


def test_cifar10_validation_split_keeps_images_and_labels_together(cifar10_root):
    splits = load_dataset("cifar10", root=cifar10_root, val_size=17)
    assert splits.sizes() == {"train": CIFAR_N_TRAIN - 17, "val": 17, "test": CIFAR_N_TEST}
    seen = []
    for part in (splits.train, splits.val):
        ids = part.images[:, 0, 0, 0].numpy().astype(np.int64)  # pixel (0, 0) of the red channel is the id
        np.testing.assert_array_equal(part.images.numpy(), _pattern(ids))
        np.testing.assert_array_equal(part.labels.numpy(), _cifar10_label(ids))
        seen += ids.tolist()
    assert sorted(seen) == list(range(CIFAR_N_TRAIN))


def test_cifar100_uses_fine_labels(tmp_path):
    root = write_cifar100(tmp_path / "c100")
    splits = load_dataset("cifar100", root=root, val_size=0)
    assert splits.info.num_classes == 100
    assert splits.sizes() == {"train": 30, "val": 0, "test": 8}
    np.testing.assert_array_equal(splits.train.labels.numpy(), _fine(np.arange(30)))
    np.testing.assert_array_equal(splits.test.labels.numpy(), _fine(np.arange(100, 108)))
    assert not np.array_equal(splits.train.labels.numpy(), _coarse(np.arange(30)))
    np.testing.assert_array_equal(splits.train.images.numpy(), _pattern(np.arange(30)))
    np.testing.assert_array_equal(splits.test.images.numpy(), _pattern(np.arange(100, 108)))


def test_missing_cifar_files_raise_dataset_not_found_with_path_and_command(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetNotFoundError) as exc:
        load_dataset("cifar10", root=empty)
    message = str(exc.value)
    assert str(empty) in message
    assert "riftlab download cifar10" in message
    assert "cifar-10-batches-py/data_batch_1" in message
    assert isinstance(exc.value, FileNotFoundError)


def test_one_missing_cifar_batch_is_named(cifar10_root):
    (cifar10_root / "cifar-10-batches-py" / "data_batch_4").unlink()
    with pytest.raises(DatasetNotFoundError, match="data_batch_4"):
        load_dataset("cifar10", root=cifar10_root, val_size=2)


def test_missing_fashion_and_tinyimagenet_files(tmp_path):
    with pytest.raises(DatasetNotFoundError) as exc:
        load_dataset("fashion-mnist", root=tmp_path)
    assert str(tmp_path) in str(exc.value) and "riftlab download fashion-mnist" in str(exc.value)
    assert "apt-get install dataset-fashion-mnist" in str(exc.value)
    with pytest.raises(DatasetNotFoundError, match="wnids.txt"):
        load_dataset("tinyimagenet", root=tmp_path)


# ----------------------------------------------------------------------------------------------
# Tiny-ImageNet


def test_tinyimagenet_labels_follow_colours_and_val_annotations(tmp_path):
    root = write_tinyimagenet(tmp_path / "tin")
    splits = load_dataset("tinyimagenet", root=root, val_size=2)
    n_train = TINY_TRAIN_PER_CLASS * len(TINY_WNIDS)
    assert splits.sizes() == {"train": n_train - 2, "val": 2, "test": len(TINY_VAL_CLASSES)}
    for part in (splits.train, splits.val, splits.test):
        assert part.images.dtype == torch.uint8 and part.images.shape[1:] == (3, 64, 64)
        assert torch.equal(part.labels, _colour_class(part.images))
    # the official val folder becomes the test split, in annotation order, labelled by it
    np.testing.assert_array_equal(splits.test.labels.numpy(), TINY_VAL_CLASSES)
    # every class is there in the held-in training data
    full = torch.cat([splits.train.labels, splits.val.labels])
    assert torch.bincount(full, minlength=3).tolist() == [TINY_TRAIN_PER_CLASS] * 3


def test_tinyimagenet_cache_is_written_read_and_invalidated(tmp_path):
    root = write_tinyimagenet(tmp_path / "tin")
    base = root / "tiny-imagenet-200"
    first = load_dataset("tinyimagenet", root=root, val_size=2)
    cache = base / "riftlab-cache-v2.npz"
    assert cache.is_file()
    assert not list(base.glob("*.tmp.npz"))
    # repaint every image black: a second load that still sees the colours must come from the cache
    for path in list((base / "train").rglob("*.JPEG")) + list((base / "val" / "images").glob("*.JPEG")):
        _solid_jpeg(path, (0, 0, 0))
    second = load_dataset("tinyimagenet", root=root, val_size=2)
    for name in ("train", "val", "test"):
        a, b = getattr(first, name), getattr(second, name)
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    with np.load(cache) as z:
        assert set(z.files) == {"train_x", "train_y", "val_x", "val_y"}
        assert torch.equal(torch.from_numpy(z["val_x"]), first.test.images)
    # annotations newer than the cache: the images are read again (and are black now)
    t = cache.stat().st_mtime + 10
    os.utime(base / "val" / "val_annotations.txt", (t, t))
    third = load_dataset("tinyimagenet", root=root, val_size=2)
    assert int(third.test.images.max()) < 10 and int(third.train.images.max()) < 10
    np.testing.assert_array_equal(third.test.labels.numpy(), TINY_VAL_CLASSES)


def test_tinyimagenet_without_val_annotations_raises(tmp_path):
    root = write_tinyimagenet(tmp_path / "tin", annotations=False)
    with pytest.raises(DatasetNotFoundError) as exc:
        load_dataset("tinyimagenet", root=root, val_size=2)
    assert "val_annotations.txt" in str(exc.value)
    assert str(root) in str(exc.value)


def test_tinyimagenet_annotation_with_unknown_wnid_raises(tmp_path):
    root = write_tinyimagenet(tmp_path / "tin")
    ann = root / "tiny-imagenet-200" / "val" / "val_annotations.txt"
    ann.write_text(ann.read_text() + "val_0.JPEG\tn09999999\t0\t0\t10\t10\n")
    with pytest.raises(ValueError, match="n09999999"):
        load_dataset("tinyimagenet", root=root, val_size=2)


def test_tinyimagenet_class_without_training_images_raises(tmp_path):
    root = write_tinyimagenet(tmp_path / "tin")
    for p in (root / "tiny-imagenet-200" / "train" / TINY_WNIDS[1] / "images").glob("*.JPEG"):
        p.unlink()
    with pytest.raises(DatasetNotFoundError, match=TINY_WNIDS[1]):
        load_dataset("tinyimagenet", root=root, val_size=2)


# ----------------------------------------------------------------------------------------------
# Fashion-MNIST / idx


def test_fashion_mnist_idx_files(tmp_path):
    root = write_fashion(tmp_path / "fm")
    with gzip.open(root / "train-images-idx3-ubyte.gz", "rb") as fh:
        assert fh.read(4) == b"\x00\x00\x08\x03"
    with gzip.open(root / "t10k-labels-idx1-ubyte.gz", "rb") as fh:
        assert fh.read(4) == b"\x00\x00\x08\x01"
    splits = load_dataset("fashion-mnist", root=root, val_size=0)
    assert splits.info.channels == 1
    assert splits.train.images.shape == (FASHION_N_TRAIN, 1, 28, 28) and splits.train.images.dtype == torch.uint8
    assert splits.test.images.shape == (FASHION_N_TEST, 1, 28, 28)
    np.testing.assert_array_equal(splits.train.images[:, 0].numpy(), _fashion_images(FASHION_N_TRAIN, 0))
    np.testing.assert_array_equal(splits.test.images[:, 0].numpy(), _fashion_images(FASHION_N_TEST, 100))
    np.testing.assert_array_equal(splits.train.labels.numpy(), _fashion_labels(FASHION_N_TRAIN, 0))
    np.testing.assert_array_equal(splits.test.labels.numpy(), _fashion_labels(FASHION_N_TEST, 100))
    assert splits.train.labels.dtype == torch.int64
    held = load_dataset("fashion-mnist", root=root, val_size=3)
    assert held.sizes() == {"train": FASHION_N_TRAIN - 3, "val": 3, "test": FASHION_N_TEST}


def test_read_idx_plain_and_gzipped(tmp_path):
    array = (np.arange(2 * 5 * 3) % 256).astype(np.uint8).reshape(2, 5, 3)
    (tmp_path / "a.idx").write_bytes(_idx_bytes(array))
    with gzip.open(tmp_path / "a.idx.gz", "wb") as fh:
        fh.write(_idx_bytes(array))
    for name in ("a.idx", "a.idx.gz"):
        got = read_idx(tmp_path / name)
        assert got.dtype == np.uint8 and got.shape == (2, 5, 3)
        np.testing.assert_array_equal(got, array)


def test_read_idx_rejects_truncated_and_foreign_files(tmp_path):
    raw = _idx_bytes(_fashion_images(3, 0))
    with gzip.open(tmp_path / "short-images-idx3-ubyte.gz", "wb") as fh:
        fh.write(raw[:-100])  # a valid gzip stream of a truncated idx file
    with pytest.raises(ValueError, match="truncated"):
        read_idx(tmp_path / "short-images-idx3-ubyte.gz")
    # a gzip file cut mid-stream
    gz = gzip.compress(raw)
    (tmp_path / "cut.gz").write_bytes(gz[: len(gz) // 2])
    with pytest.raises((EOFError, OSError, ValueError)):
        read_idx(tmp_path / "cut.gz")
    # an idx file of int32 values (type code 0x0C), not unsigned bytes
    (tmp_path / "int.idx").write_bytes(struct.pack(">I", 0x00000C01) + struct.pack(">I", 2) + b"\x00" * 8)
    with pytest.raises(ValueError, match="unsigned-byte"):
        read_idx(tmp_path / "int.idx")


def test_read_idx_rejects_file_truncated_inside_header(tmp_path):
    raw = _idx_bytes(_fashion_images(3, 0))
    (tmp_path / "head.idx").write_bytes(raw[:10])  # magic + 1.5 of the 3 dimensions
    with pytest.raises(ValueError, match="truncated"):
        read_idx(tmp_path / "head.idx")


DEBIAN_FASHION = Path(data.FASHION_DEBIAN_ROOT)
needs_debian_fashion = pytest.mark.skipif(not (DEBIAN_FASHION / "train-images-idx3-ubyte.gz").is_file(),
                                          reason="Debian package dataset-fashion-mnist not installed")


@needs_debian_fashion
def test_real_fashion_mnist_from_debian_package(tmp_path, monkeypatch):
    monkeypatch.setenv("RIFTLAB_DATA", str(tmp_path))  # no fashion-mnist there: falls back to the Debian folder
    splits = load_dataset("fashion-mnist")
    assert splits.sizes() == {"train": 55000, "val": 5000, "test": 10000}
    assert splits.info.num_classes == 10
    assert splits.train.images.shape == (55000, 1, 28, 28) and splits.train.images.dtype == torch.uint8
    assert torch.bincount(splits.test.labels, minlength=10).tolist() == [1000] * 10
    full = torch.cat([splits.train.labels, splits.val.labels])
    assert torch.bincount(full, minlength=10).tolist() == [6000] * 10


# ----------------------------------------------------------------------------------------------
# Download (file:// URLs stand in for the internet)


def _cifar10_archive(tmp_path: Path) -> Path:
    src = write_cifar10(tmp_path / "src")
    archive = tmp_path / "served" / "cifar-10-python.tar.gz"
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(src / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    return archive


def _serve(monkeypatch, name: str, url: str) -> None:
    monkeypatch.setitem(data._DATASETS, name, dataclasses.replace(data._DATASETS[name], download=url))


def test_download_extract_and_load_cifar10(tmp_path, monkeypatch):
    archive = _cifar10_archive(tmp_path)
    _serve(monkeypatch, "cifar10", archive.as_uri())
    monkeypatch.setitem(data._ARCHIVE_MD5, "cifar10", ("cifar-10-python.tar.gz", _md5(archive)))
    dest = tmp_path / "dest"
    splits = load_dataset("cifar10", root=dest, download=True, val_size=5)
    assert splits.sizes() == {"train": CIFAR_N_TRAIN - 5, "val": 5, "test": CIFAR_N_TEST}
    assert (dest / "cifar-10-python.tar.gz").is_file()
    assert (dest / "cifar-10-batches-py" / "batches.meta").is_file()
    assert not list(dest.rglob("*.part"))
    np.testing.assert_array_equal(splits.test.labels.numpy(), _cifar10_label(np.arange(200, 200 + CIFAR_N_TEST)))
    # the downloaded copy loads like the original
    reference = load_dataset("cifar10", root=tmp_path / "src", val_size=5)
    assert torch.equal(reference.train.images, splits.train.images)


def test_download_with_wrong_checksum_leaves_nothing(tmp_path, monkeypatch):
    archive = _cifar10_archive(tmp_path)
    _serve(monkeypatch, "cifar10", archive.as_uri())
    monkeypatch.setitem(data._ARCHIVE_MD5, "cifar10", ("cifar-10-python.tar.gz", "0" * 32))
    dest = tmp_path / "dest"
    with pytest.raises(IOError, match="checksum"):
        download_dataset("cifar10", dest)
    assert list(dest.iterdir()) == []  # no *.part, no archive, nothing extracted
    with pytest.raises(IOError, match="checksum"):
        load_dataset("cifar10", root=dest, download=True, val_size=2)
    assert list(dest.iterdir()) == []


def test_download_fashion_mnist_files(tmp_path, monkeypatch):
    served = write_fashion(tmp_path / "served")
    _serve(monkeypatch, "fashion-mnist", served.as_uri() + "/")
    for fname in data._FASHION_MD5:
        monkeypatch.setitem(data._FASHION_MD5, fname, _md5(served / fname))
    dest = tmp_path / "dest"
    assert download_dataset("fashion-mnist", dest) == dest
    assert sorted(p.name for p in dest.iterdir()) == sorted(data._FASHION_MD5)
    splits = load_dataset("fashion-mnist", root=dest, val_size=2)
    np.testing.assert_array_equal(splits.test.labels.numpy(), _fashion_labels(FASHION_N_TEST, 100))


def test_download_and_load_tinyimagenet_zip(tmp_path, monkeypatch):
    src = write_tinyimagenet(tmp_path / "src")
    archive = tmp_path / "tiny-imagenet-200.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted((src / "tiny-imagenet-200").rglob("*")):
            zf.write(path, path.relative_to(src).as_posix())
    _serve(monkeypatch, "tinyimagenet", archive.as_uri())
    monkeypatch.setitem(data._ARCHIVE_MD5, "tinyimagenet", ("tiny-imagenet-200.zip", _md5(archive)))
    splits = load_dataset("tinyimagenet", root=tmp_path / "dest", download=True, val_size=2)
    np.testing.assert_array_equal(splits.test.labels.numpy(), TINY_VAL_CLASSES)
    assert torch.equal(splits.test.labels, _colour_class(splits.test.images))


def test_download_of_synthetic_set_is_refused(tmp_path):
    with pytest.raises(ValueError, match="nothing to download"):
        download_dataset("synthetic-cifar10", tmp_path)


def test_download_flag_does_not_fetch_files_that_are_present(cifar10_root, tmp_path, monkeypatch):
    # the files are in place; the (unreachable) source must not be needed
    _serve(monkeypatch, "cifar10", (tmp_path / "unreachable" / "cifar-10-python.tar.gz").as_uri())
    splits = load_dataset("cifar10", root=cifar10_root, download=True, val_size=2)
    assert len(splits.train) + len(splits.val) == CIFAR_N_TRAIN


@needs_debian_fashion
def test_download_flag_with_debian_fashion_mnist(tmp_path, monkeypatch):
    monkeypatch.setenv("RIFTLAB_DATA", str(tmp_path))
    _serve(monkeypatch, "fashion-mnist", (tmp_path / "unreachable").as_uri() + "/")
    splits = load_dataset("fashion-mnist", download=True, val_size=5000, test_subset=10)
    assert len(splits.test) == 10


# ----------------------------------------------------------------------------------------------
# Splits and ImageSet


def _ids(images: torch.Tensor) -> set[int]:
    return set(images[:, 0, 0, 0].tolist())


def test_validation_split_is_disjoint_and_fixed_by_split_seed(cifar10_root):
    a = load_dataset("cifar10", root=cifar10_root, val_size=20, split_seed=0)
    b = load_dataset("cifar10", root=cifar10_root, val_size=20, split_seed=0)
    c = load_dataset("cifar10", root=cifar10_root, val_size=20, split_seed=1)
    assert not _ids(a.train.images) & _ids(a.val.images)
    assert _ids(a.train.images) | _ids(a.val.images) == set(range(CIFAR_N_TRAIN))
    assert torch.equal(a.val.images, b.val.images) and torch.equal(a.train.labels, b.train.labels)
    assert _ids(a.val.images) != _ids(c.val.images)
    assert torch.equal(a.test.images, c.test.images)  # the test split does not depend on the split seed


def test_subsets_have_requested_sizes_and_come_from_their_split(cifar10_root):
    full = load_dataset("cifar10", root=cifar10_root, val_size=20)
    sub = load_dataset("cifar10", root=cifar10_root, val_size=20, train_subset=30, val_subset=7, test_subset=5)
    assert sub.sizes() == {"train": 30, "val": 7, "test": 5}
    assert _ids(sub.train.images) <= _ids(full.train.images)
    assert _ids(sub.val.images) <= _ids(full.val.images)
    assert _ids(sub.test.images) <= _ids(full.test.images)
    again = load_dataset("cifar10", root=cifar10_root, val_size=20, train_subset=30, val_subset=7, test_subset=5)
    assert torch.equal(sub.train.images, again.train.images)
    # a subset larger than the split keeps it whole
    big = load_dataset("cifar10", root=cifar10_root, val_size=20, train_subset=10_000)
    assert len(big.train) == CIFAR_N_TRAIN - 20


@pytest.mark.parametrize("val_size", [-1, CIFAR_N_TRAIN, CIFAR_N_TRAIN + 5])
def test_val_size_out_of_range_raises(cifar10_root, val_size):
    with pytest.raises(ValueError, match="val_size"):
        load_dataset("cifar10", root=cifar10_root, val_size=val_size)


def test_imageset_validation_and_subset():
    images = torch.randint(0, 256, (6, 3, 4, 4), dtype=torch.uint8)
    s = ImageSet(images, torch.arange(6, dtype=torch.int32))
    assert s.labels.dtype == torch.int64 and len(s) == 6
    f = s.float()
    assert f.dtype == torch.float32 and torch.allclose(f * 255, images.float())
    with pytest.raises(ValueError, match="uint8"):
        ImageSet(images.float(), torch.arange(6))
    with pytest.raises(ValueError, match="uint8"):
        ImageSet(images[:, 0], torch.arange(6))  # 3-D
    with pytest.raises(ValueError, match="labels"):
        ImageSet(images, torch.arange(5))
    sub = s.subset(4, seed=3)
    assert len(sub) == 4 and sub.labels.tolist() == sorted(sub.labels.tolist())
    assert torch.equal(sub.images, images[sub.labels])
    assert s.subset(None) is s and s.subset(6) is s
    with pytest.raises(ValueError, match="positive"):
        s.subset(0)


# ----------------------------------------------------------------------------------------------
# Synthetic sets


@pytest.mark.parametrize("name, k, size, sizes", [
    ("synthetic-cifar10", 10, 32, (400, 100)),
    ("synthetic-cifar100", 100, 32, (2000, 50)),
    ("synthetic-tinyimagenet", 200, 64, (120, 40)),
])
def test_synthetic_sets_shapes_labels_and_content(name, k, size, sizes):
    splits = load_dataset(name, synthetic_sizes=sizes, val_size=20)
    assert splits.info.synthetic and splits.info.num_classes == k
    assert splits.sizes() == {"train": sizes[0] - 20, "val": 20, "test": sizes[1]}
    for part in (splits.train, splits.val, splits.test):
        assert part.images.dtype == torch.uint8 and part.images.shape[1:] == (3, size, size)
        assert int(part.labels.min()) >= 0 and int(part.labels.max()) < k
        flat = part.images.flatten(1).float()
        assert bool((flat.std(dim=1) > 1.0).all())  # no constant image
        assert len({bytes(x.numpy()) for x in part.images}) == len(part)  # all distinct
    if name != "synthetic-tinyimagenet":  # enough samples for every class to appear
        labels = torch.cat([splits.train.labels, splits.val.labels])
        assert bool((torch.bincount(labels, minlength=k) > 0).all())


def test_synthetic_sets_are_deterministic_in_seed():
    a = load_dataset("synthetic-cifar10", synthetic_sizes=(60, 20), val_size=10)
    b = load_dataset("synthetic-cifar10", synthetic_sizes=(60, 20), val_size=10)
    c = load_dataset("synthetic-cifar10", synthetic_sizes=(60, 20), val_size=10, split_seed=1)
    for name in ("train", "val", "test"):
        assert torch.equal(getattr(a, name).images, getattr(b, name).images)
        assert torch.equal(getattr(a, name).labels, getattr(b, name).labels)
        assert not torch.equal(getattr(a, name).images, getattr(c, name).images)
    tr1, te1 = make_synthetic("synthetic-cifar100", 30, 10, seed=4)
    tr2, te2 = make_synthetic(dataset_info("synthetic-cifar100"), 30, 10, seed=4)
    assert torch.equal(tr1.images, tr2.images) and torch.equal(te1.labels, te2.labels)
    assert not torch.equal(tr1.images[:10], te1.images)  # train and test are different draws


# ----------------------------------------------------------------------------------------------
# Batches and augmentation


def _indexed_set(n: int = 30, seed: int = 0) -> ImageSet:
    """Random uint8 images with label i for image i, so a batch element can be traced to its source."""
    g = torch.Generator().manual_seed(seed)
    return ImageSet(torch.randint(1, 256, (n, 3, 8, 8), dtype=torch.uint8, generator=g), torch.arange(n))


def _match(out: torch.Tensor, orig: torch.Tensor, padding: int):
    """(dy, dx, flipped) such that ``out`` is that crop of zero-padded ``orig`` (then flipped), or None."""
    _, h, w = orig.shape
    padded = F.pad(orig, (padding,) * 4)
    for dy in range(2 * padding + 1):
        for dx in range(2 * padding + 1):
            crop = padded[:, dy : dy + h, dx : dx + w]
            if torch.equal(out, crop):
                return dy, dx, False
            if torch.equal(out, crop.flip(-1)):
                return dy, dx, True
    return None


def _epoch(batches: Batches) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x.clone(), y.clone()) for x, y in batches]


def test_batches_yield_floats_and_cover_each_example_once():
    data_ = _indexed_set(30)
    batches = Batches(data_, batch_size=7, shuffle=True, seed=1)
    assert len(batches) == 5 and batches.num_examples == 30
    for _ in range(2):
        got = _epoch(batches)
        assert [len(y) for _, y in got] == [7, 7, 7, 7, 2]
        labels = torch.cat([y for _, y in got])
        assert sorted(labels.tolist()) == list(range(30))
        for x, y in got:
            assert x.dtype == torch.float32 and float(x.min()) >= 0 and float(x.max()) <= 1
            assert torch.equal(x * 255, data_.images[y].float())  # the images travel with their labels
    assert labels.tolist() != list(range(30))  # shuffled


def test_batches_without_shuffle_keep_order_and_drop_last():
    data_ = _indexed_set(30)
    plain = _epoch(Batches(data_, batch_size=8))
    assert torch.cat([y for _, y in plain]).tolist() == list(range(30))
    assert torch.equal(torch.cat([x for x, _ in plain]), data_.float())
    dropped = Batches(data_, batch_size=8, shuffle=True, drop_last=True)
    assert len(dropped) == 3
    got = _epoch(dropped)
    assert len(got) == 3 and all(len(y) == 8 for _, y in got)
    assert len(set(torch.cat([y for _, y in got]).tolist())) == 24
    assert len(Batches(data_, batch_size=30, drop_last=True)) == 1
    assert len(Batches(data_, batch_size=31, drop_last=True)) == 0
    assert len(Batches(data_, batch_size=31)) == 1


def test_batches_order_is_a_function_of_seed_and_epoch():
    data_ = _indexed_set(40)

    def order(b):
        return torch.cat([y for _, y in b]).tolist()

    b = Batches(data_, batch_size=16, shuffle=True, augment=True, crop_padding=2, seed=3)
    b.set_epoch(5)
    first = _epoch(b)
    assert b.epoch == 6
    b.set_epoch(5)
    again = _epoch(b)
    for (x1, y1), (x2, y2) in zip(first, again):
        assert torch.equal(y1, y2) and torch.equal(x1, x2)  # same order and same augmentation
    b.set_epoch(6)
    assert order(b) != [y for _, ys in first for y in ys.tolist()]
    # epoch e gives the same batches whether reached by iterating or by resuming with set_epoch
    fresh = Batches(data_, batch_size=16, shuffle=True, seed=3)
    e0, e1 = order(fresh), order(fresh)
    assert e0 != e1
    resumed = Batches(data_, batch_size=16, shuffle=True, seed=3)
    resumed.set_epoch(1)
    assert order(resumed) == e1
    assert order(Batches(data_, batch_size=16, shuffle=True, seed=4)) != e0


def test_batches_augmentation_crops_and_flips_each_image():
    data_ = _indexed_set(64)
    b = Batches(data_, batch_size=32, shuffle=True, augment=True, crop_padding=2, seed=0)
    found = []
    for x, y in b:
        assert x.shape[1:] == (3, 8, 8) and x.dtype == torch.float32
        for out, label in zip(x, y):
            m = _match(out, data_.images[label].float() / 255, 2)
            assert m is not None
            found.append(m)
    assert {f for _, _, f in found} == {True, False}
    assert len({(dy, dx) for dy, dx, _ in found}) > 5  # several crop offsets occur


def test_augment_batch_without_padding_only_flips():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(50, 3, 6, 6, generator=g)
    out = augment_batch(x, 0, torch.Generator().manual_seed(1))
    assert out.shape == x.shape and out.dtype == x.dtype
    flipped = [torch.equal(o, i.flip(-1)) for o, i in zip(out, x)]
    same = [torch.equal(o, i) for o, i in zip(out, x)]
    assert all(f or s for f, s in zip(flipped, same))
    assert any(flipped) and any(same)


def test_augment_batch_with_padding_is_a_crop_of_the_zero_padded_image():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(40, 3, 10, 12, generator=g) + 0.1  # no zeros inside the images
    out = augment_batch(x, 3, torch.Generator().manual_seed(2))
    assert out.shape == x.shape
    found = [_match(o, i, 3) for o, i in zip(out, x)]
    assert all(m is not None for m in found)
    assert any(m[:2] != (3, 3) for m in found)  # not always the centre crop
    # deterministic in the generator
    assert torch.equal(out, augment_batch(x, 3, torch.Generator().manual_seed(2)))
    assert not torch.equal(out, augment_batch(x, 3, torch.Generator().manual_seed(3)))


def test_batches_reject_empty_set_and_bad_batch_size():
    empty = ImageSet(torch.zeros(0, 3, 8, 8, dtype=torch.uint8), torch.zeros(0, dtype=torch.int64))
    with pytest.raises(ValueError, match="empty"):
        Batches(empty, batch_size=4)
    with pytest.raises(ValueError, match="batch_size"):
        Batches(_indexed_set(4), batch_size=0)


def test_tinyimagenet_classes_are_numbered_in_sorted_wnid_order(tmp_path):
    # wnids.txt as published is not sorted; torchvision's ImageFolder (the reference code) numbers
    # the train folders in sorted order, so a reference checkpoint's class k is the k-th sorted wnid.
    root = write_tinyimagenet(tmp_path / "tin")
    expected = load_dataset("tinyimagenet", root=root, val_size=2)
    shuffled = tmp_path / "shuffled"
    write_tinyimagenet(shuffled)
    (shuffled / "tiny-imagenet-200" / "wnids.txt").write_text("".join(w + "\n" for w in reversed(TINY_WNIDS)))
    got = load_dataset("tinyimagenet", root=shuffled, val_size=2)
    for name in ("train", "val", "test"):
        assert torch.equal(getattr(got, name).labels, getattr(expected, name).labels)
