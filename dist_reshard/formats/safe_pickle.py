"""The one unpickler for input files: an explicit allow-list of what Megatron-LM and DCP really store.

Checkpoints come from hubs and other people's clusters, and a pickle can name any importable callable, so
every pickle this package reads from its input (legacy `model_optim_rng.pt`, torch_dist `common.pt` and
`.metadata`, the rank files `verify` compares) goes through `_AllowListUnpickler`, which resolves only the
globals listed below and refuses anything else with one line naming the file and the global, before any
of it is used. The list is what the pickles of real Megatron-LM checkpoints hold (the fixtures under
`tests/fixtures/megatron-lm-core_v0.16.1/`; `tests/test_safe_pickle.py` lists them): tensors and
storages (plain, with Python attributes as Megatron's fp32 master copies carry, and Parameters),
containers, `argparse.Namespace`, torch dtypes and sizes, DCP's metadata classes, `signal.Signals` and
Megatron's enums in args, TransformerEngine's `_extra_state` (a uint8 tensor, or a BytesIO in older
releases), and the numpy RNG state, which is kept as an inert stand-in (never needed).

Globals in the real files (Megatron-LM core_v0.16.1, dense and MoE, both formats): model_optim_rng.pt
and common.pt: `argparse.Namespace`, `collections.OrderedDict`, `torch._utils._rebuild_tensor_v2`,
`torch.FloatStorage`, `torch.float32`, `signal.Signals`, `megatron.core.transformer.enums.AttnBackend`,
and in model_optim_rng.pt also `torch.ByteStorage` (torch RNG state) and the numpy RNG state
(`numpy._core.multiarray._reconstruct`, `numpy.ndarray`, `numpy.dtype`, `_codecs.encode`). `.metadata`:
`torch.Size`, `torch.float32`, `torch.serialization._get_layout`, DCP's `Metadata`, `MetadataIndex`,
`ChunkStorageMetadata`, `TensorStorageMetadata`, `BytesStorageMetadata`, `TensorProperties`, `StorageMeta`,
`_MEM_FORMAT_ENCODING`, `filesystem._StorageInfo`, `planner.SavePlan`, `WriteItem`, `WriteItemType`,
`TensorWriteData`. A bf16 run's fp32 master copies and Parameters add `torch._tensor._rebuild_from_type_v2`,
`torch.Tensor`, `torch.nn.parameter.Parameter`, `torch._utils._rebuild_parameter[_with_state]`.

Metadata reading loads no tensor data: a tensor becomes a `TensorRef` (its record, offset, shape), so
a rank file's layout is known without reading its bytes. DCP chunk blobs, which are tensor data, are
loaded by torch's own weights-only unpickler (itself an allow-list of tensors and containers).
"""

from __future__ import annotations

import _compat_pickle
import argparse
import collections
import enum
import io
import pickle
import signal
import struct
import zipfile
from dataclasses import dataclass

from ..base.errors import ConversionError

STORAGE_DTYPES = {"FloatStorage": "F32", "BFloat16Storage": "BF16", "HalfStorage": "F16",
                  "DoubleStorage": "F64", "LongStorage": "I64", "IntStorage": "I32", "ShortStorage": "I16",
                  "CharStorage": "I8", "ByteStorage": "U8", "BoolStorage": "BOOL",
                  "Float8_e4m3fnStorage": "F8_E4M3", "Float8_e5m2Storage": "F8_E5M2"}


class UnsafePickle(ConversionError):
    """A pickle names a global that is not on the allow-list."""


@dataclass(frozen=True)
class StorageRef:
    dtype: str
    key: str


@dataclass(frozen=True)
class TensorRef:
    storage: StorageRef
    offset: int  # in elements
    shape: tuple[int, ...]
    contiguous: bool


def _rebuild_tensor(storage, storage_offset, size, stride, *_):
    if not isinstance(storage, StorageRef):
        raise pickle.UnpicklingError("a tensor without a storage record")
    shape = tuple(size)
    expected, n = [], 1
    for d in reversed(shape):
        expected.append(n)
        n *= d
    return TensorRef(storage, storage_offset, shape, tuple(stride) == tuple(reversed(expected)) or n <= 1)


class _TensorType:
    """torch.Tensor / torch.nn.Parameter as named by `_rebuild_from_type_v2`: only a marker."""


def _rebuild_from_type(func, new_type, args, state):
    # A tensor with Python attributes (Megatron's `tensor_model_parallel`, `partition_dim`): the attributes
    # say nothing about where its bytes are.
    if func is not _rebuild_tensor or new_type is not _TensorType:
        raise pickle.UnpicklingError("_rebuild_from_type_v2 of something other than a tensor")
    return _rebuild_tensor(*args)


def _rebuild_parameter(data, *_):
    if not isinstance(data, TensorRef):
        raise pickle.UnpicklingError("a Parameter without a tensor")
    return data


