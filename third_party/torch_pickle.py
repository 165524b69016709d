"""Reads PyTorch `torch.save` files (the zip format of torch >= 1.6) into numpy arrays, without torch.

A `.pt`/`.pth` file is a zip archive holding `<name>/data.pkl` (a pickle whose tensors refer to storages by
key) and one raw little-endian file `<name>/data/<key>` per storage. The unpickler below resolves only the
handful of globals a state dict needs (OrderedDict, tensor and parameter rebuilders, storage types) and refuses
anything else, so loading a file never runs code from it.
"""

from __future__ import annotations

import collections
import pickle
import zipfile

import numpy as np

_STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class TorchFileError(ValueError):
    """The file is not a readable torch.save zip archive."""


def _bfloat16():
    import ml_dtypes

    return ml_dtypes.bfloat16


class _StorageType:
    def __init__(self, name: str):
        if name == "BFloat16Storage":
            self.dtype = _bfloat16()
        elif name in _STORAGE_DTYPES:
            self.dtype = _STORAGE_DTYPES[name]
        else:
            raise TorchFileError(f"unsupported storage type torch.{name}")


def _rebuild_tensor(storage, offset, size, stride, *unused):
    del unused
    itemsize = storage.dtype.itemsize
    if not size:
        return storage[offset : offset + 1].reshape(()).copy()
    view = np.lib.stride_tricks.as_strided(
        storage[offset:], shape=tuple(size), strides=tuple(s * itemsize for s in stride)
    )
    return np.array(view)


def _rebuild_parameter(data, requires_grad, backward_hooks, *unused):
    del requires_grad, backward_hooks, unused
    return data


class _Unpickler(pickle.Unpickler):
    def __init__(self, file, archive: zipfile.ZipFile, prefix: str):
        super().__init__(file)
        self._archive, self._prefix, self._cache = archive, prefix, {}

    def find_class(self, module, name):
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor
        if module == "torch._utils" and name == "_rebuild_parameter":
            return _rebuild_parameter
        if module == "torch" and name.endswith("Storage"):
            return _StorageType(name)
        if (module, name) == ("torch", "device"):
            return str
        raise pickle.UnpicklingError(
            f"refusing to load global {module}.{name}: only tensor state dicts are supported"
        )

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        storage_type, key = pid[1], str(pid[2])
        if key not in self._cache:
            raw = self._archive.read(f"{self._prefix}data/{key}")
            self._cache[key] = np.frombuffer(raw, dtype=storage_type.dtype)
        return self._cache[key]


def load(path: str) -> dict:
    """Returns the pickled object of a torch.save zip file with every tensor as a numpy array."""
    if not zipfile.is_zipfile(path):
        raise TorchFileError(
            f"{path} is not a torch.save zip archive (legacy pre-1.6 files are not supported: re-save it "
            "with a recent torch, `torch.save(torch.load(p), p)`)"
        )
    with zipfile.ZipFile(path) as archive:
        pkl = [n for n in archive.namelist() if n.endswith("data.pkl")]
        if len(pkl) != 1:
            raise TorchFileError(f"{path}: expected one data.pkl in the archive, found {pkl}")
        prefix = pkl[0][: -len("data.pkl")]
        byteorder = f"{prefix}byteorder"
        if byteorder in archive.namelist() and archive.read(byteorder).strip() != b"little":
            raise TorchFileError(f"{path}: big-endian tensors are not supported")
        with archive.open(pkl[0]) as f:
            return _Unpickler(f, archive, prefix).load()
