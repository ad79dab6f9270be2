"""ptfile: torch.save zips read and written without torch, checked against torch itself."""

from __future__ import annotations

import collections
import errno
import fractions
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from elastickit.reshard.adapters import ptfile

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32,
          torch.int16, torch.int8, torch.uint8, torch.bool]


def _tree() -> dict:
    out: dict = {f"t_{str(d).removeprefix('torch.')}": (torch.arange(7) % 2 == 0 if d == torch.bool
                                                       else torch.arange(7).to(d))
                 for d in DTYPES}
    out.update({
        "transposed": torch.arange(12.0).view(3, 4).t(),
        "sliced": torch.arange(10.0)[3:8],
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 3),
        "shared_a": torch.arange(6.0), "size": torch.Size([2, 3]), "dtype": torch.float16,
        "device": torch.device("cpu"), "ordered": collections.OrderedDict(b=1, a=2),
        "bytes": b"\x00\xff", "set": {1, 2}, "nested": [{"x": (1, 2.5, None, True)}],
    })
    out["shared_b"] = out["shared_a"][2:]  # one storage, two tensors
    return out


def _same(a, b, where=""):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), where
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert list(a) == list(b) and type(a) is type(b), where
        for k in a:
            _same(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _same(x, y, f"{where}[{i}]")
    else:
        assert a == b and type(a) is type(b), where


def _as_torch(value):
    if isinstance(value, np.ndarray):
        if value.dtype == ptfile.np_dtype("bfloat16"):
            return torch.from_numpy(value.view(np.int16).copy()).view(torch.bfloat16)
        return torch.from_numpy(value.copy())
    if isinstance(value, dict):
        return type(value)((k, _as_torch(v)) for k, v in value.items())
    if isinstance(value, list):
        return [_as_torch(v) for v in value]
    if isinstance(value, ptfile.Size):
        return torch.Size(value)
    if isinstance(value, ptfile.DType):
        return getattr(torch, value)
    if isinstance(value, ptfile.Device):
        return torch.device(value)
    return value


def test_read_gives_every_tensor_and_value_torch_saved(tmp_path):
    src = str(tmp_path / "src.pt")
    torch.save(_tree(), src)
    back = ptfile.read_pt(src)
    assert back["t_bfloat16"].dtype.name == "bfloat16" and back["transposed"].shape == (4, 3)
    assert isinstance(back["size"], tuple) and back["size"] == (2, 3)
    _same(_tree(), _as_torch(back))


@pytest.mark.parametrize("zip64", [False, True])
def test_written_file_loads_in_torch_equal(tmp_path, monkeypatch, zip64):
    if zip64:  # every record and offset through the zip64 fields, as a >4 GiB file would be
        monkeypatch.setattr(ptfile, "_ZIP64_AT", 0)
    src, out = str(tmp_path / "src.pt"), str(tmp_path / "out.pt")
    torch.save(_tree(), src)
    size = ptfile.write_pt(ptfile.read_pt(src), out)
    assert size == os.path.getsize(out)
    _same(_tree(), torch.load(out, weights_only=True))
    _same(_tree(), torch.load(out, weights_only=True, mmap=True))
    _same(_tree(), _as_torch(ptfile.read_pt(out)))


def test_pieces_are_copied_from_the_mapped_file_by_the_kernel(tmp_path):
    src, out = str(tmp_path / "src.pt"), str(tmp_path / "out.pt")
    torch.save({"a": torch.arange(1000.0), "b": torch.arange(5000.0, 5600.0)}, src)
    back = ptfile.read_pt(src)
    parts = (back["b"][100:300], back["a"][:50], np.arange(7, dtype=np.float32))  # the last: in memory
    assert ptfile.file_span(parts[0]) == (os.path.realpath(src), ptfile.file_span(back["b"])[1] + 400)
    assert ptfile.file_span(parts[2]) is None
    pieces = ptfile.Pieces((257,), np.dtype(np.float32), parts)
    ptfile.write_pt({"cat_dim": 0, "param": pieces}, out)
    got = torch.load(out, weights_only=True)["param"]
    want = torch.cat([torch.arange(5100.0, 5300.0), torch.arange(50.0), torch.arange(7.0)])
    assert torch.equal(got, want)
    assert np.array_equal(pieces.join(), want.numpy())


def test_pieces_fall_back_to_plain_writes_where_copy_file_range_fails(tmp_path, monkeypatch):
    def refuse(*_args):
        raise OSError(errno.EXDEV, "cross-device")

    monkeypatch.setattr(ptfile, "_NO_COPY_RANGE", set())
    monkeypatch.setattr(ptfile.os, "copy_file_range", refuse)
    src, out = str(tmp_path / "src.pt"), str(tmp_path / "out.pt")
    torch.save({"a": torch.arange(100.0)}, src)
    a = ptfile.read_pt(src)["a"]
    ptfile.write_pt(ptfile.Pieces((6, 10), np.dtype(np.float32), (a[70:], a[:10], a[40:60])), out)
    want = torch.cat([torch.arange(70.0, 100.0), torch.arange(10.0), torch.arange(40.0, 60.0)]).view(6, 10)
    assert torch.equal(torch.load(out, weights_only=True), want)
    assert ptfile._NO_COPY_RANGE == {os.path.realpath(src)}


def test_released_pages_read_back_the_same(tmp_path):
    src = str(tmp_path / "src.pt")
    data = torch.randn(300_000)
    torch.save({"x": data}, src)
    x = ptfile.read_pt(src)["x"]
    assert float(x.sum()) == pytest.approx(float(data.sum()), rel=1e-5)
    ptfile.release(x, 200_000)
    ptfile.release(x)
    assert np.array_equal(x, data.numpy())


def test_only_torch_machinery_and_the_allowlist_unpickle(tmp_path):
    """What torch.load(weights_only=True) refuses, read_pt refuses too, naming the global."""
    path = str(tmp_path / "evil.pt")
    torch.save({"x": fractions.Fraction(1, 3), "t": torch.ones(2)}, path)
    with pytest.raises(pickle.UnpicklingError, match="fractions.Fraction"):
        ptfile.read_pt(path)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)
    assert ptfile.read_pt(path, allow={"fractions.Fraction": fractions.Fraction})["x"] == fractions.Fraction(1, 3)
    assert ptfile.read_pt(path, trust=True)["x"] == fractions.Fraction(1, 3)

    class Boom:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"boom": Boom()}, path)
    with pytest.raises(pickle.UnpicklingError, match=r"posix\.system|os\.system"):
        ptfile.read_pt(path)


