"""Our safetensors files: readable by the safetensors library, checksummed, optionally zstd."""

import pytest
import torch
from safetensors.torch import load_file

from elastickit.checkpoint.errors import CorruptCheckpointError
from elastickit.checkpoint.format.stfile import StFile, write_file


def _tensors():
    g = torch.Generator().manual_seed(0)
    return [
        ("a", torch.randn(5, 3, generator=g)),
        ("b/bf16", torch.randn(7, generator=g).to(torch.bfloat16)),
        ("c", torch.tensor(3.5)),
        ("d", torch.zeros(0, 4)),
        ("e", torch.tensor([True, False, True])),
        ("f", torch.arange(10, dtype=torch.int64)[::2]),  # non-contiguous
    ]


def test_write_then_read_back_bit_exact(tmp_path):
    p = str(tmp_path / "x.safetensors")
    rec = write_file(p, _tensors(), rank=3)
    assert rec.rank == 3 and set(rec.tensor_checksums) == {k for k, _ in _tensors()}
    with StFile(p, rec) as f:
        for k, t in _tensors():
            assert torch.equal(f.tensor(k), t), k
        assert f.verify_all() == []
    # any safetensors reader opens it
    other = load_file(p)
    assert all(torch.equal(other[k], t) for k, t in _tensors())


def test_zstd_round_trip(tmp_path):
    p = str(tmp_path / "x.safetensors.zst")
    big = [("z", torch.zeros(10000)), *_tensors()]
    rec = write_file(p, big, zstd_level=3)
    assert rec.compression == "zstd" and rec.size_bytes < 10000 * 4 // 4
    with StFile(p, rec) as f:
        for k, t in big:
            assert torch.equal(f.tensor(k), t)


@pytest.mark.parametrize("where", ["length", "header", "data_first", "data_last"])
def test_flipped_byte_is_named(tmp_path, where):
    p = tmp_path / "x.safetensors"
    rec = write_file(str(p), _tensors())
    raw = bytearray(p.read_bytes())
    n = int.from_bytes(raw[:8], "little")
    pos = {"length": 0, "header": 8 + n // 2, "data_first": 8 + n, "data_last": len(raw) - 1}[where]
    raw[pos] ^= 0x40
    p.write_bytes(bytes(raw))
    with pytest.raises(CorruptCheckpointError, match="x.safetensors"):
        with StFile(str(p), rec) as f:
            bad = f.verify_all()
            if bad:
                raise CorruptCheckpointError(f"x.safetensors: {bad}")


def test_truncated_file_is_refused(tmp_path):
    p = tmp_path / "x.safetensors"
    rec = write_file(str(p), _tensors())
    p.write_bytes(p.read_bytes()[:-3])
    with pytest.raises(CorruptCheckpointError, match="truncated"):
        StFile(str(p), rec)


def test_device_tensor_is_refused_with_advice(tmp_path):
    meta = torch.empty(3, device="meta")
    with pytest.raises(ValueError, match="copy it to host memory"):
        write_file(str(tmp_path / "x.safetensors"), [("m", meta)])
