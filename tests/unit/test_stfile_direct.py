"""Large durable files go through O_DIRECT (with a page-cache tail); the bytes are the same."""

import torch

from elastickit.checkpoint import stfile
from elastickit.checkpoint.stfile import StFile, write_file


def test_direct_and_cached_writes_are_byte_identical(tmp_path, monkeypatch):
    monkeypatch.setattr(stfile, "_DIRECT_MIN_BYTES", 1)
    monkeypatch.setattr(stfile, "_DIRECT_BUF_BYTES", 1 << 16)  # several full buffers and a tail
    g = torch.Generator().manual_seed(0)
    items = [("a", torch.randn(40_000, generator=g)), ("b", torch.randn(333, generator=g).to(torch.bfloat16))]
    used = []
    real = stfile._write_direct
    monkeypatch.setattr(stfile, "_write_direct", lambda *a: used.append(real(*a)) or used[-1])
    rec_direct = write_file(str(tmp_path / "d.safetensors"), items, fsync=True)
    monkeypatch.setattr(stfile, "_DIRECT_MIN_BYTES", 1 << 62)
    rec_cached = write_file(str(tmp_path / "c.safetensors"), items, fsync=True)
    assert (tmp_path / "d.safetensors").read_bytes() == (tmp_path / "c.safetensors").read_bytes()
    assert rec_direct.tensor_checksums == rec_cached.tensor_checksums
    assert (rec_direct.size_bytes, rec_direct.header_checksum) == (rec_cached.size_bytes, rec_cached.header_checksum)
    assert used and (used[0] is None or used[0] == rec_direct.size_bytes)  # None: no O_DIRECT here
    with StFile(str(tmp_path / "d.safetensors"), rec_direct) as f:
        assert f.verify_all() == [] and torch.equal(f.tensor("a"), items[0][1])
