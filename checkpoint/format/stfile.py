"""Reading and writing safetensors files, with checksums taken in the same pass.

The files are plain safetensors (any safetensors reader opens them): an 8-byte little-endian
header length, a JSON header padded with spaces to a multiple of 8, then the tensors' bytes back
to back. Writing them here rather than through `safetensors.torch.save_file` lets us stream each
tensor straight from its memory (no whole-file bytes object), hash it while it is hot in cache,
fsync, and optionally compress, in one pass.

Reading memory-maps the file and hands out zero-copy tensor views; a tensor's checksum is
verified the first time it is touched.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO

import torch
import zstandard

from ..errors import CorruptCheckpointError
from .integrity import checksum, new_hasher
from .manifest import FileRecord

TORCH_TO_ST: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
for _name, _st in (
    ("float8_e4m3fn", "F8_E4M3"),
    ("float8_e5m2", "F8_E5M2"),
    ("uint16", "U16"),
    ("uint32", "U32"),
    ("uint64", "U64"),
):
    if hasattr(torch, _name):
        TORCH_TO_ST[getattr(torch, _name)] = _st
ST_TO_TORCH: dict[str, torch.dtype] = {v: k for k, v in TORCH_TO_ST.items()}

_CHUNK_BYTES = 8 << 20  # hash and write in cache-sized pieces


def st_dtype(dtype: torch.dtype, *, what: str = "tensor") -> str:
    """The safetensors dtype name of a torch dtype, or a clear error."""
    try:
        return TORCH_TO_ST[dtype]
    except KeyError:
        raise ValueError(f"{what} has dtype {dtype}, which the checkpoint format cannot store") from None


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a safetensors dtype name."""
    return ST_TO_TORCH[name]


def as_bytes(t: torch.Tensor) -> memoryview:
    """A zero-copy byte view of a contiguous CPU tensor."""
    flat = t.reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")


def _header_bytes(items: Sequence[tuple[str, torch.Tensor]], metadata: dict[str, str]) -> bytes:
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = metadata
    offset = 0
    for key, t in items:
        n = t.numel() * t.element_size()
        header[key] = {
            "dtype": st_dtype(t.dtype, what=f"tensor {key!r}"),
            "shape": list(t.shape),
            "data_offsets": [offset, offset + n],
        }
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


class _ZstdSink:
    """Writes through a zstd frame and hashes what it stores."""

    def __init__(self, f: BinaryIO, level: int, threads: int) -> None:
        self._stored = new_hasher()
        self._f = f
        cctx = zstandard.ZstdCompressor(level=level, threads=threads)
        self._w = cctx.stream_writer(self, closefd=False)

    def write(self, data: bytes | memoryview) -> int:  # called by zstd with compressed bytes
        self._stored.update(data)
        return self._f.write(data)

    def put(self, data: bytes | memoryview) -> None:
        self._w.write(data)

    def close(self) -> str:
        self._w.flush(zstandard.FLUSH_FRAME)
        return self._stored.hexdigest()


