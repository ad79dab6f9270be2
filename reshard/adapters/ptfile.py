"""Reading and writing `torch.save` files without importing torch.

A `torch.save` file is an uncompressed zip: `<archive>/data.pkl` (a protocol-2 pickle in which
each tensor is `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)` and each
storage a persistent id `("storage", torch.<Type>Storage, key, location, numel)`), the raw bytes
of storage `key` in `<archive>/data/<key>` (aligned to 64 bytes), and a few small records
(`version`, `byteorder`, ...). Importing torch takes about 2 s on a small machine, several times
what converting a DeepSpeed checkpoint takes, so the DeepSpeed adapter reads and writes these
files with numpy instead:

- `read_pt` maps the file and returns its object tree with every tensor as a numpy array viewing
  the mapping (bfloat16 through `ml_dtypes`). Unpickling is restricted (DESIGN.md section 8): only
  torch's tensor-rebuild functions, storage types, `torch.Size`, dtypes and devices,
  `OrderedDict`, `set`/`frozenset` and the caller's `allow` list can be named; anything else
  raises `UnpicklingError` naming the class, unless `trust=True`. This is the set that
  `torch.load(weights_only=True)` accepts for such files (the tests hold the two side by side).
- `write_pt` writes an object tree in the same format; `torch.load` reads it. Numpy arrays become
  tensors; a `Pieces` (views laid end to end) becomes one tensor whose bytes are copied from the
  source files by the kernel (`copy_file_range`) where they lie in a file `read_pt` mapped. Like
  `torch.save` with `set_crc32_options(False)`, tensor records carry no CRC32.
- `release` gives a mapped array's pages back to the kernel once they have been read.

Zip64 is written where a record or offset needs it, as torch does.
"""

from __future__ import annotations

import _compat_pickle
import codecs
import collections
import io
import math
import mmap
import os
import pickle
import secrets
import struct
import weakref
import zipfile
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Self

import ml_dtypes
import numpy as np

__all__ = ["DType", "Device", "Pieces", "Size", "TorchArray", "file_span", "np_dtype",
           "read_pt", "release", "write_pt"]

_ALIGN = 64
_ZIP64_AT = 0xFFFFFFFF  # sizes and offsets from here on need zip64 fields (tests lower it)
_PAGE = mmap.PAGESIZE

# torch's legacy storage classes (the names its pickles use) and their element types.
_STORAGES: dict[str, str] = {
    "FloatStorage": "float32", "DoubleStorage": "float64", "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16", "LongStorage": "int64", "IntStorage": "int32",
    "ShortStorage": "int16", "CharStorage": "int8", "ByteStorage": "uint8", "BoolStorage": "bool",
    "ComplexFloatStorage": "complex64", "ComplexDoubleStorage": "complex128",
}
_STORAGE_OF: dict[str, str] = {v: k for k, v in _STORAGES.items()}
_TORCH_DTYPES = (*_STORAGES.values(), "uint16", "uint32", "uint64")


def np_dtype(name: str) -> np.dtype:
    """The numpy dtype of a torch dtype name ("float32", "bfloat16", ...)."""
    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


def _dtype_name(dtype: np.dtype) -> str:
    return "bfloat16" if dtype == np.dtype(ml_dtypes.bfloat16) else dtype.name


class TorchArray(np.ndarray):
    """A tensor that carried Python attributes in its pickle (`_rebuild_from_type_v2`, e.g.
    DeepSpeed's `ds_id`); `torch_state` keeps them so that `write_pt` writes them back."""

    torch_state: dict[str, Any] | None = None


class Size(tuple):
    """`torch.Size`: a tuple that pickles back as `torch.Size`."""

    __slots__ = ()

    def __reduce__(self) -> tuple[Any, ...]:
        return (Size, (tuple(self),))


class DType(str):
    """A torch dtype named in a pickle (`torch.float16`): its name, pickled back as the dtype."""

    __slots__ = ()

    def __reduce__(self) -> str:
        return f"torch.{self}"


