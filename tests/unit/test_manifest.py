"""The manifest: typed, versioned, self-checksummed JSON."""

import json

import pytest

from elastickit.checkpoint.errors import DataError, UnsupportedFormatError
from elastickit.checkpoint.format.manifest import (
    FileRecord,
    LayoutRecord,
    Manifest,
    ShardRef,
    TensorEntry,
    rank_file_name,
    step_dir_name,
)


def _manifest(**kw) -> Manifest:
    files = {"rank-00000.safetensors": FileRecord(name="rank-00000.safetensors", size_bytes=100, header_checksum="aa", tensor_checksums={"w": "bb"})}
    shard = ShardRef(file="rank-00000.safetensors", key="w", offsets=(0, 2), lengths=(4, 2), stored_offsets=(0, 0))
    tensors = {"model/w": TensorEntry(name="model/w", dtype="F32", shape=(4, 4), shards=(shard,))}
    args = dict(step=7, created_s=1.5, world_size=2, layout=LayoutRecord(axes=(("dp", 1), ("tp", 2))), tensors=tensors, files=files, objects={"extra": {"epoch": 1}})
    args.update(kw)
    return Manifest(**args)


def test_round_trip_is_exact():
    m = _manifest()
    back = Manifest.loads(m.dumps())
    assert back == m
    assert back.tensors["model/w"].shards[0].offsets == (0, 2)
    assert back.layout.world_size == 2


def test_every_flipped_byte_is_detected():
    text = _manifest().dumps().encode()
    for i in range(len(text)):
        bad = bytearray(text)
        bad[i] ^= 0x01
        try:
            decoded = bad.decode()
        except UnicodeDecodeError:
            continue  # a reader fails on this already
        with pytest.raises(DataError):
            Manifest.loads(decoded)


def test_newer_major_version_is_refused_with_a_clear_message():
    d = json.loads(_manifest().dumps())
    d.pop("manifest_checksum")
    d["version"] = "2.0"
    with pytest.raises(UnsupportedFormatError, match=r"format version 2\.0 .* reads 1\.x; upgrade elastickit"):
        Manifest.from_json(d, source="x/manifest.json")


def test_newer_minor_version_is_read():
    d = json.loads(_manifest().dumps())
    d.pop("manifest_checksum")
    d["version"] = "1.7"
    assert Manifest.from_json(d).version == (1, 7)


def test_foreign_json_is_refused():
    with pytest.raises(UnsupportedFormatError, match="not an elastickit manifest"):
        Manifest.from_json({"format": "dcp"})


def test_validation_names_the_problem():
    shard = ShardRef(file="rank-00000.safetensors", key="w", offsets=(3, 0), lengths=(4, 4), stored_offsets=(0, 0))
    with pytest.raises(ValueError, match="reaches past the global shape"):
        TensorEntry(name="model/w", dtype="F32", shape=(4, 4), shards=(shard,))
    with pytest.raises(ValueError, match="unknown dtype"):
        TensorEntry(name="model/w", dtype="F33", shape=(4,), shards=())
    shard = ShardRef(file="rank-00001.safetensors", key="w", offsets=(0, 0), lengths=(4, 4), stored_offsets=(0, 0))
    with pytest.raises(ValueError, match="absent from files"):
        _manifest(tensors={"model/w": TensorEntry(name="model/w", dtype="F32", shape=(4, 4), shards=(shard,))})


def test_names():
    assert step_dir_name(42) == "step-00000042"
    assert rank_file_name(3) == "rank-00003.safetensors"
    assert rank_file_name(3, compressed=True) == "rank-00003.safetensors.zst"
    with pytest.raises(ValueError):
        step_dir_name(-1)