def test_bad_input_is_refused(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a zip at all")
    with pytest.raises(ValueError, match="not a zip file"):
        ptfile.read_pt(str(bad))
    with pytest.raises(ValueError, match=r"shape \(2, 2\) needs 4 elements, its parts hold 3"):
        ptfile.Pieces((2, 2), np.dtype(np.float32), (np.zeros(3, np.float32),))
    with pytest.raises(pickle.PicklingError, match="numpy arrays, not Tensor"):
        ptfile.write_pt({"t": torch.ones(2)}, str(tmp_path / "x.pt"))


def test_universal_conversion_never_imports_torch(tmp_path):
    """The CLI's DeepSpeed -> universal path runs without torch (its import is most of the time)."""
    from tests.unit.test_deepspeed_layout import _zero3

    tag = tmp_path / "global_step7"
    tag.mkdir()
    truth = _zero3(tag)
    (tmp_path / "latest").write_text("global_step7")
    code = ("import sys\nfrom elastickit.cli.main import app\n"
            "app(['convert', sys.argv[1], sys.argv[2], '--to', 'deepspeed-universal'], standalone_mode=False)\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    dst = tmp_path / "out" / "u"
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path), str(dst)], capture_output=True,
                          text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    for name, t in truth.items():
        assert torch.equal(torch.load(dst / "zero" / name / "fp32.pt", weights_only=True), t.reshape(-1))
        assert torch.equal(torch.load(dst / "zero" / name / "exp_avg_sq.pt", weights_only=True),
                           (t * 20).reshape(-1))
    assert (tmp_path / "out" / "latest_universal").read_text() == "u"
