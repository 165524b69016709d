"""Dataset loaders (host side) and a deterministic, resumable, process-sharded batch source.

Formats read (nothing is downloaded at run time):

* scikit-learn's bundled digits (`digits`, no files needed);
* MNIST / Fashion-MNIST IDX gz: `DIR/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz`;
* CIFAR-10 python version: `DIR/cifar-10-batches-py/{data_batch_1..5,test_batch}` (or DIR itself);
* CIFAR-100 python version: `DIR/cifar-100-python/{train,test}` (or DIR itself), fine labels;
* pre-resized image arrays (for ImageNet-21k and friends, e.g. downsampled to 64x64 offline):
  `DIR/{train,test}_{images,labels}.npy`, images uint8 (N, H, W, C), memory-mapped;
* UCI regression in the layout of the Bayesian deep learning benchmarks:
  `DIR/<name>/data/{data.txt,index_features.txt,index_target.txt,index_train_K.txt,index_test_K.txt}`.

Images come back as uint8 NHWC arrays; augmentation and normalisation happen on the device (see
`inference.scaled_mlp.augment`). A missing or malformed dataset raises `DataError` with the path and the expected layout.
"""

from __future__ import annotations

import dataclasses
import gzip
import os
import pickle

import numpy as np

IDX_LAYOUT = (
    "DIR/train-images-idx3-ubyte.gz, DIR/train-labels-idx1-ubyte.gz, "
    "DIR/t10k-images-idx3-ubyte.gz, DIR/t10k-labels-idx1-ubyte.gz"
)
CIFAR10_LAYOUT = (
    "DIR/cifar-10-batches-py/{data_batch_1..5, test_batch} (the CIFAR-10 python version)"
)
CIFAR100_LAYOUT = "DIR/cifar-100-python/{train, test} (the CIFAR-100 python version)"
UCI_LAYOUT = (
    "DIR/<name>/data/{data.txt, index_features.txt, index_target.txt, index_train_K.txt, "
    "index_test_K.txt} (the Bayesian deep learning benchmarks layout)"
)

# Per-channel statistics used by the official scaling_mlps code (data_stats.py), on the 0-1 scale.
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class DataError(ValueError):
    """A dataset is missing or malformed."""


@dataclasses.dataclass(frozen=True)
class ImageDataset:
    """A classification dataset held in host memory as uint8 NHWC arrays."""

    name: str
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    num_classes: int
    mean: tuple[float, ...]  # per channel, 0-1 scale
    std: tuple[float, ...]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train_images.shape[1:])

    def subset(self, n_train: int | None) -> ImageDataset:
        """The first `n_train` training examples (class-proportional subsets come from a shuffled
        dataset's prefix)."""
        if n_train is None or n_train >= len(self.train_labels):
            return self
        return dataclasses.replace(
            self, train_images=self.train_images[:n_train], train_labels=self.train_labels[:n_train]
        )


def _require(path: str, layout: str) -> str:
    if not os.path.exists(path):
        raise DataError(f"dataset file not found: {path}; expected layout: {layout}")
    return path