def write_file(
    path: str,
    items: Sequence[tuple[str, torch.Tensor]],
    *,
    rank: int = 0,
    fsync: bool = True,
    zstd_level: int | None = None,
    zstd_threads: int = 0,
    metadata: dict[str, str] | None = None,
    before_item: Callable[[str], None] | None = None,
) -> FileRecord:
    """Write CPU tensors as one safetensors file and return its FileRecord.

    `before_item(key)` is called before a tensor's bytes are read (a snapshot still being
    copied blocks there until that tensor is ready, so writing overlaps the copy).

    Each tensor is hashed and written in the same pass. With `zstd_level`, the file is one zstd
    frame of the same bytes (`.safetensors.zst`). With `fsync`, the data is durable on return (the
    caller fsyncs the directory once for all files).
    """
    items = [(k, t if t.is_contiguous() else t.contiguous()) for k, t in items]
    for k, t in items:
        if t.device.type != "cpu":
            raise ValueError(f"tensor {k!r} is on {t.device}; copy it to host memory before writing")
    head = _header_bytes(items, metadata or {})
    checksums: dict[str, str] = {}
    total = len(head) + sum(t.numel() * t.element_size() for _, t in items)
    if fsync and zstd_level is None and total >= _DIRECT_MIN_BYTES:
        direct = _write_direct(path, head, items, checksums, before_item)
        if direct is not None:
            return FileRecord(
                name=os.path.basename(path),
                size_bytes=direct,
                header_checksum=checksum(head),
                tensor_checksums=checksums,
                rank=rank,
            )
        checksums.clear()
    with open(path, "wb", buffering=0) as f:
        record = write_stream(
            f,
            items,
            name=os.path.basename(path),
            rank=rank,
            zstd_level=zstd_level,
            zstd_threads=zstd_threads,
            head=head,
            before_item=before_item,
        )
        if fsync:
            os.fsync(f.fileno())
    return record


def write_stream(
    f: BinaryIO,
    items: Sequence[tuple[str, torch.Tensor]],
    *,
    name: str,
    rank: int = 0,
    zstd_level: int | None = None,
    zstd_threads: int = 0,
    metadata: dict[str, str] | None = None,
    head: bytes | None = None,
    before_item: Callable[[str], None] | None = None,
) -> FileRecord:
    """Write CPU tensors as one safetensors stream to `f` (anything with `write`: a file, an
    object-store upload) and return its FileRecord, named `name`.

    The bytes and checksums are those `write_file` writes; `f` is neither flushed nor closed.
    """
    if head is None:
        items = [(k, t if t.is_contiguous() else t.contiguous()) for k, t in items]
        for k, t in items:
            if t.device.type != "cpu":
                raise ValueError(f"tensor {k!r} is on {t.device}; copy it to host memory before writing")
        head = _header_bytes(items, metadata or {})
    checksums: dict[str, str] = {}
    size = 0

    def count(data: bytes | memoryview) -> int:
        nonlocal size
        size += len(data)
        return f.write(data)

    sink = _ZstdSink(_Counted(count), zstd_level, zstd_threads) if zstd_level is not None else None
    put = sink.put if sink is not None else count
    put(head)
    _stream(items, checksums, before_item, put)
    stored = sink.close() if sink is not None else ""
    return FileRecord(
        name=name,
        size_bytes=size,
        header_checksum=checksum(head),
        tensor_checksums=checksums,
        compression="zstd" if sink is not None else "none",
        stored_checksum=stored,
        rank=rank,
    )


class _Counted:
    """A writable that hands every write to a function (zstd writes its frames here)."""

    def __init__(self, write: Callable[[bytes | memoryview], int]) -> None:
        self.write = write


def _stream(
    items: Sequence[tuple[str, torch.Tensor]],
    checksums: dict[str, str],
    before_item: Callable[[str], None] | None,
    put: Callable[[memoryview], Any],
) -> None:
    """Hand every tensor's bytes to `put` in cache-sized pieces, hashing each piece as it goes
    (one pass over memory), and record each tensor's checksum."""
    for key, t in items:
        if before_item is not None:
            before_item(key)
        h = new_hasher()
        view = as_bytes(t)
        for start in range(0, len(view), _CHUNK_BYTES):
            part = view[start : start + _CHUNK_BYTES]
            h.update(part)
            put(part)
        checksums[key] = h.hexdigest()


_DIRECT_MIN_BYTES = 32 << 20
_DIRECT_BUF_BYTES = 16 << 20
_DIRECT_ALIGN = 4096


def _write_all(fd: int, data: memoryview) -> None:
    while len(data):
        n = os.write(fd, data)
        data = data[n:]


