"""Checkpointer in one process: bit-exact restore, fallbacks, corruption, crashes mid-save."""

import json
import os
import subprocess
import sys

import pytest
import torch

import elastickit as ek
from elastickit.checkpoint.storage import files as writer_mod
from elastickit.checkpoint.errors import DataError, ElastickitError, RequestError
from elastickit.checkpoint.format.directory import list_checkpoints, verify_checkpoint
from elastickit.checkpoint.tiers import Tiers


class Loader:
    """A Stateful data position."""

    def __init__(self) -> None:
        self.index = 0

    def state_dict(self):
        return {"index": self.index}

    def load_state_dict(self, sd):
        self.index = sd["index"]


def _model(seed: int):
    torch.manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Linear(6, 9), torch.nn.GELU(), torch.nn.Linear(9, 3))
    return m, torch.optim.AdamW(m.parameters(), lr=1e-2)


X = torch.randn(8, 6, generator=torch.Generator().manual_seed(5))


def _step(m, o, loader):
    o.zero_grad()
    loss = (m(X[loader.index % 4 :]) ** 2).mean()
    loss.backward()
    o.step()
    loader.index += 1
    return loss.item()


def _state(m, o, loader, extra):
    return {"model": m, "optim": o, "data": loader, "extra": extra}


def _train_and_save(root, steps=3, every=1, **kw):
    m, o = _model(0)
    loader, extra = Loader(), {"epoch": 1, "tag": "a"}
    ck = ek.Checkpointer(root, every=every, **kw)
    for s in range(steps):
        _step(m, o, loader)
        ck.save(s + 1, _state(m, o, loader, extra)).durable.result()  # each one durable: exact files below
    ck.close()
    return m, o, loader


def test_restore_is_bit_exact_and_continues_identically(tmp_path):
    m, o, loader = _train_and_save(str(tmp_path))
    torch.manual_seed(123)
    ref = [_step(m, o, loader) for _ in range(2)]
    m2, o2 = _model(7)
    loader2, extra2 = Loader(), {}
    with ek.Checkpointer(str(tmp_path)) as ck:
        assert ck.restore(_state(m2, o2, loader2, extra2)) == 3
    assert extra2 == {"epoch": 1, "tag": "a"} and loader2.index == 3
    torch.manual_seed(123)
    got = [_step(m2, o2, loader2) for _ in range(2)]
    assert got == ref  # bit-identical losses after the restore


def test_rng_is_restored(tmp_path):
    m, o = _model(0)
    ck = ek.Checkpointer(str(tmp_path))
    torch.manual_seed(42)
    ck.save(1, {"model": m})
    expected = torch.rand(3)
    torch.manual_seed(0)
    ck.restore({"model": m})
    assert torch.equal(torch.rand(3), expected)


def test_nothing_to_restore_returns_zero(tmp_path):
    m, o = _model(0)
    assert ek.Checkpointer(str(tmp_path / "none")).restore({"model": m}) == 0


def test_every_n_skips_and_returns_one_handle(tmp_path):
    m, o = _model(0)
    ck = ek.Checkpointer(str(tmp_path), every=2)
    h1 = ck.save(1, {"model": m})
    h2 = ck.save(2, {"model": m})
    assert (h1.scheduled, h2.scheduled) == (False, True)
    assert h2.durable.result().endswith("step-00000002")
    assert [c.step for c in list_checkpoints(str(tmp_path))] == [2]


def test_keep_last(tmp_path):
    _train_and_save(str(tmp_path), steps=4, keep_last=2)
    assert [c.step for c in list_checkpoints(str(tmp_path))] == [3, 4]


def test_incomplete_directory_is_invisible(tmp_path):
    _train_and_save(str(tmp_path), steps=2)
    os.remove(tmp_path / "step-00000002" / "manifest.json")
    m, o = _model(1)
    ck = ek.Checkpointer(str(tmp_path))
    assert ck.latest() == 1
    assert ck.restore({"model": m, "optim": o, "data": Loader(), "extra": {}}) == 1


