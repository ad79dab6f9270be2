"""Large durable files go through O_DIRECT (with a page-cache tail); the bytes are the same, and
where the file system refuses O_DIRECT (tmpfs, some network file systems) the page cache is used."""

import errno
import os

import pytest
import torch

from elastickit.checkpoint.format import stfile
from elastickit.checkpoint.format.stfile import StFile, write_file


def _items():
    g = torch.Generator().manual_seed(0)
    return [("a", torch.randn(40_000, generator=g)), ("b", torch.randn(333, generator=g).to(torch.bfloat16))]


def _small_direct_buffers(monkeypatch):
    monkeypatch.setattr(stfile, "_DIRECT_MIN_BYTES", 1)
    monkeypatch.setattr(stfile, "_DIRECT_BUF_BYTES", 1 << 16)  # several full buffers and a tail


def _cached(tmp_path, monkeypatch, items):
    monkeypatch.setattr(stfile, "_DIRECT_MIN_BYTES", 1 << 62)
    rec = write_file(str(tmp_path / "c.safetensors"), items, fsync=True)
    monkeypatch.setattr(stfile, "_DIRECT_MIN_BYTES", 1)
    return rec


def _o_direct_refused(folder) -> str | None:
    """Why `folder`'s file system refuses O_DIRECT writes, or None."""
    if not hasattr(os, "O_DIRECT"):
        return "this platform has no O_DIRECT"
    path = os.path.join(folder, "probe")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o644)
    except OSError as e:
        return f"the file system of {folder} refuses O_DIRECT ({e.strerror})"
    try:
        import mmap

        buf = mmap.mmap(-1, 4096)
        os.write(fd, buf)
    except OSError as e:
        return f"the file system of {folder} refuses O_DIRECT writes ({e.strerror})"
    finally:
        os.close(fd)
        os.remove(path)
    return None


def _same(tmp_path, rec_a, rec_b, items):
    assert (tmp_path / "d.safetensors").read_bytes() == (tmp_path / "c.safetensors").read_bytes()
    assert rec_a.tensor_checksums == rec_b.tensor_checksums
    assert (rec_a.size_bytes, rec_a.header_checksum) == (rec_b.size_bytes, rec_b.header_checksum)
    with StFile(str(tmp_path / "d.safetensors"), rec_a) as f:
        assert f.verify_all() == [] and torch.equal(f.tensor("a"), items[0][1])


def test_direct_and_cached_writes_are_byte_identical(tmp_path, monkeypatch):
    reason = _o_direct_refused(tmp_path)
    if reason:
        pytest.skip(f"{reason}; the fallback is tested below")
    _small_direct_buffers(monkeypatch)
    items = _items()
    used = []
    real = stfile._write_direct
    monkeypatch.setattr(stfile, "_write_direct", lambda *a: used.append(real(*a)) or used[-1])
    rec_direct = write_file(str(tmp_path / "d.safetensors"), items, fsync=True)
    assert used == [rec_direct.size_bytes]  # written with O_DIRECT, not through the fallback
    _same(tmp_path, rec_direct, _cached(tmp_path, monkeypatch, items), items)


@pytest.mark.parametrize("refuses", ["open", "write"])
def test_a_file_system_refusing_o_direct_falls_back_to_the_page_cache(tmp_path, monkeypatch, refuses):
    """What tmpfs does (EINVAL at open) and what some file systems do (EINVAL at the first write),
    made to happen on any machine."""
    _small_direct_buffers(monkeypatch)
    items = _items()
    direct_fds = set()
    real_open, real_write = os.open, os.write

    def fake_open(path, flags, *a):
        if flags & getattr(os, "O_DIRECT", 0):
            if refuses == "open":
                raise OSError(errno.EINVAL, "Invalid argument")
            fd = real_open(path, flags & ~os.O_DIRECT, *a)
            direct_fds.add(fd)
            return fd
        return real_open(path, flags, *a)

    def fake_write(fd, data):
        if fd in direct_fds:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_write(fd, data)

    monkeypatch.setattr(stfile.os, "open", fake_open)
    monkeypatch.setattr(stfile.os, "write", fake_write)
    used = []
    real = stfile._write_direct
    monkeypatch.setattr(stfile, "_write_direct", lambda *a: used.append(real(*a)) or used[-1])
    rec = write_file(str(tmp_path / "d.safetensors"), items, fsync=True)
    assert used == [None]  # O_DIRECT was tried and refused
    assert refuses == "open" or direct_fds  # the write-time refusal really opened with O_DIRECT
    monkeypatch.setattr(stfile.os, "open", real_open)
    monkeypatch.setattr(stfile.os, "write", real_write)
    _same(tmp_path, rec, _cached(tmp_path, monkeypatch, items), items)