class Inert:
    """A stand-in for state the converter never uses (numpy RNG arrays): accepts its pickled state."""

    def __init__(self, *args):
        pass

    def __setstate__(self, state):
        pass


def _latin1(text, encoding="latin1"):
    # Protocol 2 pickles store bytes as `_codecs.encode(str, "latin1")`; no other codec is looked up.
    if encoding != "latin1" or not isinstance(text, str):
        raise pickle.UnpicklingError(f"_codecs.encode with {encoding!r}")
    return text.encode("latin1")


_MEGATRON_ENUM_MODULES = ("megatron.core.enums", "megatron.core.transformer.enums")


def _megatron_enum(module: str, name: str):
    """A Megatron enum from an args namespace: the real class when Megatron is installed (an installed,
    named module), else its members' plain values (the enum class itself holds no behaviour we need)."""
    try:
        import importlib

        cls = getattr(importlib.import_module(module), name, None)
    except ImportError:
        return lambda value: value
    if isinstance(cls, type) and issubclass(cls, enum.Enum):
        return cls
    return None


def _torch_globals() -> dict[tuple[str, str], object]:
    import torch
    import torch.distributed.checkpoint.filesystem as dcp_fs
    import torch.distributed.checkpoint.metadata as dcp_md
    import torch.distributed.checkpoint.planner as dcp_plan
    import torch.serialization

    allowed: dict[tuple[str, str], object] = {
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
        ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
        ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
        ("torch", "Tensor"): _TensorType,
        ("torch.nn.parameter", "Parameter"): _TensorType,
        ("torch", "Size"): torch.Size,
        ("torch", "device"): torch.device,
        ("torch.serialization", "_get_layout"): torch.serialization._get_layout,
    }
    for name in STORAGE_DTYPES:
        allowed[("torch", name)] = STORAGE_DTYPES[name]
    for name in dir(torch):
        if isinstance(getattr(torch, name, None), (torch.dtype, torch.layout, torch.memory_format)):
            allowed[("torch", name)] = getattr(torch, name)
    for module, names in ((dcp_md, ("Metadata", "MetadataIndex", "ChunkStorageMetadata", "TensorStorageMetadata",
                                    "BytesStorageMetadata", "TensorProperties", "StorageMeta",
                                    "_MEM_FORMAT_ENCODING")),
                          (dcp_fs, ("_StorageInfo",)),
                          (dcp_plan, ("SavePlan", "WriteItem", "WriteItemType", "TensorWriteData"))):
        for name in names:
            if hasattr(module, name):  # some exist only in newer torch
                allowed[(module.__name__, name)] = getattr(module, name)
    return allowed


_PLAIN_GLOBALS: dict[tuple[str, str], object] = {
    ("argparse", "Namespace"): argparse.Namespace,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set, ("builtins", "frozenset"): frozenset, ("builtins", "slice"): slice,
    ("builtins", "complex"): complex, ("builtins", "bytearray"): bytearray,
    ("signal", "Signals"): signal.Signals,
    ("_io", "BytesIO"): io.BytesIO,  # TransformerEngine's `_extra_state` in older releases (never unpickled)
    ("_codecs", "encode"): _latin1,
    # numpy RNG state (Megatron's rng_state): never used, never built.
    ("numpy.core.multiarray", "_reconstruct"): Inert, ("numpy._core.multiarray", "_reconstruct"): Inert,
    ("numpy", "ndarray"): Inert, ("numpy", "dtype"): Inert,
}
_ALLOWED: dict[tuple[str, str], object] = {}


def allowed_globals() -> dict[tuple[str, str], object]:
    """(module, name) -> what the unpickler gives for it (Megatron's enums are resolved on demand)."""
    if not _ALLOWED:
        _ALLOWED.update(_PLAIN_GLOBALS)
        _ALLOWED.update(_torch_globals())
    return _ALLOWED


class _AllowListUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, where: str):
        super().__init__(io.BytesIO(data))
        self.where = where

    def find_class(self, module, name):
        # Protocol 2 (torch.save's) names modules as Python 2 did; mapped back as pickle itself does.
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        found = allowed_globals().get((module, name))
        if found is None and module in _MEGATRON_ENUM_MODULES:
            found = _megatron_enum(module, name)
        if found is None:
            raise UnsafePickle(f"{self.where}: refused to unpickle global {module}.{name} (not on the allow-list "
                               f"of what Megatron-LM and DCP checkpoints store; the file may run code when loaded)")
        return found

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and pid[1] in STORAGE_DTYPES.values()):
            raise pickle.UnpicklingError(f"unsupported persistent id {str(pid)[:80]}")
        return StorageRef(pid[1], str(pid[2]))


def loads(data: bytes, where: str):
    """A pickle through the allow-list; tensors as `TensorRef`s. Any failure is one line naming `where`."""
    try:
        return _AllowListUnpickler(data, where).load()
    except UnsafePickle:
        raise
    except Exception as e:  # noqa: BLE001 - whatever a corrupt pickle raises, reported by file
        raise ConversionError(f"{where}: not a readable pickle ({e.__class__.__name__}: {str(e)[:200]})") from None