def _channel_stats(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    x = images.reshape(-1, images.shape[-1]).astype(np.float64) / 255.0
    return tuple(x.mean(0).tolist()), tuple(np.maximum(x.std(0), 1e-3).tolist())


# --------------------------------------------------------------------------------------------- digits


def load_digits(test_fraction: float = 0.2, seed: int = 0) -> ImageDataset:
    """scikit-learn's 8x8 digits (1,797 images, 10 classes), scaled to uint8 0-255, one grey channel.

    A fixed shuffled split (`seed`) holds out `test_fraction` of the images.
    """
    from sklearn.datasets import load_digits as sk_load_digits

    bunch = sk_load_digits()
    images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    labels = bunch.target.astype(np.int32)
    order = np.random.default_rng(seed).permutation(len(labels))
    n_test = int(round(test_fraction * len(labels)))
    test, train = order[:n_test], order[n_test:]
    mean, std = _channel_stats(images[train])
    return ImageDataset(
        "digits", images[train], labels[train], images[test], labels[test], 10, mean, std
    )


# ------------------------------------------------------------------------------------------------ IDX


def read_idx(path: str) -> np.ndarray:
    """Reads one IDX file (gzipped or not): magic 0x0000 08 <ndim>, big-endian dims, uint8 data."""
    _require(path, IDX_LAYOUT)
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{path} is not an unsigned-byte IDX file (bad magic {raw[:4]!r})")
    ndim = raw[3]
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise DataError(
            f"{path}: header says shape {dims} but holds {data.size} bytes (truncated?)"
        )
    return data.reshape(dims)


def load_idx_dataset(directory: str, name: str = "mnist") -> ImageDataset:
    """MNIST or Fashion-MNIST from the four IDX gz files in `directory`."""
    if not os.path.isdir(directory):
        raise DataError(f"{name}: no directory {directory}; expected layout: {IDX_LAYOUT}")
    parts = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = read_idx(os.path.join(directory, f"{prefix}-images-idx3-ubyte.gz"))
        labels = read_idx(os.path.join(directory, f"{prefix}-labels-idx1-ubyte.gz"))
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DataError(
                f"{name} {split}: images {images.shape} and labels {labels.shape} do not match"
            )
        parts[split] = (images[..., None], labels.astype(np.int32))
    mean, std = _channel_stats(parts["train"][0])
    return ImageDataset(name, *parts["train"], *parts["test"], 10, mean, std)


# ---------------------------------------------------------------------------------------------- CIFAR


def _unpickle(path: str, layout: str) -> dict:
    _require(path, layout)
    try:
        with open(path, "rb") as f:
            return pickle.load(f, encoding="bytes")
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a malformed file
        raise DataError(
            f"{path} is not a CIFAR python pickle ({e}); expected layout: {layout}"
        ) from e


def _cifar_images(batch: dict, path: str, layout: str) -> np.ndarray:
    data = batch.get(b"data")
    if data is None or data.ndim != 2 or data.shape[1] != 3072:
        raise DataError(f"{path}: expected b'data' of shape (N, 3072); expected layout: {layout}")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).astype(np.uint8)


def _resolve(directory: str, sub: str, layout: str) -> str:
    if os.path.isdir(os.path.join(directory, sub)):
        return os.path.join(directory, sub)
    if os.path.isdir(directory):
        return directory
    raise DataError(f"no directory {directory}; expected layout: {layout}")


def load_cifar10(directory: str) -> ImageDataset:
    root = _resolve(directory, "cifar-10-batches-py", CIFAR10_LAYOUT)
    train = [_unpickle(os.path.join(root, f"data_batch_{i}"), CIFAR10_LAYOUT) for i in range(1, 6)]
    test = _unpickle(os.path.join(root, "test_batch"), CIFAR10_LAYOUT)
    x_train = np.concatenate([_cifar_images(b, root, CIFAR10_LAYOUT) for b in train])
    y_train = np.concatenate([np.asarray(b[b"labels"], np.int32) for b in train])
    x_test = _cifar_images(test, root, CIFAR10_LAYOUT)
    y_test = np.asarray(test[b"labels"], np.int32)
    return ImageDataset("cifar10", x_train, y_train, x_test, y_test, 10, CIFAR_MEAN, CIFAR_STD)


def load_cifar100(directory: str) -> ImageDataset:
    root = _resolve(directory, "cifar-100-python", CIFAR100_LAYOUT)
    parts = []
    for split in ("train", "test"):
        path = os.path.join(root, split)
        batch = _unpickle(path, CIFAR100_LAYOUT)
        if b"fine_labels" not in batch:
            raise DataError(f"{path} has no b'fine_labels'; expected layout: {CIFAR100_LAYOUT}")
        parts += [
            _cifar_images(batch, path, CIFAR100_LAYOUT),
            np.asarray(batch[b"fine_labels"], np.int32),
        ]
    return ImageDataset("cifar100", *parts, 100, CIFAR_MEAN, CIFAR_STD)


ARRAYS_LAYOUT = "DIR/{train,test}_{images,labels}.npy (uint8 NHWC images, integer labels)"