def _write_direct(
    path: str,
    head: bytes,
    items: Sequence[tuple[str, torch.Tensor]],
    checksums: dict[str, str],
    before_item: Callable[[str], None] | None = None,
) -> int | None:
    """Write a large durable file with O_DIRECT through one aligned bounce buffer.

    Durable writes through the page cache copy every byte twice (into the cache, then to the
    disk at fsync) and stall on writeback; O_DIRECT writes from the buffer at disk speed. Returns
    the file size, or None where the file system refuses O_DIRECT (tmpfs): then the caller
    writes through the page cache.
    """
    import fcntl
    import mmap as _mmap

    if not hasattr(os, "O_DIRECT"):
        return None
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
    except OSError:
        return None
    buf = _mmap.mmap(-1, _DIRECT_BUF_BYTES)  # page-aligned, as O_DIRECT requires
    mv = memoryview(buf)
    fill = 0
    size = 0
    try:

        def put(data: memoryview) -> None:
            nonlocal fill
            pos = 0
            while pos < len(data):
                n = min(_DIRECT_BUF_BYTES - fill, len(data) - pos)
                mv[fill : fill + n] = data[pos : pos + n]
                fill += n
                pos += n
                if fill == _DIRECT_BUF_BYTES:
                    _write_all(fd, mv)
                    fill = 0

        try:
            put(memoryview(head))
            _stream(items, checksums, before_item, put)
            aligned = fill // _DIRECT_ALIGN * _DIRECT_ALIGN
            if aligned:
                _write_all(fd, mv[:aligned])
        except OSError as e:
            if e.errno != 22:  # EINVAL: this file system does not take O_DIRECT writes
                raise
            os.close(fd)
            fd = -1
            return None
        # The tail is shorter than a block: write it through the page cache.
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_DIRECT)
        _write_all(fd, mv[aligned:fill])
        os.fsync(fd)
        size = os.fstat(fd).st_size
    finally:
        if fd >= 0:
            os.close(fd)
        mv.release()
        buf.close()
    return size


@dataclass(frozen=True, slots=True)
class _Entry:
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