class Device(str):
    """`torch.device("cpu")` or `torch.device("cuda", 0)`, kept as its string form."""

    __slots__ = ()

    def __new__(cls, kind: str, index: int | None = None) -> Self:
        return super().__new__(cls, kind if index is None else f"{kind}:{index}")

    def __reduce__(self) -> tuple[Any, ...]:
        return (Device, (str(self),))


@dataclass(frozen=True, slots=True)
class Pieces:
    """One tensor whose elements are `parts` (1-D arrays of one dtype) laid end to end.

    `write_pt` writes it without joining the parts in memory: the bytes of a part that views a
    mapped file go from file to file inside the kernel.
    """

    shape: tuple[int, ...]
    dtype: np.dtype
    parts: tuple[np.ndarray, ...]

    def __post_init__(self) -> None:
        want = math.prod(self.shape)
        if self.numel != want:
            raise ValueError(f"Pieces: shape {self.shape} needs {want} elements, its parts hold {self.numel}")
        if any(p.dtype != self.dtype or p.ndim != 1 for p in self.parts):
            raise ValueError(f"Pieces: every part must be a 1-D array of {self.dtype}")

    @property
    def numel(self) -> int:
        """Number of elements."""
        return sum(int(p.size) for p in self.parts)

    def join(self) -> np.ndarray:
        """The tensor as one new array."""
        if not self.parts:
            return np.empty(self.shape, dtype=self.dtype)
        return np.concatenate(self.parts).reshape(self.shape)


# -- reading ---------------------------------------------------------------------------------------

# Every mapping made by read_pt: base address -> (end address, path, the array over the whole
# mapping, weakly: every tensor read from the file is a view of it, so the entry dies with the last
# one). file_span uses it to find where a view's bytes lie in a file.
_MAPPED: dict[int, tuple[int, str, weakref.ref[np.ndarray]]] = {}


def _mapping(addr: int, nbytes: int) -> tuple[int, str, np.ndarray] | None:
    """(base address, path, whole-mapping array) of the live mapping holding [addr, addr+nbytes)."""
    for lo, (hi, path, ref) in list(_MAPPED.items()):
        whole = ref()
        if whole is None:
            del _MAPPED[lo]
        elif lo <= addr and addr + nbytes <= hi:
            return lo, path, whole
    return None


class _StorageType:
    """What `torch.<X>Storage` unpickles to: the element type of a storage."""

    def __init__(self, dtype: str) -> None:
        self.dtype = dtype


def _rebuild_tensor_v2(storage: np.ndarray, offset: int, size: Sequence[int], stride: Sequence[int],
                       requires_grad: bool = False, hooks: Any = None, metadata: Any = None) -> np.ndarray:
    shape = tuple(int(s) for s in size)
    numel = math.prod(shape)
    if any(s == 0 for s in shape):
        return np.empty(shape, dtype=storage.dtype)
    reach = offset + sum((d - 1) * s for d, s in zip(shape, stride, strict=True))
    if offset < 0 or reach >= storage.size:
        raise pickle.UnpicklingError(
            f"a tensor of shape {list(shape)} at offset {offset} reaches past its storage of "
            f"{storage.size} elements")
    contiguous = tuple(int(s) for s in stride) == _contiguous_strides(shape)
    if contiguous:
        return storage[offset:offset + numel].reshape(shape)
    item = storage.itemsize
    return np.lib.stride_tricks.as_strided(
        storage[offset:], shape=shape, strides=tuple(int(s) * item for s in stride), writeable=False)


def _rebuild_from_type_v2(func: Any, new_type: Any, args: Sequence[Any], state: Any) -> Any:
    value = func(*args)
    if isinstance(value, np.ndarray) and state:
        value = value.view(TorchArray)
        value.torch_state = dict(state) if isinstance(state, dict) else None
    return value


def _rebuild_parameter(data: Any, requires_grad: bool, hooks: Any, state: Any = None) -> Any:
    return data


class _TensorType:
    """What `torch.Tensor` unpickles to (only used inside `_rebuild_from_type_v2`)."""


def _encode(text: str, encoding: str = "utf-8") -> bytes:
    # Protocol 2 pickles bytes as _codecs.encode(text, "latin1").
    if codecs.lookup(encoding).name not in ("latin-1", "iso8859-1", "utf-8"):
        raise pickle.UnpicklingError(f"_codecs.encode with encoding {encoding!r} is not allowed")
    return text.encode(encoding)


