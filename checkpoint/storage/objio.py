"""Bytes to and from object storage: a streamed multipart upload and a ranged, verified reader.

`open_upload` returns a writable that `stfile.write_stream` writes a rank file into. On S3 (and
S3-compatible servers) it is our own multipart upload. Uncompressed, the parts are sent
straight from the host snapshot's tensors (`borrow`): the upload holds no copy of the data, and
each part is read by the HTTP client 256 KiB at a time (`PartBody`). A zstd stream fills part
buffers instead, at most `max_inflight + 1` of them. Up to `max_inflight` parts travel at once
while the stream goes on, so the network overlaps the hashing. Nothing is visible under the
object's name until the upload completes (S3 makes the object appear atomically); a process
killed midway leaves only unreferenced parts, which `abort` (or the bucket's lifecycle rule)
removes. Other fsspec backends (gcs, az, ...) get their own buffered writer with the same
bounded block size.

`RangedFile` is `stfile.StFile` for an object: it reads the header with one ranged GET and each
stored tensor with ranged GETs (split in parts fetched concurrently), verifies the tensor's
checksum before handing it out, and keeps only the tensors not yet released.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import struct
import warnings
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
import zstandard

from ..errors import CorruptCheckpointError, DataError
from ..format.integrity import checksum, new_hasher
from ..format.manifest import FileRecord
from ..format.stfile import torch_dtype

PART_BYTES = 16 << 20  # S3 parts must be >= 5 MiB (but the last); 16 MiB: few requests, small buffers
MAX_INFLIGHT = 4  # parts uploading while the next one fills (copy buffers: (4 + 1) x 16 MiB)
READ_PART_BYTES = 16 << 20  # a ranged read is split in parts this size, fetched concurrently
READ_WINDOW_BYTES = 64 << 20  # small tensors the reader will want are fetched together, up to this
_HEAD_GUESS = 64 << 10  # the first GET reads this much: most headers fit


class PartBody(io.RawIOBase):
    """The bytes of one part (a list of buffers, read in order) as the body of a request.

    Handed a bytes-like body, the HTTP client copies it whole: aiohttp slices a bytearray,
    joins the headers and the body into one new buffer (Python before 3.12.9), and asyncio's
    transport keeps a copy of what the socket did not take at once; up to three copies of every
    part in flight. Read as a stream, aiohttp sends 256 KiB at a time and waits for the socket,
    so a part costs nothing beyond the buffers it reads.

    The upload gives the part's CRC32 itself (`crc32_b64`), so botocore does not read the body
    to hash it: the HTTP client is its only reader, once per attempt. Every attempt reads the
    whole part from its start: aiohttp calls `tell()` before it reads a body, and s3fs retries
    a request with the same body object, so `tell()` starts the part again (botocore's own
    retries `seek(0)`). A body sent wrong would be refused by the store: its length and its
    checksum header are those of the whole part.
    """

    def __init__(self, segments: Sequence[bytes | bytearray | memoryview]) -> None:
        super().__init__()
        self._segs = [memoryview(s).cast("B") for s in segments]
        self._size = sum(len(s) for s in self._segs)
        self._pos = 0

    def __len__(self) -> int:
        return self._size

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        self._pos = 0  # a new reader (see the class docstring)
        return 0

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = min(max(base + offset, 0), self._size)
        return self._pos

    def read(self, size: int | None = -1) -> bytes:
        end = self._size if size is None or size < 0 else min(self._pos + size, self._size)
        out, at = [], 0
        for seg in self._segs:  # few segments: a part is 2-3 stream chunks or one buffer
            lo, hi = max(self._pos - at, 0), min(end - at, len(seg))
            if lo < hi:
                out.append(seg[lo:hi])
            at += len(seg)
            if at >= end:
                break
        self._pos = end
        return b"".join(out)

    def readinto(self, b: Any) -> int:
        data = self.read(len(b))
        memoryview(b).cast("B")[: len(data)] = data
        return len(data)

    def crc32_b64(self) -> str:
        """The part's CRC32 as S3's `x-amz-checksum-crc32` header carries it (base64, big-endian)."""
        crc = 0
        for seg in self._segs:
            crc = zlib.crc32(seg, crc)
        return base64.b64encode(crc.to_bytes(4, "big")).decode("ascii")

    def close(self) -> None:
        self._segs = []  # the buffers go back to their owner
        super().close()


def is_s3(fs: Any) -> bool:
    """Whether `fs` is s3fs (our multipart upload speaks its API)."""
    proto = fs.protocol if isinstance(fs.protocol, tuple | list) else (fs.protocol,)
    return "s3" in proto and hasattr(fs, "call_s3")


class S3Upload:
    """One object written by an S3 multipart upload from a stream (see the module docstring).

    With `borrow=True` the writer promises that the buffers it writes stay alive and unchanged
    until `close` or `abort` returns (the tensors of a host snapshot, pinned while the tier
    writes from them): the parts are sent straight from those buffers, so the upload holds no
    copy of the data at all. Otherwise `write` copies into part buffers, of which at most
    `max_inflight + 1` exist. Either way a full part is uploaded by a worker thread while the
    stream goes on, at most `max_inflight` at once. `close` uploads the last part and completes
    the upload (a file smaller than one part is one PUT); `abort` gives the parts back. The
    object exists only after `close` returns.
    """

    def __init__(
        self, fs: Any, path: str, *, part_bytes: int = PART_BYTES, max_inflight: int = MAX_INFLIGHT, borrow: bool = False
    ) -> None:
        if part_bytes < 5 << 20:
            raise ValueError(f"part_bytes must be >= 5 MiB (an S3 limit), got {part_bytes}")
        self._fs = fs
        self._bucket, self._key, _ = fs.split_path(path)
        self._part_bytes = part_bytes
        self._max_inflight = max_inflight
        self._borrow = borrow
        self._pool = ThreadPoolExecutor(max_workers=max_inflight, thread_name_prefix="elastickit-upload")
        self._segs: list[memoryview] = []  # the next part: borrowed buffers, or one copy buffer
        self._gathered = 0  # bytes in `_segs`
        self._buf = bytearray() if borrow else bytearray(part_bytes)
        self._inflight: list[tuple[Future[dict[str, Any]], bytearray | None]] = []
        self._parts: list[dict[str, Any]] = []
        self._upload_id: str | None = None
        self.size = 0

    def write(self, data: bytes | memoryview) -> int:
        view = memoryview(data).cast("B")
        if self._borrow:
            if len(view):
                self._segs.append(view)
                self._gathered += len(view)
            if self._gathered >= self._part_bytes:
                self._send()
        else:
            pos = 0
            while pos < len(view):
                n = min(self._part_bytes - self._gathered, len(view) - pos)
                self._buf[self._gathered : self._gathered + n] = view[pos : pos + n]
                self._gathered += n
                pos += n
                if self._gathered == self._part_bytes:
                    self._send()
        self.size += len(view)
        return len(view)

    def _call(self, method: str, **kwargs: Any) -> dict[str, Any]:
        return self._fs.call_s3(method, Bucket=self._bucket, Key=self._key, **kwargs)

    def _part(self) -> list[memoryview]:
        """The bytes gathered for the next part (taken: the next part starts empty)."""
        segs = self._segs if self._borrow else [memoryview(self._buf)[: self._gathered]]
        self._segs, self._gathered = [], 0
        return segs

    def _send(self) -> None:
        """Upload the gathered part in the background; with copy buffers, take a free one."""
        if self._upload_id is None:
            self._upload_id = self._call("create_multipart_upload")["UploadId"]
        number = len(self._parts) + len(self._inflight) + 1
        buf = None if self._borrow else self._buf
        fut = self._pool.submit(self._send_part, number, self._part())
        self._inflight.append((fut, buf))
        if self._borrow:
            if len(self._inflight) > self._max_inflight:
                self._reap_one()
        elif len(self._inflight) <= self._max_inflight:
            self._buf = bytearray(self._part_bytes)
        else:
            self._buf = self._reap_one()  # type: ignore[assignment]

    def _send_part(self, number: int, segs: list[memoryview]) -> dict[str, Any]:
        with PartBody(segs) as body:
            return self._call(
                "upload_part", UploadId=self._upload_id, PartNumber=number, Body=body, ChecksumCRC32=body.crc32_b64()
            )

    def _reap_one(self) -> bytearray | None:
        """Wait for the oldest part in flight; returns its copy buffer for reuse."""
        fut, buf = self._inflight.pop(0)
        out = fut.result()
        self._parts.append({"PartNumber": len(self._parts) + 1, "ETag": out["ETag"]})
        return buf

    def close(self) -> None:
        """Upload what is left and complete the object (raises on any failed part)."""
        try:
            if self._upload_id is None:  # smaller than one part: one PUT
                with PartBody(self._part()) as body:
                    self._call("put_object", Body=body, ChecksumCRC32=body.crc32_b64())
                return
            if self._gathered:
                self._send()
            while self._inflight:
                self._reap_one()
            self._call(
                "complete_multipart_upload", UploadId=self._upload_id, MultipartUpload={"Parts": self._parts}
            )
            self._fs.invalidate_cache(f"{self._bucket}/{self._key}")
        except BaseException:
            self.abort()
            raise
        finally:
            self._pool.shutdown(wait=False)
            self._segs, self._buf = [], bytearray()

    def abort(self) -> None:
        """Give back the parts uploaded so far (best effort: a bucket lifecycle rule for
        incomplete multipart uploads catches what a killed process leaves). Returns once no
        part is being read any more."""
        for fut, _ in self._inflight:
            fut.cancel()
        self._inflight.clear()
        self._pool.shutdown(wait=True)
        self._segs = []
        if self._upload_id is not None:
            with contextlib.suppress(Exception):  # the upload failed already; that error is raised
                self._call("abort_multipart_upload", UploadId=self._upload_id)
            self._upload_id = None


class FsspecUpload:
    """Any other fsspec backend: its own buffered writer, blocks of `part_bytes`."""

    def __init__(self, fs: Any, path: str, *, part_bytes: int = PART_BYTES) -> None:
        self._f = fs.open(path, "wb", block_size=part_bytes)
        self.size = 0

    def write(self, data: bytes | memoryview) -> int:
        n = self._f.write(data)
        self.size += len(data)
        return n

    def close(self) -> None:
        self._f.close()

    def abort(self) -> None:
        discard = getattr(self._f, "discard", None)
        if discard is not None:
            discard()
        else:  # a local or in-memory file: nothing half-visible to undo beyond closing it
            self._f.close()


def open_upload(fs: Any, path: str, *, part_bytes: int = PART_BYTES, borrow: bool = False) -> S3Upload | FsspecUpload:
    """A writable for one object (see the module docstring; `borrow`: see `S3Upload`)."""
    if is_s3(fs):
        return S3Upload(fs, path, part_bytes=part_bytes, borrow=borrow)
    return FsspecUpload(fs, path, part_bytes=part_bytes)


def _first_line(e: BaseException) -> str:
    return (str(e).splitlines() or [""])[0]


@dataclass(frozen=True, slots=True)
class _Entry:
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


def fetch_parts(fs: Any, path: str, starts: list[int], ends: list[int]) -> list[bytes]:
    """The ranges [starts[i], ends[i]) of an object, fetched concurrently where the backend can;
    raises the first failure, and EOFError for a range the store returned short."""
    parts = fs.cat_ranges([path] * len(starts), starts, ends)
    for s, e, p in zip(starts, ends, parts, strict=True):
        if isinstance(p, BaseException):
            raise p
        if len(p) != e - s:
            raise EOFError(f"the store returned {len(p)} bytes for bytes {s}-{e}; the object is shorter than its listing")
    return parts


def fetch(
    fs: Any, path: str, start: int, end: int, *, part_bytes: int = READ_PART_BYTES, batch: int = 4
) -> bytes | bytearray:
    """Bytes [start, end) of an object. A range of more than one part is fetched `batch` parts
    at a time (concurrently where the backend can) into one buffer, so that a large tensor
    costs itself plus one batch, not twice itself (its parts and their join)."""
    if end <= start:  # an empty range would read to the end of the object
        return b""
    if end - start <= part_bytes:
        return fs.cat_file(path, start=start, end=end)
    out = bytearray(end - start)
    step = part_bytes * max(1, batch)
    for lo in range(start, end, step):
        hi = min(lo + step, end)
        starts = list(range(lo, hi, part_bytes))
        ends = [min(s + part_bytes, hi) for s in starts]
        for s, e, p in zip(starts, ends, fetch_parts(fs, path, starts, ends), strict=True):
            out[s - start : e - start] = p
    return out


class RangedFile:
    """A safetensors object read by ranged GETs, verified against its FileRecord.

    The interface of `stfile.StFile` (`keys`, `raw`, `tensor`, `release`, `verify_all`, a
    context manager), so that the reshard executor and `verify` read objects as they read files.
    `label` names the object in errors (its URL, without credentials).
    """

    def __init__(self, fs: Any, path: str, record: FileRecord | None, *, label: str, verify: bool = True) -> None:
        self.path = label
        self.record = record
        self.verify = verify and record is not None
        self._fs, self._obj = fs, path
        self._held: dict[str, bytes | memoryview] = {}  # fetched, not yet released
        self._verified: set[str] = set()
        self._order: list[str] = []  # the keys the reader said it reads, in its order
        self._pos: dict[str, int] = {}
        self._whole: bytes | None = None
        try:
            fs.invalidate_cache(path)  # a listing cached earlier may hold an older size
            size = int(fs.info(path)["size"])
        except FileNotFoundError:
            raise CorruptCheckpointError(
                f"{label} is missing; the checkpoint is incomplete, restore an earlier one", path=label
            ) from None
        except Exception as e:
            raise DataError(f"cannot read {label} ({type(e).__name__}: {_first_line(e)})", path=label) from e
        if record is not None and size != record.size_bytes:
            raise CorruptCheckpointError(
                f"{label} is {size} bytes but the manifest recorded {record.size_bytes} "
                "(truncated or overwritten); restore an earlier checkpoint",
                path=label,
            )
        self._size = size
        if record is not None and record.compression == "zstd":
            stored = self._read(0, size)
            if self.verify and checksum(stored) != record.stored_checksum:
                raise CorruptCheckpointError(f"{label} does not match its checksum; restore an earlier checkpoint", path=label)
            try:
                self._whole = zstandard.ZstdDecompressor().decompressobj().decompress(stored)
            except zstandard.ZstdError as e:
                raise CorruptCheckpointError(f"{label} is not a valid zstd frame ({e})", path=label) from e
            self._size = len(self._whole)
        self._entries = self._parse_header()

    def _read(self, start: int, end: int) -> bytes | bytearray:
        if self._whole is not None:
            return self._whole[start:end]
        try:
            return fetch(self._fs, self._obj, start, end)
        except Exception as e:  # the store's failures are many: one sentence
            raise DataError(f"cannot read {self.path} ({type(e).__name__}: {_first_line(e)})", path=self.path) from e

    def _parse_header(self) -> dict[str, _Entry]:
        label = self.path
        if self._size < 8:
            raise CorruptCheckpointError(f"{label} is too short to be a safetensors file", path=label)
        first = self._read(0, min(self._size, _HEAD_GUESS))
        (n,) = struct.unpack("<Q", first[:8])
        if n > self._size - 8:
            raise CorruptCheckpointError(f"{label} has a header length past its end (truncated or corrupt)", path=label)
        head = first[: 8 + n] if 8 + n <= len(first) else first + self._read(len(first), 8 + n)
        if self.verify and checksum(head) != self.record.header_checksum:  # type: ignore[union-attr]
            raise CorruptCheckpointError(
                f"{label} has a corrupt header (checksum mismatch); restore an earlier checkpoint", path=label
            )
        try:
            header = json.loads(head[8:])
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CorruptCheckpointError(f"{label} has an unreadable header ({e})", path=label) from e
        start = 8 + n
        entries: dict[str, _Entry] = {}
        for key, v in header.items():
            if key == "__metadata__":
                continue
            b, e = v["data_offsets"]
            if start + e > self._size:
                raise CorruptCheckpointError(f"{label}: tensor {key!r} reaches past the end of the file (truncated)", path=label, tensor=key)
            entries[key] = _Entry(v["dtype"], tuple(v["shape"]), start + b, start + e)
        return entries

    def keys(self) -> list[str]:
        return list(self._entries)

    def will_read(self, keys: list[str]) -> None:
        """Say which tensors will be read, in order: small ones are then fetched several at a
        time (one window of concurrent ranged GETs, at most READ_WINDOW_BYTES held ahead)
        rather than one request each."""
        self._order = list(dict.fromkeys(k for k in keys if k in self._entries))
        self._pos = {k: i for i, k in enumerate(self._order)}

    def _fill(self, key: str) -> None:
        """Fetch `key` and, when the reader announced its keys, the next ones up to the window."""
        window = [key]
        size = self._entries[key].end - self._entries[key].begin
        i = self._pos.get(key)
        if i is not None and self._whole is None:
            for k in self._order[i + 1 :]:
                n = self._entries[k].end - self._entries[k].begin
                if k in self._held or size + n > READ_WINDOW_BYTES:
                    break
                window.append(k)
                size += n
        if len(window) == 1:
            e = self._entries[key]
            self._held[key] = self._read(e.begin, e.end)
            return
        # Adjacent tensors share one range; each range is split in parts fetched at once.
        spans = sorted((self._entries[k].begin, self._entries[k].end) for k in window)
        merged: list[list[int]] = []
        for b, e in spans:
            if merged and b <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], e)
            else:
                merged.append([b, e])
        starts, ends = [], []
        for b, e in merged:
            for s in range(b, e, READ_PART_BYTES):
                starts.append(s)
                ends.append(min(s + READ_PART_BYTES, e))
        try:
            parts = fetch_parts(self._fs, self._obj, starts, ends)
        except Exception as e:
            raise DataError(f"cannot read {self.path} ({type(e).__name__}: {_first_line(e)})", path=self.path) from e
        # Each tensor is a view of the part that holds it (no copy); only a tensor that spans
        # parts is joined. The parts live until the last tensor viewing them is released.
        got = sorted(zip(starts, parts, strict=True))
        for k in window:
            ent = self._entries[k]
            covering = [(s, p) for s, p in got if s < ent.end and s + len(p) > ent.begin]
            if len(covering) == 1:
                s, p = covering[0]
                self._held[k] = memoryview(p)[ent.begin - s : ent.end - s]
            else:  # spans parts (or is empty)
                self._held[k] = b"".join(memoryview(p)[max(ent.begin - s, 0) : ent.end - s] for s, p in covering)

    def raw(self, key: str) -> memoryview:
        """The tensor's bytes (ranged reads), verified against the manifest."""
        if key not in self._entries:
            raise CorruptCheckpointError(
                f"{self.path} has no tensor {key!r} although the manifest lists it", path=self.path, tensor=key
            )
        if key not in self._held:
            self._fill(key)
        data = self._held[key]
        if self.verify and key not in self._verified:
            want = self.record.tensor_checksums.get(key)  # type: ignore[union-attr]
            if want is None or checksum(data) != want:
                raise CorruptCheckpointError(
                    f"{self.path}: tensor {key!r} does not match its checksum; restore an earlier checkpoint",
                    path=self.path,
                    tensor=key,
                )
            self._verified.add(key)
        return memoryview(data)

    def tensor(self, key: str) -> torch.Tensor:
        """A read-only tensor over the verified bytes of `key` (readers copy out of it)."""
        data = self.raw(key)
        e = self._entries[key]
        dtype = torch_dtype(e.dtype)
        if len(data) == 0:
            return torch.empty(e.shape, dtype=dtype)
        with warnings.catch_warnings():  # the bytes are immutable; nobody writes through the view
            warnings.simplefilter("ignore", UserWarning)
            return torch.frombuffer(data, dtype=dtype).reshape(e.shape)

    def release(self, key: str) -> None:
        """Forget the bytes of `key` (memory stays about one window of stored tensors)."""
        self._held.pop(key, None)
        self._verified.discard(key)

    def verify_all(self, chunk_bytes: int = READ_PART_BYTES) -> list[str]:
        """Keys whose bytes do not match, read in bounded chunks (the header is checked on open)."""
        bad = []
        for key, e in self._entries.items():
            want = self.record.tensor_checksums.get(key) if self.record is not None else None
            h = new_hasher()
            for start in range(e.begin, e.end, chunk_bytes):
                h.update(self._read(start, min(start + chunk_bytes, e.end)))
            if want is None or h.hexdigest() != want:
                bad.append(key)
        if self.record is not None:
            bad.extend(sorted(set(self.record.tensor_checksums) - set(self._entries)))
        return bad

    def close(self) -> None:
        self._held.clear()
        self._whole = None

    def __enter__(self) -> RangedFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


Opener = Callable[[str, FileRecord], Any]
"""`(file name, record) -> a StFile-like context manager`: how a reader opens a checkpoint's
rank files, wherever they are."""