class StFile:
    """A memory-mapped safetensors file whose tensors are verified against a FileRecord.

    Use as a context manager. `tensor(key)` returns a zero-copy view (read-only in spirit: the
    mapping is copy-on-write, so writes never reach the file). A compressed file is decompressed
    into memory once.
    """

    def __init__(self, path: str, record: FileRecord | None = None, *, verify: bool = True) -> None:
        self.path = path
        self.record = record
        self.verify = verify and record is not None
        self._verified: set[str] = set()
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise CorruptCheckpointError(
                f"{path} is missing; the checkpoint is incomplete, restore an earlier one",
                path=path,
            ) from None
        try:
            size = os.fstat(fd).st_size
            if record is not None and size != record.size_bytes:
                raise CorruptCheckpointError(
                    f"{path} is {size} bytes but the manifest recorded {record.size_bytes} "
                    "(truncated or overwritten); restore an earlier checkpoint",
                    path=path,
                )
            if record is not None and record.compression == "zstd":
                with os.fdopen(os.dup(fd), "rb") as f:
                    stored = f.read()
                if self.verify and checksum(stored) != record.stored_checksum:
                    raise CorruptCheckpointError(
                        f"{path} does not match its checksum; restore an earlier checkpoint",
                        path=path,
                    )
                try:
                    self._buf: mmap.mmap | bytearray = bytearray(
                        zstandard.ZstdDecompressor().decompressobj().decompress(stored)
                    )
                except zstandard.ZstdError as e:
                    raise CorruptCheckpointError(f"{path} is not a valid zstd frame ({e})", path=path) from e
            elif size == 0:
                self._buf = bytearray()
            else:
                self._buf = mmap.mmap(fd, size, access=mmap.ACCESS_COPY)
        finally:
            os.close(fd)
        self._mv = memoryview(self._buf)
        self._entries = self._parse_header()

    def _parse_header(self) -> dict[str, _Entry]:
        mv = self._mv
        if len(mv) < 8:
            raise CorruptCheckpointError(f"{self.path} is too short to be a safetensors file", path=self.path)
        (n,) = struct.unpack("<Q", mv[:8])
        if n > len(mv) - 8:
            raise CorruptCheckpointError(
                f"{self.path} has a header length past its end (truncated or corrupt)", path=self.path
            )
        if self.verify and checksum(mv[: 8 + n]) != self.record.header_checksum:  # type: ignore[union-attr]
            raise CorruptCheckpointError(
                f"{self.path} has a corrupt header (checksum mismatch); restore an earlier checkpoint",
                path=self.path,
            )
        try:
            header = json.loads(bytes(mv[8 : 8 + n]))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CorruptCheckpointError(f"{self.path} has an unreadable header ({e})", path=self.path) from e
        self._data_start = 8 + n
        entries: dict[str, _Entry] = {}
        for key, v in header.items():
            if key == "__metadata__":
                continue
            b, e = v["data_offsets"]
            if self._data_start + e > len(mv):
                raise CorruptCheckpointError(
                    f"{self.path}: tensor {key!r} reaches past the end of the file (truncated)",
                    path=self.path,
                    tensor=key,
                )
            entries[key] = _Entry(v["dtype"], tuple(v["shape"]), self._data_start + b, self._data_start + e)
        return entries

    def keys(self) -> list[str]:
        return list(self._entries)

    def raw(self, key: str) -> memoryview:
        """The tensor's bytes, verified against the manifest on first access."""
        try:
            e = self._entries[key]
        except KeyError:
            raise CorruptCheckpointError(
                f"{self.path} has no tensor {key!r} although the manifest lists it", path=self.path, tensor=key
            ) from None
        data = self._mv[e.begin : e.end]
        if self.verify and key not in self._verified:
            want = self.record.tensor_checksums.get(key)  # type: ignore[union-attr]
            if want is None or checksum(data) != want:
                raise CorruptCheckpointError(
                    f"{self.path}: tensor {key!r} does not match its checksum; "
                    "restore an earlier checkpoint",
                    path=self.path,
                    tensor=key,
                )
            self._verified.add(key)
        return data

    def tensor(self, key: str) -> torch.Tensor:
        """A zero-copy tensor view of `key` (verified first)."""
        data = self.raw(key)
        e = self._entries[key]
        dtype = torch_dtype(e.dtype)
        if len(data) == 0:
            return torch.empty(e.shape, dtype=dtype)
        return torch.frombuffer(data, dtype=dtype).reshape(e.shape)

    def release(self, key: str) -> None:
        """Give the mapped pages of `key` back to the kernel (its views must no longer be used
        for anything but re-reading: the pages come back from the file on the next access).

        A reader that is done with a tensor calls it so that resident memory stays about one
        stored tensor, not one file."""
        e = self._entries.get(key)
        if e is None or not isinstance(self._buf, mmap.mmap) or not hasattr(mmap, "MADV_DONTNEED"):
            return
        page = mmap.PAGESIZE
        start = e.begin - e.begin % page
        if e.end > start:
            self._buf.madvise(mmap.MADV_DONTNEED, start, e.end - start)

    def verify_all(self) -> list[str]:
        """Keys whose bytes do not match (the header is checked on open)."""
        bad = []
        for key in self._entries:
            try:
                self.raw(key)
            except CorruptCheckpointError:
                bad.append(key)
        if self.record is not None:
            bad.extend(sorted(set(self.record.tensor_checksums) - set(self._entries)))
        return bad

    def close(self) -> None:
        # Tensor views handed out keep the mapping alive; then the GC unmaps it later.
        try:
            self._mv.release()
            if isinstance(self._buf, mmap.mmap):
                self._buf.close()
        except BufferError:
            pass

    def __enter__(self) -> StFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