def _torch_globals() -> dict[str, Any]:
    names: dict[str, Any] = {
        "torch._utils._rebuild_tensor_v2": _rebuild_tensor_v2,
        "torch._utils._rebuild_parameter": _rebuild_parameter,
        "torch._utils._rebuild_parameter_with_state": _rebuild_parameter,
        "torch._tensor._rebuild_from_type_v2": _rebuild_from_type_v2,
        "torch.Tensor": _TensorType,
        "torch.Size": Size,
        "torch.device": Device,
        "collections.OrderedDict": collections.OrderedDict,
        "builtins.set": set,
        "builtins.frozenset": frozenset,
        "_codecs.encode": _encode,
    }
    names.update({f"torch.{n}": _StorageType(d) for n, d in _STORAGES.items()})
    names.update({f"torch.{d}": DType(d) for d in _TORCH_DTYPES})
    return names


_READ_GLOBALS = _torch_globals()


class _Unpickler(pickle.Unpickler):
    def __init__(self, data: bytes, storage: Any, allow: Mapping[str, Any], trust: bool) -> None:
        super().__init__(io.BytesIO(data))
        self._storage = storage
        self._allow = allow
        self._trust = trust

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _compat_pickle.NAME_MAPPING:  # protocol 2 uses Python 2's names
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        full = f"{module}.{name}"
        found = self._allow.get(full, _READ_GLOBALS.get(full))
        if found is not None:
            return found
        if self._trust:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"Unsupported global: GLOBAL {full} is not allowed")

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType)):
            raise pickle.UnpicklingError(f"unknown persistent id {pid!r}")
        return self._storage(str(pid[2]), pid[1].dtype, int(pid[4]))


class ChecksumError(ValueError):
    """A record's bytes do not match the CRC32 that `torch.save` stored for it (the file is corrupt)."""


def _records(mm: mmap.mmap, path: str) -> dict[str, tuple[int, int, int]]:
    """name -> (data offset, size, CRC32) of every record, from the zip's central directory."""
    with zipfile.ZipFile(path) as z:  # only the central directory is parsed here
        infos = z.infolist()
    out: dict[str, tuple[int, int, int]] = {}
    for info in infos:
        h = info.header_offset
        if mm[h:h + 4] != b"PK\x03\x04" or info.compress_type != 0:
            raise ValueError(f"record {info.filename} is not a stored zip entry")
        name_len, extra_len = struct.unpack_from("<HH", mm, h + 26)
        start = h + 30 + name_len + extra_len
        if start + info.file_size > len(mm):
            raise ValueError(f"record {info.filename} runs past the end of the file (truncated)")
        out[info.filename] = (start, info.file_size, info.CRC)
    return out


_CRC_CHUNK = 8 << 20  # the resident memory a check adds: 64 MiB doubled the converter's peak RSS


def _check_crc(mm: mmap.mmap, name: str, where: tuple[int, int, int]) -> None:
    """Compare record `name` with its stored CRC32 (0: `torch.save` stored none), in chunks whose
    pages are given back as soon as they are hashed, so that resident memory stays small."""
    start, size, want = where
    if want == 0 or size == 0:
        return
    crc = 0
    view = memoryview(mm)
    try:
        for a in range(start, start + size, _CRC_CHUNK):
            b = min(a + _CRC_CHUNK, start + size)
            crc = zlib.crc32(view[a:b], crc)
            lo, hi = -(-a // _PAGE) * _PAGE, b // _PAGE * _PAGE
            if hi > lo and hasattr(mm, "madvise"):
                mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)
    finally:
        view.release()
    if crc != want:
        raise ChecksumError(f"record {name} does not match its CRC32 checksum")


