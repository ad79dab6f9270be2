"""The multipart upload's parts, without a server: what each request's body reads, and that a
borrowed upload holds no copy of the data (Python's own allocations, traced)."""

from __future__ import annotations

import base64
import hashlib
import io
import tracemalloc
import zlib

import pytest
from elastickit.checkpoint.storage.objio import PartBody, RangedFile, S3Upload


def test_a_part_body_reads_its_segments_whole_for_every_reader():
    body = PartBody([b"abc", bytearray(b""), memoryview(b"defgh"), b"ij"])
    assert len(body) == 10
    assert body.tell() == 0 and body.read(4) == b"abcd"
    assert body.read(100) == b"efghij" and body.read(1) == b""
    # A new reader (a checksum pass, the HTTP client, a retry) starts at the beginning, even
    # after a reader that stopped midway.
    body.read(0)
    assert body.tell() == 0 and body.read() == b"abcdefghij"
    assert body.seek(0, io.SEEK_END) == 10 and body.seek(-3, io.SEEK_CUR) == 7
    buf = bytearray(8)
    assert body.readinto(buf) == 3 and bytes(buf[:3]) == b"hij"


class _RecordingS3:
    """Just enough of s3fs for `S3Upload`: it reads each body as the HTTP client would (256 KiB
    at a time) and remembers what it got."""

    protocol = ("s3",)

    def __init__(self):
        self.parts: dict[int, bytes] = {}
        self.digest = hashlib.sha256()
        self.sizes: list[int] = []

    def split_path(self, path):
        bucket, _, key = path.partition("/")
        return bucket, key, None

    def invalidate_cache(self, path=None):
        pass

    def call_s3(self, method, **kw):
        if method == "create_multipart_upload":
            return {"UploadId": "u1"}
        if method in ("upload_part", "put_object"):
            body, n, crc = kw["Body"], 0, 0
            body.tell()
            for chunk in iter(lambda: body.read(256 << 10), b""):
                self.digest.update(chunk)
                crc = zlib.crc32(chunk, crc)
                n += len(chunk)
            self.sizes.append(n)
            assert kw["ChecksumCRC32"] == base64.b64encode(crc.to_bytes(4, "big")).decode()
            return {"ETag": f"e{kw.get('PartNumber', 0)}"}
        return {}


@pytest.mark.parametrize("borrow", [True, False])
def test_a_borrowed_upload_holds_no_copy_of_the_data(borrow):
    src = bytearray(range(256)) * ((48 << 20) // 256)  # 48 MiB, written in 8 MiB pieces
    fs = _RecordingS3()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        up = S3Upload(fs, "bucket/key", part_bytes=16 << 20, max_inflight=2, borrow=borrow)
        view = memoryview(src)
        for i in range(0, len(view), 8 << 20):
            up.write(view[i : i + (8 << 20)])
        up.close()
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert fs.sizes == [16 << 20] * 3
    assert fs.digest.hexdigest() == hashlib.sha256(src).hexdigest()
    if borrow:
        assert peak < 4 << 20  # a few 256 KiB reads in flight; no part buffer
    else:
        assert peak >= 16 << 20  # the copying path holds part buffers (what borrow avoids)


def test_the_part_checksum_is_the_one_botocore_would_send():
    # The upload sends x-amz-checksum-crc32 itself (botocore then leaves the body unread): it
    # must be exactly the value botocore computes for the same bytes.
    httpchecksum = pytest.importorskip("botocore.httpchecksum", reason="botocore comes with the s3 extra")
    data = bytes(range(256)) * 4097
    body = PartBody([data[:1000], data[1000:]])
    assert body.crc32_b64() == httpchecksum.Crc32Checksum().handle(data)
    assert PartBody([]).crc32_b64() == httpchecksum.Crc32Checksum().handle(b"")


class _ServedObject:
    """Just enough of an fsspec filesystem for `RangedFile`: one object, served by range (each
    range a new bytes object, as a real client returns)."""

    def __init__(self, data: bytes):
        self.data = data

    def invalidate_cache(self, path=None):
        pass

    def info(self, path):
        return {"size": len(self.data)}

    def cat_file(self, path, start=None, end=None):
        return self.data[start:end]

    def cat_ranges(self, paths, starts, ends):
        return [self.data[s:e] for s, e in zip(starts, ends, strict=True)]


def test_a_ranged_read_hands_out_views_of_the_fetched_parts():
    # 8 tensors of 4 MiB (one 32 MiB window, fetched as two 16 MiB ranged GETs): each tensor
    # is a view of the part that holds it, so reading the window costs the parts and little
    # more (it once cost the parts, their join and a copy of every tensor: three times).
    import torch
    from elastickit.checkpoint.format.stfile import write_stream

    items = [(f"t{i}", torch.full((1 << 20,), float(i))) for i in range(8)]
    out = io.BytesIO()
    record = write_stream(out, items, name="rank-00000.safetensors")
    fs = _ServedObject(out.getvalue())
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        with RangedFile(fs, "obj", record, label="s3://b/obj") as f:
            f.will_read([k for k, _ in items])
            for k, t in items:
                assert torch.equal(f.tensor(k), t)
                f.release(k)
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert peak < 40 << 20  # the 32 MiB window, not 96


def test_a_large_range_is_assembled_batch_by_batch():
    # A 48 MiB tensor read in 1 MiB parts, 4 at a time: it costs itself and one batch, where
    # fetching every part and joining them cost twice itself.
    from elastickit.checkpoint.storage.objio import fetch

    data = bytes(range(256)) * ((48 << 20) // 256)
    fs = _ServedObject(b"head" + data)
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        got = fetch(fs, "obj", 4, 4 + len(data), part_bytes=1 << 20, batch=4)
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert got == data
    assert peak < (48 << 20) + (8 << 20)
    assert fetch(fs, "obj", 4, 4) == b""


def test_a_short_ranged_read_is_named():
    from elastickit.checkpoint.storage.objio import fetch

    class Short(_ServedObject):
        def cat_ranges(self, paths, starts, ends):
            return [self.data[s : e - 1] for s, e in zip(starts, ends, strict=True)]

    with pytest.raises(EOFError, match="returned 1048575 bytes for bytes 0-1048576"):
        fetch(Short(bytes(3 << 20)), "obj", 0, 3 << 20, part_bytes=1 << 20)


def test_a_tensor_larger_than_the_read_window_comes_back_whole_and_verified():
    # 72 MiB: beyond the 64 MiB window, read alone in 16 MiB parts assembled batch by batch.
    import torch
    from elastickit.checkpoint.errors import CorruptCheckpointError
    from elastickit.checkpoint.format.stfile import write_stream

    big = torch.arange(18 << 20, dtype=torch.float32)
    items = [("small", torch.ones(3)), ("big", big)]
    out = io.BytesIO()
    record = write_stream(out, items, name="rank-00000.safetensors")
    raw = bytearray(out.getvalue())
    with RangedFile(_ServedObject(bytes(raw)), "obj", record, label="s3://b/obj") as f:
        f.will_read(["small", "big"])
        assert torch.equal(f.tensor("small"), torch.ones(3))
        assert torch.equal(f.tensor("big"), big)
    raw[-5] ^= 1  # one flipped bit in the last part
    with RangedFile(_ServedObject(bytes(raw)), "obj", record, label="s3://b/obj") as f, pytest.raises(
        CorruptCheckpointError, match="tensor 'big' does not match its checksum"
    ):
        f.tensor("big")
