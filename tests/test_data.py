"""Loaders read tiny files written here in each standard format; bad files name the path and layout."""

import gzip
import pickle

import numpy as np
import pytest
from theorax.experiments import data


def write_idx(path, array):
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_idx_roundtrip(tmp_path):
    rng = np.random.default_rng(0)
    train, test = rng.integers(0, 256, (7, 28, 28)), rng.integers(0, 256, (3, 28, 28))
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", train)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.arange(7) % 10)
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", test)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.array([1, 2, 3]))
    ds = data.load_image_dataset("fashion_mnist", str(tmp_path))
    assert ds.train_images.shape == (7, 28, 28, 1) and ds.train_images.dtype == np.uint8
    np.testing.assert_array_equal(ds.train_images[..., 0], train)
    np.testing.assert_array_equal(ds.test_labels, [1, 2, 3])


def test_idx_errors(tmp_path):
    with pytest.raises(data.DataError, match="train-images-idx3-ubyte.gz"):
        data.load_idx_dataset(str(tmp_path))
    (tmp_path / "bad.gz").write_bytes(gzip.compress(b"\x00\x00\x0d\x01" + b"\x00" * 8))
    with pytest.raises(data.DataError, match="magic"):
        data.read_idx(str(tmp_path / "bad.gz"))
    write_idx(tmp_path / "short.gz", np.zeros(10))
    raw = gzip.decompress((tmp_path / "short.gz").read_bytes())[:-3]
    (tmp_path / "short.gz").write_bytes(gzip.compress(raw))
    with pytest.raises(data.DataError, match="truncated"):
        data.read_idx(str(tmp_path / "short.gz"))


def cifar_batch(n, seed, label_key=b"labels"):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 3, 32, 32)).astype(np.uint8)
    return images, {b"data": images.reshape(n, -1), label_key: list(rng.integers(0, 10, n))}


def test_cifar10_layout_and_channel_order(tmp_path):
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    first = None
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        images, batch = cifar_batch(2, len(name))
        first = images if first is None else first
        with open(root / name, "wb") as f:
            pickle.dump(batch, f)
    ds = data.load_cifar10(str(tmp_path))
    assert ds.train_images.shape == (10, 32, 32, 3) and ds.num_classes == 10
    # Channel planes R, G, B become the last axis: pixel (0, 1) of image 0 is data[0, [1, 1025, 2049]].
    np.testing.assert_array_equal(ds.train_images[0, 0, 1], first[0, :, 0, 1])


def test_cifar100_fine_labels_and_errors(tmp_path):
    root = tmp_path / "cifar-100-python"
    root.mkdir()
    for split in ("train", "test"):
        _, batch = cifar_batch(3, 0, b"fine_labels")
        with open(root / split, "wb") as f:
            pickle.dump(batch, f)
    ds = data.load_image_dataset("cifar100", str(tmp_path))
    assert ds.num_classes == 100 and ds.test_images.shape == (3, 32, 32, 3)
    (root / "test").write_bytes(b"garbage")
    with pytest.raises(data.DataError, match="cifar-100-python"):
        data.load_cifar100(str(tmp_path))
    with pytest.raises(data.DataError, match="data_batch_1"):
        data.load_cifar10(str(tmp_path))


def test_uci_layout(tmp_path):
    root = tmp_path / "yacht" / "data"
    root.mkdir(parents=True)
    table = np.arange(30, dtype=float).reshape(10, 3)
    np.savetxt(root / "data.txt", table)
    np.savetxt(root / "index_features.txt", [0, 1], fmt="%d")
    np.savetxt(root / "index_target.txt", [2], fmt="%d")
    np.savetxt(root / "index_train_0.txt", [0, 2, 4, 6, 8], fmt="%d")
    np.savetxt(root / "index_test_0.txt", [1, 3], fmt="%d")
    split = data.load_uci(str(tmp_path), "yacht", 0)
    np.testing.assert_array_equal(split.x_train, table[[0, 2, 4, 6, 8]][:, :2])
    np.testing.assert_array_equal(split.y_test, table[[1, 3], 2])
    with pytest.raises(data.DataError, match="index_train_3.txt"):
        data.load_uci(str(tmp_path), "yacht", 3)


def test_arrays_layout(tmp_path):
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("test", 2)):
        np.save(
            tmp_path / f"{split}_images.npy", rng.integers(0, 256, (n, 4, 4, 3)).astype(np.uint8)
        )
        np.save(tmp_path / f"{split}_labels.npy", np.arange(n) % 4)
    ds = data.load_image_dataset("arrays", str(tmp_path))
    assert ds.num_classes == 4 and ds.image_shape == (4, 4, 3)


def test_digits_and_unknown_names():
    ds = data.load_digits()
    assert ds.train_images.shape[1:] == (8, 8, 1) and ds.train_images.max() == 255
    assert len(ds.train_labels) + len(ds.test_labels) == 1797
    with pytest.raises(data.DataError, match="choose from"):
        data.load_image_dataset("imagenet")
    with pytest.raises(data.DataError, match="data.dir"):
        data.load_image_dataset("mnist")


def test_epoch_batches_are_deterministic_and_split_over_processes():
    images = np.arange(40)[:, None, None, None].astype(np.uint8)
    labels = np.arange(40, dtype=np.int32)
    one = data.EpochBatches(images, labels, 8, seed=3)
    halves = [
        data.EpochBatches(images, labels, 8, seed=3, process_index=p, process_count=2)
        for p in range(2)
    ]
    seen = []
    for step in range(10):  # two epochs of five batches
        x, y = one.batch(step)
        np.testing.assert_array_equal(np.concatenate([h.batch(step)[1] for h in halves]), y)
        seen.append(y)
    assert sorted(np.concatenate(seen[:5])) == list(range(40))  # each epoch is a permutation
    assert not np.array_equal(seen[0], seen[5])  # reshuffled per epoch
    again = data.EpochBatches(images, labels, 8, seed=3)
    np.testing.assert_array_equal(again.batch(7)[1], seen[7])  # random access = resumable
    with pytest.raises(data.DataError, match="exceeds"):
        data.EpochBatches(images, labels, 64, seed=0)