def read_pt(path: str, *, allow: Mapping[str, Any] | None = None, trust: bool = False) -> Any:
    """The object tree of the `torch.save` file `path`, tensors as numpy arrays over a mapping.

    Args:
        path: the file.
        allow: extra globals the pickle may name ("module.name" -> the object to use instead).
        trust: let the pickle name any other global too (a full unpickle, which runs whatever
            code the file names: only for files you trust).

    Raises:
        OSError: the file cannot be opened. ValueError: it is not a torch zip file.
        ChecksumError (a ValueError): a record the object tree uses does not match the CRC32
            `torch.save` stored for it (files written with CRC32 off, or by `write_pt`, carry none).
        pickle.UnpicklingError: the pickle names a global outside the allowed set.
    """
    with open(path, "rb") as f:
        try:
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        except ValueError as e:  # an empty file
            raise ValueError("the file is empty") from e
    try:
        records = _records(mm, path)
    except zipfile.BadZipFile as e:
        raise ValueError(f"not a zip file ({e}); legacy torch.save files are not supported") from e
    except (NotImplementedError, struct.error, OverflowError) as e:  # a damaged central directory
        raise ValueError(f"its zip directory is damaged ({type(e).__name__}: {e})") from e
    pkl = [n for n in records if n == "data.pkl" or n.endswith("/data.pkl")]
    if len(pkl) != 1:
        raise ValueError("no data.pkl record; not a torch.save file")
    prefix = pkl[0][:-len("data.pkl")]
    order = records.get(prefix + "byteorder")
    if order is not None and mm[order[0]:order[0] + order[1]] != b"little":
        raise ValueError("the file was written on a big-endian machine")
    whole = np.frombuffer(mm, dtype=np.uint8)
    base = whole.__array_interface__["data"][0]
    _MAPPED[base] = (base + len(mm), os.path.realpath(path), weakref.ref(whole))
    storages: dict[str, np.ndarray] = {}

    def storage(key: str, dtype: str, numel: int) -> np.ndarray:
        if key not in storages:
            name = f"{prefix}data/{key}"
            where = records.get(name)
            dt = np_dtype(dtype)
            if where is None or where[1] < numel * dt.itemsize:
                raise pickle.UnpicklingError(f"storage {key} is missing or shorter than {numel} elements")
            _check_crc(mm, name, where)  # once per storage, when the pickle first names it
            storages[key] = whole[where[0]:where[0] + numel * dt.itemsize].view(dt)
        return storages[key]

    _check_crc(mm, pkl[0], records[pkl[0]])
    off, size, _ = records[pkl[0]]
    return _Unpickler(bytes(mm[off:off + size]), storage, allow or {}, trust).load()


def file_span(array: np.ndarray) -> tuple[str, int] | None:
    """(path, byte offset) where a C-contiguous `array` lies in a file `read_pt` mapped, or None."""
    if not array.flags.c_contiguous or array.nbytes == 0:
        return None
    found = _mapping(array.__array_interface__["data"][0], array.nbytes)
    return None if found is None else (found[1], array.__array_interface__["data"][0] - found[0])


