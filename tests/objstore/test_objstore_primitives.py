"""The object-store primitives against a real S3-compatible server (moto on 127.0.0.1)."""

from __future__ import annotations

import pytest
import torch
from elastickit.checkpoint.errors import CorruptCheckpointError, RequestError
from elastickit.checkpoint.format.stfile import StFile, write_file
from elastickit.checkpoint.storage.objio import S3Upload
from elastickit.checkpoint.storage.objstore import ObjectRoot, open_filesystem, redact

from tests._s3 import s3fs_client

pytestmark = pytest.mark.timeout(120)


def _items() -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [
        ("a", torch.randn(300, 257, generator=g)),
        ("b", torch.arange(7, dtype=torch.int64)),
        ("empty", torch.zeros(0, 3)),
        ("c", torch.randn(1000, 1001, generator=g).to(torch.bfloat16)),
    ]


@pytest.mark.parametrize("zstd", [None, 3])
def test_upload_is_byte_identical_to_the_file_tier(bucket, tmp_path, zstd):
    items = _items()
    local = write_file(str(tmp_path / "rank-00000.safetensors"), items, zstd_level=zstd)
    root = ObjectRoot(f"s3://{bucket}/run")
    name = local.name
    rec = root.write_rank_file(7, name, items, rank=0, zstd_level=zstd)
    assert rec == local  # same bytes, same checksums, same size
    got = s3fs_client().cat_file(f"{bucket}/run/step-00000007/{name}")
    assert got == (tmp_path / name).read_bytes()
    with root.open_file(7, name, rec) as f, StFile(str(tmp_path / name), local) as g:
        for key, t in items:
            assert torch.equal(f.tensor(key), t) and torch.equal(g.tensor(key), t)
        assert f.verify_all() == []


@pytest.mark.parametrize("borrow", [False, True])
def test_multipart_parts_stream_with_a_bounded_buffer(bucket, borrow):
    fs = s3fs_client()
    data = torch.randint(0, 255, (13 << 20,), dtype=torch.uint8)
    up = S3Upload(fs, f"{bucket}/big", part_bytes=5 << 20, max_inflight=2, borrow=borrow)
    view = memoryview(data.numpy())
    for i in range(0, len(view), 1 << 20):
        up.write(view[i : i + (1 << 20)])
    assert not fs.exists(f"{bucket}/big")  # nothing visible before the upload completes
    up.close()
    assert len(up._parts) == 3  # 5 + 5 + 3 MiB
    assert fs.cat_file(f"{bucket}/big") == bytes(view)


def test_a_flipped_byte_is_named_on_read(bucket):
    items = _items()
    root = ObjectRoot(f"s3://{bucket}/run")
    rec = root.write_rank_file(1, "rank-00000.safetensors", items, rank=0)
    fs = s3fs_client()
    key = f"{bucket}/run/step-00000001/rank-00000.safetensors"
    blob = bytearray(fs.cat_file(key))
    blob[-5] ^= 0xFF  # inside tensor "c"
    fs.pipe_file(key, bytes(blob))
    with root.open_file(1, "rank-00000.safetensors", rec) as f:
        assert torch.equal(f.tensor("a"), items[0][1])
        with pytest.raises(CorruptCheckpointError, match=r"s3://.*/step-00000001/rank-00000.safetensors: tensor 'c'"):
            f.tensor("c")
        assert f.verify_all() == ["c"]


def test_missing_backend_is_one_sentence_naming_the_package():
    with pytest.raises(RequestError, match=r"gs://b/x needs the fsspec backend for gs://.*gcsfs"):
        open_filesystem("gs://b/x", what="the Checkpointer root")
    with pytest.raises(RequestError, match=r"not a storage scheme fsspec knows"):
        open_filesystem("nosuch://b/x")


def test_redact_drops_userinfo():
    assert redact("s3://AKIA:sekrit@bucket/run") == "s3://bucket/run"
    assert redact("s3://bucket/run") == "s3://bucket/run"


def test_delete_takes_the_manifest_first(bucket, monkeypatch):
    """A crash in the middle of retention leaves an incomplete step, never a manifest that names
    deleted objects: the manifest is gone before any rank file is touched."""
    from elastickit.checkpoint.format.manifest import LayoutRecord, Manifest

    root = ObjectRoot(f"s3://{bucket}/run")
    items = _items()
    for step in (1, 2):
        rec = root.write_rank_file(step, "rank-00000.safetensors", items, rank=0)
        root.commit(step, Manifest(step=step, created_s=0.0, world_size=1, layout=LayoutRecord(), tensors={}, files={rec.name: rec}))
    assert root.committed_steps() == [1, 2]

    def crash(*_a, **_k):
        raise OSError("killed before the objects went")

    monkeypatch.setattr(root.fs, "rm", crash)
    with pytest.raises(RequestError):
        root.delete_step(1)
    monkeypatch.undo()
    assert root.committed_steps() == [2]  # step 1 is invisible at once
    assert [(c.step, c.complete) for c in root.list_steps()] == [(1, False), (2, True)]
    assert root.remove_incomplete(keep_newer_than=2) == [f"s3://{bucket}/run/step-00000001"]
    assert [c.step for c in root.list_steps()] == [2]