def load_arrays(directory: str, name: str = "arrays") -> ImageDataset:
    """Pre-resized uint8 NHWC arrays (memory-mapped), e.g. ImageNet-21k at 64x64; statistics: ImageNet's."""
    load = lambda f: np.load(_require(os.path.join(directory, f), ARRAYS_LAYOUT), mmap_mode="r")
    x_train, y_train = load("train_images.npy"), np.asarray(load("train_labels.npy"), np.int32)
    x_test, y_test = load("test_images.npy"), np.asarray(load("test_labels.npy"), np.int32)
    if x_train.dtype != np.uint8 or x_train.ndim != 4 or len(x_train) != len(y_train):
        raise DataError(
            f"{directory}: train images {x_train.shape} {x_train.dtype} and labels "
            f"{y_train.shape} do not match; expected layout: {ARRAYS_LAYOUT}"
        )
    num_classes = int(max(y_train.max(), y_test.max())) + 1
    return ImageDataset(
        name, x_train, y_train, x_test, y_test, num_classes, IMAGENET_MEAN, IMAGENET_STD
    )


def load_image_dataset(name: str, directory: str | None = None) -> ImageDataset:
    """By name: `digits` (bundled); `mnist`, `fashion_mnist`, `cifar10`, `cifar100`, `arrays` (from
    `directory`)."""
    if name == "digits":
        return load_digits()
    loaders = {
        "mnist": lambda d: load_idx_dataset(d, "mnist"),
        "fashion_mnist": lambda d: load_idx_dataset(d, "fashion_mnist"),
        "cifar10": load_cifar10,
        "cifar100": load_cifar100,
        "arrays": load_arrays,
    }
    if name not in loaders:
        raise DataError(f"unknown dataset {name!r}; choose from {['digits', *loaders]}")
    if not directory:
        raise DataError(f"dataset {name!r} is read from files: set data.dir to its directory")
    return loaders[name](directory)


# ------------------------------------------------------------------------------------------------ UCI


@dataclasses.dataclass(frozen=True)
class RegressionSplit:
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def load_uci(directory: str, name: str, split: int = 0) -> RegressionSplit:
    """One train/test split of a UCI regression set in the Bayesian deep learning benchmarks layout."""
    root = os.path.join(directory, name, "data")
    read = lambda f: np.loadtxt(_require(os.path.join(root, f), UCI_LAYOUT), ndmin=1)
    data = np.loadtxt(_require(os.path.join(root, "data.txt"), UCI_LAYOUT), ndmin=2)
    features = read("index_features.txt").astype(int)
    target = int(read("index_target.txt").reshape(-1)[0])
    train = read(f"index_train_{split}.txt").astype(int)
    test = read(f"index_test_{split}.txt").astype(int)
    if max(features.max(), target) >= data.shape[1] or max(train.max(), test.max()) >= len(data):
        raise DataError(f"{root}: indices point outside data.txt of shape {data.shape}")
    x, y = data[:, features], data[:, target]
    return RegressionSplit(x[train], y[train], x[test], y[test])


# ---------------------------------------------------------------------------------------- batch source


class EpochBatches:
    """Deterministic batches: a function of (seed, step), so a resumed run sees exactly the same data.

    Each epoch draws a fresh permutation from `(seed, epoch)` and drops the last incomplete batch (as the
    official loader). `batch(step)` returns this process's slice of global batch `step`: process p of P takes
    rows [p B/P, (p+1) B/P) of the global batch, so P processes together see what one process would.
    """

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        global_batch_size: int,
        seed: int,
        process_index: int = 0,
        process_count: int = 1,
    ):
        if global_batch_size > len(labels):
            raise DataError(
                f"batch_size={global_batch_size} exceeds the {len(labels)} training examples; "
                "lower the batch size"
            )
        if global_batch_size % process_count:
            raise DataError(
                f"batch_size={global_batch_size} does not split over {process_count} processes"
            )
        self.images, self.labels = images, labels
        self.global_batch_size, self.seed = global_batch_size, seed
        self.steps_per_epoch = len(labels) // global_batch_size
        local = global_batch_size // process_count
        self._rows = slice(process_index * local, (process_index + 1) * local)
        self._epoch, self._perm = -1, None

    def batch(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        epoch, within = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            self._epoch = epoch
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.labels))
        start = within * self.global_batch_size
        idx = self._perm[start : start + self.global_batch_size][self._rows]
        return self.images[idx], self.labels[idx]