def release(array: np.ndarray, upto_elements: int | None = None) -> None:
    """Give back the whole pages of `array`'s first `upto_elements` elements (all by default) if
    it views a mapping of `read_pt`; a later read maps them again from the file."""
    if array.size == 0 or not array.flags.c_contiguous:
        return
    n = array.size if upto_elements is None else min(upto_elements, array.size)
    addr = array.__array_interface__["data"][0]
    found = _mapping(addr, n * array.itemsize)
    if found is None:
        return
    lo, _, whole = found
    mm = whole.base
    start = -(-(addr - lo) // _PAGE) * _PAGE
    end = (addr - lo + n * array.itemsize) // _PAGE * _PAGE
    if end > start and isinstance(mm, mmap.mmap) and hasattr(mm, "madvise"):
        # A private file mapping we never write: dropped pages are read again from the file.
        mm.madvise(mmap.MADV_DONTNEED, start, end - start)


# -- writing ---------------------------------------------------------------------------------------


class _Storage:
    """A tensor's bytes to write as record `data/<key>`."""

    def __init__(self, key: str, value: np.ndarray | Pieces) -> None:
        self.key = key
        self.value = value


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    out, acc = [], 1
    for d in reversed(shape):
        out.append(acc)
        acc *= max(d, 1)
    return tuple(reversed(out))


class _Pickler(pickle._Pickler):  # type: ignore[name-defined]
    """Pickles arrays and `Pieces` as torch tensors and the stand-ins as the globals they stand for."""

    def __init__(self, file: io.BytesIO, names: Mapping[int, str]) -> None:
        super().__init__(file, protocol=2)
        self._names = names
        self.storages: list[_Storage] = []

    def _global(self, obj: Any) -> str | None:
        try:
            return self._names.get(id(obj))
        except TypeError:
            return None

    def save_global(self, obj: Any, name: str | None = None) -> None:
        full = self._global(obj)
        if full is None and isinstance(obj, DType):
            full = f"torch.{obj}"
        if full is None:
            super().save_global(obj, name)
            return
        module, _, attr = full.rpartition(".")
        self.write(pickle.GLOBAL + f"{module}\n{attr}\n".encode())
        self.memoize(obj)

    def reducer_override(self, obj: Any) -> Any:
        if self._global(obj) is not None:
            return "global"  # a str: pickle calls save_global(obj), which writes the mapped name
        if isinstance(obj, (np.ndarray, Pieces)):
            shape = tuple(int(d) for d in obj.shape)
            dtype_name = _dtype_name(obj.dtype)
            if dtype_name not in _STORAGE_OF:
                raise pickle.PicklingError(f"a tensor of dtype {dtype_name} cannot be written")
            storage = _Storage(str(len(self.storages)), obj)
            self.storages.append(storage)
            args = (storage, 0, Size(shape), Size(_contiguous_strides(shape)), False,
                    collections.OrderedDict())
            state = getattr(obj, "torch_state", None)
            if state:
                return (_rebuild_from_type_v2, (_rebuild_tensor_v2, _TensorType, args, state))
            return (_rebuild_tensor_v2, args)
        if type(obj).__module__.split(".")[0] == "torch":
            raise pickle.PicklingError(f"write_pt takes numpy arrays, not {type(obj).__name__}; use .numpy()")
        return NotImplemented

    def persistent_id(self, obj: Any) -> Any:
        if isinstance(obj, _Storage):
            numel = obj.value.numel if isinstance(obj.value, Pieces) else int(obj.value.size)
            return ("storage", _STORAGE_MARKERS[_dtype_name(obj.value.dtype)], obj.key, "cpu", numel)
        return None


_STORAGE_MARKERS = {d: _StorageType(d) for d in _STORAGE_OF}
# The globals write_pt names, by object identity: everything read_pt maps, inverted.
_WRITE_NAMES: dict[int, str] = {
    **{id(v): k for k, v in _READ_GLOBALS.items() if not isinstance(v, (_StorageType, DType))},
    **{id(_STORAGE_MARKERS[d]): f"torch.{n}" for d, n in _STORAGE_OF.items()},
    id(_rebuild_parameter): "torch._utils._rebuild_parameter",
}


def write_pt(obj: Any, path: str, *, names: Mapping[Any, str] | None = None, fsync: bool = True) -> int:
    """Write `obj` as a `torch.save` file at `path` (fsynced before it is closed, unless
    `fsync=False`); returns the file's size.

    Args:
        obj: dicts, lists, tuples, plain values, numpy arrays and `Pieces` (written as tensors),
            the stand-ins of this module, and objects of the classes in `names`.
        path: the file to create (replaced if it exists).
        names: extra globals: object (a class or function) -> "module.name" to write for it.
    """
    table = dict(_WRITE_NAMES)
    for o, full in (names or {}).items():
        table[id(o)] = full
    buf = io.BytesIO()
    pickler = _Pickler(buf, table)
    pickler.dump(obj)
    archive = os.path.splitext(os.path.basename(path))[0] or "archive"
    small = [("data.pkl", buf.getvalue()), (".format_version", b"1"), (".storage_alignment", b"64"),
             ("byteorder", b"little")]
    tail = [("version", b"3\n"), (".data/serialization_id", str(secrets.randbits(128)).zfill(40).encode())]
    entries = [*small, *[(f"data/{s.key}", s.value) for s in pickler.storages], *tail]
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        zw = _ZipWriter(fd)
        for name, value in entries:
            zw.add(f"{archive}/{name}", value)
        size = zw.finish()
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)
    return size