def _local_data_offset(f, info: zipfile.ZipInfo) -> int:
    f.seek(info.header_offset)
    local = f.read(30)
    name_len, extra_len = struct.unpack("<HH", local[26:30])
    return info.header_offset + 30 + name_len + extra_len


def _pickle_and_records(f) -> tuple[bytes, dict[str, int]]:
    """A torch.save archive's pickle bytes and each storage record's offset, from an open binary file.

    Records are read straight from their byte ranges (torch.save stores them uncompressed), without
    zipfile's CRC check: our own writers leave CRCs at zero (torch's compute_crc32 off, which is
    process-wide, so archives saved in memory afterwards have none either)."""
    with zipfile.ZipFile(f) as zf:
        infos = zf.infolist()
    pkl = next(i for i in infos if i.filename.endswith("/data.pkl") or i.filename == "data.pkl")
    prefix = pkl.filename[:-len("data.pkl")]
    offsets = {}
    for info in infos:
        if info.compress_type != zipfile.ZIP_STORED:
            raise ValueError(f"record {info.filename} is compressed; cannot read it in place")
        if info.filename.startswith(prefix + "data/"):
            offsets[info.filename[len(prefix + "data/"):]] = _local_data_offset(f, info)
    f.seek(_local_data_offset(f, pkl))
    return f.read(pkl.file_size), offsets


_UNREADABLE_ARCHIVE = (zipfile.BadZipFile, StopIteration, EOFError, struct.error, ValueError, OSError)


def read_pt_metadata(path: str) -> tuple[object, dict[str, int]]:
    """A torch.save file's object with `TensorRef`s in place of tensors, and each storage record's offset."""
    try:
        with open(path, "rb") as f:
            data, offsets = _pickle_and_records(f)
    except FileNotFoundError:
        raise ConversionError(f"{path}: file missing") from None
    except _UNREADABLE_ARCHIVE as e:
        raise ConversionError(f"{path}: not a readable torch.save file ({e.__class__.__name__}: {e})") from None
    return loads(data, path), offsets


def load_pt(path: str):
    """A torch.save file with its tensors (for `verify`), unpickled once, through the allow-list: each
    `TensorRef` becomes a tensor over the file's own record bytes (a private copy-on-write mapping, so pages
    are read only when compared). torch.load is never called on the file: a second unpickling would run
    whatever the file holds by then, not what was checked."""
    import mmap

    import torch

    from ..base.dtypes import TORCH_DTYPES

    obj, offsets = read_pt_metadata(path)
    with open(path, "rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)

    def build(x):
        if isinstance(x, TensorRef):
            if not x.contiguous:
                raise ConversionError(f"{path}: a tensor stored with strides (not written by Megatron-LM or us)")
            dtype = TORCH_DTYPES[x.storage.dtype]
            count = 1
            for d in x.shape:
                count *= d
            if count == 0:
                return torch.empty(x.shape, dtype=dtype)
            start = offsets[x.storage.key] + x.offset * dtype.itemsize
            if start + count * dtype.itemsize > len(mapped):
                raise ConversionError(f"{path}: a tensor reaches past the end of the file")
            return torch.frombuffer(mapped, dtype=dtype, count=count, offset=start).reshape(x.shape)
        if isinstance(x, dict):
            return type(x)((k, build(v)) for k, v in x.items())
        if isinstance(x, (list, tuple)) and type(x) in (list, tuple):
            return type(x)(build(v) for v in x)
        if isinstance(x, argparse.Namespace):
            return argparse.Namespace(**{k: build(v) for k, v in vars(x).items()})
        return x

    return build(obj)


def read_dcp_metadata(folder: str):
    """A torch_dist checkpoint's `.metadata` (DCP's `Metadata`), through the allow-list."""
    import os

    path = os.path.join(folder, ".metadata")
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ConversionError(f"{path}: unreadable DCP metadata ({e.__class__.__name__}: {e.strerror})") from None
    md = loads(data, path)
    from torch.distributed.checkpoint.metadata import Metadata

    if not isinstance(md, Metadata):
        raise ConversionError(f"{path}: holds a {type(md).__name__}, not DCP metadata")
    return md


def load_tensor_blob(data: bytes, where: str):
    """One tensor saved with torch.save (a DCP chunk), with its data: torch's weights-only unpickler."""
    import torch

    try:
        return torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    except Exception as e:  # noqa: BLE001 - a corrupt chunk is reported by file and tensor
        failure = e
    try:  # name the global when that was the reason
        loads(_pickle_and_records(io.BytesIO(data))[0], where)
    except UnsafePickle:
        raise
    except Exception:  # noqa: BLE001 - not even a zip: the first failure is the one to report
        pass
    raise ConversionError(f"{where} is not a readable torch.save blob ({failure.__class__.__name__})") from None