@pytest.mark.parametrize("victim", ["rank-00000.safetensors", "manifest.json"])
def test_corrupt_newest_falls_back_and_says_why(tmp_path, victim, caplog):
    _train_and_save(str(tmp_path), steps=2)
    p = tmp_path / "step-00000002" / victim
    raw = bytearray(p.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    p.write_bytes(bytes(raw))
    assert verify_checkpoint(str(tmp_path / "step-00000001")) == []
    m, o = _model(1)
    with caplog.at_level("WARNING", logger="elastickit"):
        step = ek.Checkpointer(str(tmp_path)).restore({"model": m, "optim": o, "data": Loader(), "extra": {}})
    assert step == 1
    assert "step-00000002" in caplog.text


def test_explicit_corrupt_step_is_refused_naming_the_file(tmp_path):
    _train_and_save(str(tmp_path), steps=1)
    p = tmp_path / "step-00000001" / "rank-00000.safetensors"
    p.write_bytes(p.read_bytes()[:-8])  # truncate
    m, o = _model(1)
    with pytest.raises(DataError, match=r"rank-00000\.safetensors .*(truncated|manifest recorded)"):
        ek.Checkpointer(str(tmp_path)).restore({"model": m, "optim": o, "data": Loader(), "extra": {}}, step=1)


def test_newer_major_version_is_refused(tmp_path):
    _train_and_save(str(tmp_path), steps=1)
    p = tmp_path / "step-00000001" / "manifest.json"
    text = p.read_text()
    cut = text.rfind(',"manifest_checksum"')
    d = json.loads(text[:cut] + "}")
    d["version"] = "9.0"
    from elastickit.checkpoint.format.manifest import Manifest

    body = json.dumps(d, separators=(",", ":"))
    import xxhash

    head = body[:-1]
    p.write_text(f'{head},"manifest_checksum":"{xxhash.xxh3_64_hexdigest(head.encode())}"}}\n')
    m, o = _model(1)
    with pytest.raises(DataError, match=r"version 9\.0 .*upgrade elastickit"):
        ek.Checkpointer(str(tmp_path)).restore({"model": m}, step=1)
    assert Manifest  # imported for the error type's module


@pytest.mark.parametrize("phase", ["write", "commit"])
def test_failure_mid_save_leaves_earlier_checkpoints_loadable(tmp_path, monkeypatch, phase):
    _train_and_save(str(tmp_path), steps=1)
    m, o = _model(3)

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(writer_mod, "write_file" if phase == "write" else "commit_step", boom)
    ck = ek.Checkpointer(str(tmp_path))
    handle = ck.save(2, {"model": m, "optim": o, "data": Loader(), "extra": {}})  # never raises into training
    with pytest.raises(ElastickitError, match="No space left"):
        handle.durable.result()
    with pytest.raises(ElastickitError, match="No space left"):
        ck.wait()
    monkeypatch.undo()
    assert ck.latest() == 1
    # This process still holds step 2 in its memory tier; a fresh one (a restart) gets step 1.
    assert ck.restore({"model": m, "optim": o, "data": Loader(), "extra": {}}) == 2
    assert ek.Checkpointer(str(tmp_path)).restore({"model": m, "optim": o, "data": Loader(), "extra": {}}) == 1


KILL_SCRIPT = r"""
import os, sys, torch
import elastickit as ek
from elastickit.checkpoint.format import stfile
root, when = sys.argv[1], sys.argv[2]
m = torch.nn.Linear(512, 512)
real = stfile.write_file
def dying(path, items, **kw):
    if when == "mid-file":
        with open(path, "wb") as f:
            f.write(b"\0" * 1000)
        os.kill(os.getpid(), 9)
    rec = real(path, items, **kw)
    if when == "before-manifest":
        os.kill(os.getpid(), 9)
    return rec
import elastickit.checkpoint.storage.files as w
w.write_file = dying
ck = ek.Checkpointer(root)
ck.save(2, {"model": m})
ck.close()
"""


@pytest.mark.parametrize("when", ["mid-file", "before-manifest"])
def test_sigkill_mid_save_leaves_earlier_checkpoints_loadable(tmp_path, when):
    root = str(tmp_path)
    m = torch.nn.Linear(512, 512)
    with ek.Checkpointer(root) as ck:
        ck.save(1, {"model": m})
    r = subprocess.run([sys.executable, "-c", KILL_SCRIPT, root, when], capture_output=True, timeout=120)
    assert r.returncode == -9
    assert [(c.step, c.complete) for c in list_checkpoints(root)] == [(1, True), (2, False)]
    m2 = torch.nn.Linear(512, 512)
    assert ek.Checkpointer(root).restore({"model": m2}) == 1
    assert torch.equal(m2.weight, m.weight)


def test_bad_state_is_refused_with_one_sentence(tmp_path):
    ck = ek.Checkpointer(str(tmp_path))
    with pytest.raises(RequestError, match=r"state 'extra/when' holds a value of type object, .*never pickles"):
        ck.save(1, {"extra": {"when": object()}})
    with pytest.raises(RequestError, match="every must be >= 1"):
        ek.Checkpointer(str(tmp_path), every=0)


def test_restore_unknown_state_name_is_refused(tmp_path):
    m, _ = _model(0)
    with ek.Checkpointer(str(tmp_path)) as ck:
        ck.save(1, {"model": m})
    with pytest.raises(RequestError, match="no state 'net'"):
        ek.Checkpointer(str(tmp_path)).restore({"net": m})


class _Scaled(torch.nn.Module):
    """A module with extra state that changes on every call (as FP8 scaling modules have)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)
        self.calls = 0

    def get_extra_state(self):
        return {"calls": self.calls}

    def set_extra_state(self, state):
        self.calls = state["calls"]


def _save_change_restore(root, model, change, fresh):
    with ek.Checkpointer(root, tiers=Tiers(persistent=None)) as ck:
        ck.save(1, {"model": model}).staged.result()
        change(model)
        ck.save(2, {"model": model}).staged.result()
        assert ck.restore({"model": fresh}) == 2
    return fresh


def test_cached_state_dict_follows_swapped_storage(tmp_path):
    # The same Parameter object with new storage (`p.data = t`, as some wrappers do): the
    # cached state dict must not serve the old storage.
    def swap(m):
        m.weight.data = torch.full((4, 4), 7.0)

    got = _save_change_restore(str(tmp_path), torch.nn.Linear(4, 4), swap, torch.nn.Linear(4, 4))
    assert torch.equal(got.weight, torch.full((4, 4), 7.0))


def test_cached_state_dict_follows_extra_state(tmp_path):
    def bump(m):
        m.calls = 3

    got = _save_change_restore(str(tmp_path), _Scaled(), bump, _Scaled())
    assert got.calls == 3