class _ZipWriter:
    """A stored (uncompressed) zip written front to back, each record's data 64-byte aligned."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._pos = 0
        self._central: list[bytes] = []

    def add(self, name: str, value: bytes | np.ndarray | Pieces) -> None:
        raw = name.encode()
        if isinstance(value, bytes):
            size, crc = len(value), zlib.crc32(value)
        else:
            size, crc = _nbytes(value), 0
        offset = self._pos
        big = size >= _ZIP64_AT or offset >= _ZIP64_AT
        z64 = struct.pack("<HHQQ", 1, 16, size, size) if big else b""
        used = offset + 30 + len(raw) + len(z64)
        pad = -(used + 4) % _ALIGN
        extra = z64 + struct.pack("<HH", 0x4246, pad) + b"\0" * pad  # "FB": torch's padding field
        version = 45 if big else 20
        shown = 0xFFFFFFFF if big else size
        header = struct.pack("<IHHHHHIIIHH", 0x04034B50, version, 0x0800, 0, 0, 0x21, crc, shown, shown,
                             len(raw), len(extra)) + raw + extra
        self._emit(header)
        if isinstance(value, bytes):
            self._emit(value)
        else:
            self._emit_tensor(value)
        cz64 = b""
        if big:
            cz64 = struct.pack("<HHQQQ", 1, 24, size, size, offset)
        self._central.append(struct.pack(
            "<IHHHHHHIIIHHHHHII", 0x02014B50, version, version, 0x0800, 0, 0, 0x21, crc, shown, shown,
            len(raw), len(cz64), 0, 0, 0, 0, 0xFFFFFFFF if big else offset) + raw + cz64)

    def _emit(self, data: bytes | memoryview) -> None:
        view = memoryview(data).cast("B")
        total = len(view)
        while view:
            n = os.write(self._fd, view)
            view = view[n:]
        self._pos += total

    def _emit_tensor(self, value: np.ndarray | Pieces) -> None:
        parts: Iterable[np.ndarray] = value.parts if isinstance(value, Pieces) else (value,)
        for part in parts:
            if part.size == 0:
                continue
            if not part.flags.c_contiguous:
                part = np.ascontiguousarray(part)
            span = file_span(part)
            if span is not None and _copy_range(span[0], span[1], self._fd, part.nbytes):
                self._pos += part.nbytes
                continue
            self._emit(part.reshape(-1).view(np.uint8).data)

    def finish(self) -> int:
        start = self._pos
        for entry in self._central:
            self._emit(entry)
        cd_size = self._pos - start
        count = len(self._central)
        if start >= _ZIP64_AT or cd_size >= _ZIP64_AT or count >= 0xFFFF:
            eocd64 = self._pos
            self._emit(struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, 45, 45, 0, 0, count, count, cd_size, start))
            self._emit(struct.pack("<IIQI", 0x07064B50, 0, eocd64, 1))
            self._emit(struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, 0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0))
        else:
            self._emit(struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, count, count, cd_size, start, 0))
        return self._pos


def _nbytes(value: np.ndarray | Pieces) -> int:
    if isinstance(value, Pieces):
        return sum(int(p.nbytes) for p in value.parts)
    return int(value.nbytes)


_NO_COPY_RANGE: set[str] = set()  # source files where copy_file_range failed once


def _copy_range(src_path: str, src_offset: int, dst_fd: int, count: int) -> bool:
    """Copy `count` bytes from `src_path` at `src_offset` to `dst_fd`'s position in the kernel;
    False (nothing written) where the file systems do not support it."""
    if src_path in _NO_COPY_RANGE or not hasattr(os, "copy_file_range"):
        return False
    src = os.open(src_path, os.O_RDONLY)
    try:
        done = 0
        while done < count:
            try:
                n = os.copy_file_range(src, dst_fd, count - done, src_offset + done)
            except OSError:
                if done:
                    raise
                _NO_COPY_RANGE.add(src_path)
                return False
            if n == 0:
                raise OSError(f"{src_path} ended {count - done} bytes early")
            done += n
        return True
    finally:
        os.close(src)
