"""What a new user gets wrong with a Checkpointer (issue 13): each guard names the problem in
one sentence instead of losing data or resuming someone else's state."""

import itertools
import os

import pytest
import torch
from elastickit.checkpoint.format.directory import list_checkpoints
from elastickit.checkpoint.errors import RequestError
from elastickit.checkpoint.tiers import Tiers, TierSpec
from typer.testing import CliRunner

import elastickit as ek
from elastickit.cli.main import app

# -- item 3: URLs are not relative paths; `~` is the home directory ------------------------------
# (issue 16: object storage is supported where an fsspec backend is installed: s3:// with the
# s3 extra; the tests of that are in tests/objstore. gcsfs is not installed here.)


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("gs://bucket/x", r"the Checkpointer root gs://bucket/x needs the fsspec backend for gs://.*gcsfs"),
        ("nosuch://bucket/x", r"the Checkpointer root nosuch://bucket/x: nosuch:// is not a storage scheme"),
    ],
)
def test_url_root_without_backend_is_refused_and_writes_nothing(tmp_path, monkeypatch, url, says):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RequestError, match=says):
        ek.Checkpointer(url)
    with pytest.raises(RequestError, match=r"the tier path gs://b/\{node\} needs the fsspec backend for gs://"):
        TierSpec(path="gs://b/{node}")
    with pytest.raises(RequestError, match=r"the local tier path 's3://b/\{node\}' is a s3:// URL, but .* must be a local path"):
        Tiers(local=TierSpec(path="s3://b/{node}"))
    assert os.listdir(tmp_path) == []  # no ./gs:/bucket/x, no ./nosuch:/...


def test_file_url_is_a_local_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with ek.Checkpointer(f"file://{tmp_path}/ck") as ck:
        ck.save(1, {"model": torch.nn.Linear(2, 2)})
    assert [c.step for c in list_checkpoints(str(tmp_path / "ck"))] == [1]
    assert sorted(os.listdir(tmp_path)) == ["ck"]  # no ./file:/...


def test_home_is_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    with ek.Checkpointer("~/ck") as ck:
        ck.save(1, {"model": torch.nn.Linear(2, 2)})
    assert [c.step for c in list_checkpoints(str(tmp_path / "home" / "ck"))] == [1]
    assert not (tmp_path / "~").exists()


@pytest.mark.parametrize(
    "args",
    [
        ("inspect", "gs://bucket/c1"),
        ("verify", "gs://bucket/c1"),
        ("ls", "gs://tmp/c1"),
        ("convert", "c1", "gs://bucket/y"),
        ("convert", "gs://bucket/c1", "y"),
        ("reshard", "c1", "gs://bucket/y", "--to", "tp=1"),
        ("train", "--ckpt", "s3://bucket/run", "--steps", "1"),
    ],
)
def test_cli_refuses_urls(tmp_path, monkeypatch, args):
    with ek.Checkpointer(str(tmp_path / "c1")) as ck:
        ck.save(1, {"model": torch.nn.Linear(2, 2)})
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(app, list(args))
    assert r.exit_code == 2, r.output
    url = next(a for a in args if "://" in a)
    assert r.output.startswith("error: ") and url in r.output, r.output
    assert "needs the fsspec backend for gs://" in r.output or "must be a local path" in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1
    assert sorted(os.listdir(tmp_path)) == ["c1"]  # nothing written under ./gs:, ./y


# -- item 13 and item 2 (construction): a root that cannot be written fails before training ------

UNPRIVILEGED = r"""
import json, os, sys
import torch
import elastickit as ek
from elastickit.checkpoint.tiers import Tiers, TierSpec
out = []
for root, local, then_read_only in json.loads(sys.argv[1]):
    try:
        ck = ek.Checkpointer(root, tiers=Tiers(local=TierSpec(path=local)) if local else None)
        if then_read_only:  # the root goes read-only under a running job
            os.chmod(root, 0o555)
            ck.save(1, {"model": torch.nn.Linear(2, 2)})
        ck.close()
        out.append({"error": None})
    except Exception as e:
        out.append({"error": type(e).__name__, "message": str(e)})
print(json.dumps(out))
"""


def _drop_dac_override():  # root writes anywhere; without these capabilities, modes bind it too
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH: gone from the bounding set at exec
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def _construct_unprivileged(*cases):
    """Construct Checkpointers (root, local tier path) in a process that file modes bind, even
    when the tests run as root; one result per case."""
    import json
    import subprocess
    import sys

    r = subprocess.run(
        [sys.executable, "-c", UNPRIVILEGED, json.dumps(cases)],
        capture_output=True,
        text=True,
        check=False,
        timeout=180,
        preexec_fn=_drop_dac_override if os.geteuid() == 0 else None,
    )
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_a_file_root_is_refused_with_one_sentence(tmp_path):
    f = tmp_path / "afile"
    f.write_text("x")
    with pytest.raises(RequestError, match=rf"^the checkpoint root {f} is a file, not a directory; give a directory$"):
        ek.Checkpointer(str(f))
    with pytest.raises(RequestError, match=rf"^the checkpoint root {f}/sub cannot be created: {f} is a file"):
        ek.Checkpointer(str(f / "sub"))


def test_a_read_only_root_or_parent_fails_at_construction(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        got = _construct_unprivileged(
            (str(ro), "", False),  # a read-only root
            (str(ro / "ckpt"), "", False),  # a read-only parent
            (str(tmp_path / "ok"), str(ro / "{node}"), False),  # a read-only local tier
            (str(tmp_path / "ok"), "", False),  # the check itself lets a writable root through
            (str(tmp_path / "late"), "", True),  # item 2: writable at first, read-only later
        )
    finally:
        ro.chmod(0o755)
        (tmp_path / "late").chmod(0o755)
    assert [g["error"] for g in got] == ["RequestError"] * 3 + [None, "NotDurableError"], got
    assert got[0]["message"] == (
        f"the checkpoint root {ro} is not writable (Permission denied); choose a writable "
        "directory or fix its permissions"
    )
    assert got[1]["message"].startswith(f"the checkpoint root {ro}/ckpt is not writable (Permission denied)")
    assert got[2]["message"].startswith(f"the local tier path {ro}/0 is not writable (Permission denied)")
    assert os.listdir(ro) == []
    # close() says the newest checkpoint is not durable, naming the tier and the cause
    assert got[4]["message"].startswith(
        f"checkpoint 1 is not durable: the persistent tier at {tmp_path / 'late'} failed ("
    )
    assert "Permission denied" in got[4]["message"] and got[4]["message"].endswith("it holds no checkpoint)")


def test_close_raises_when_the_newest_checkpoint_misses_a_tier(tmp_path, monkeypatch):
    from elastickit.checkpoint.storage import files as writer_mod
    from elastickit.checkpoint.errors import NotDurableError

    root = str(tmp_path / "root")
    real = writer_mod.write_file

    def full_disk(path, items, **kw):  # the persistent tier's disk is full; the local one is fine
        if path.startswith(root):
            raise OSError(28, "No space left on device")
        return real(path, items, **kw)

    m = _linear(1)
    ck = ek.Checkpointer(root, tiers=Tiers(local=TierSpec(path=str(tmp_path / "shm"))))
    ck.save(1, {"model": m}).durable.result()
    monkeypatch.setattr(writer_mod, "write_file", full_disk)
    ck.save(2, {"model": m})  # never raises into training
    with pytest.raises(NotDurableError, match=rf"^checkpoint 2 is not durable: the persistent tier at {root} failed \(.*No space left on device.*; its newest checkpoint is step 1\)$") as e:
        ck.close()
    assert e.value.step == 2 and e.value.tiers == ("persistent",)
    ck.close()  # closed: it said so once
    monkeypatch.undo()
    with ek.Checkpointer(root, tiers=Tiers(local=TierSpec(path=str(tmp_path / "shm")))) as ck:
        assert ck.restore({"model": _linear(2)}) == 2  # the local tier has it
        ck.save(3, {"model": m})
        ck.wait()
    # wait() says it first; close() does not say it again
    monkeypatch.setattr(writer_mod, "write_file", full_disk)
    ck = ek.Checkpointer(root, tiers=Tiers(local=TierSpec(path=str(tmp_path / "shm"))))
    ck.save(4, {"model": m})
    with pytest.raises(NotDurableError, match="checkpoint 4 is not durable"):
        ck.wait()
    ck.close()


def test_a_context_manager_does_not_hide_the_error_in_flight(tmp_path, monkeypatch, caplog):
    from elastickit.checkpoint.storage import files as writer_mod

    def full_disk(path, items, **kw):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(writer_mod, "write_file", full_disk)
    with (
        pytest.raises(KeyError, match="boom"),
        caplog.at_level("ERROR", logger="elastickit"),
        ek.Checkpointer(str(tmp_path)) as ck,
    ):
        ck.save(1, {"model": _linear(1)})
        raise KeyError("boom")
    assert "checkpoint 1 is not durable" in caplog.text


# -- item 5: one writer per root ---------------------------------------------------------------

HOLDER = r"""
import sys
import torch
import elastickit as ek
ck = ek.Checkpointer(sys.argv[1])
ck.save(1, {"model": torch.nn.Linear(2, 2)}).durable.result()
print("ready", flush=True)
sys.stdin.read()  # holds the root until the test kills it
"""


def test_a_second_writer_is_refused_naming_the_holder_and_a_killed_one_blocks_nothing(tmp_path, monkeypatch, caplog):
    import socket
    import subprocess
    import sys

    root = str(tmp_path / "root")
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, root],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "TORCHELASTIC_RUN_ID": "job-1"},  # a worker of an elastic job
    )
    try:
        assert holder.stdout.readline().strip() == "ready"
        for job in ("", "job-2"):  # another job: refused, naming the holder
            monkeypatch.setenv("TORCHELASTIC_RUN_ID", job)
            with pytest.raises(
                RequestError,
                match=rf"^the checkpoint root {root} is in use by pid {holder.pid} on host "
                rf"{socket.gethostname()}, since [0-9-]+ [0-9:]+: two writers on one root interleave "
                r"their checkpoints; stop that writer, or give this job another root$",
            ):
                ek.Checkpointer(root)
        # A later incarnation of the same elastic job (the holder's node hangs): it goes on.
        monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-1")
        with caplog.at_level("WARNING", logger="elastickit"):
            ek.Checkpointer(root).close()
        assert f"still held by pid {holder.pid}" in caplog.text and "earlier incarnation of this job" in caplog.text
        monkeypatch.delenv("TORCHELASTIC_RUN_ID")
    finally:
        holder.kill()  # SIGKILL: no close(), no atexit; the kernel drops the lock with the process
        holder.wait(timeout=60)
    m = torch.nn.Linear(2, 2)
    with ek.Checkpointer(root) as ck:  # the restart is not blocked by a stale lock
        assert ck.restore({"model": m}) == 1
        ck.save(2, {"model": m})
    assert [c.step for c in list_checkpoints(root)] == [1, 2]


def test_checkpointers_of_one_process_share_the_lock_and_forked_children_do_not_hold_it(tmp_path):
    from elastickit.checkpoint.lock import RootLock

    root = str(tmp_path)
    a, b = ek.Checkpointer(root), ek.Checkpointer(root)  # one process is one writer, as before
    go_r, go_w = os.pipe()
    res_r, res_w = os.pipe()
    pid = os.fork()  # a worker forked while the root is locked (a DataLoader worker, say)
    if pid == 0:
        for _ in range(2):  # while the parent holds the root, then after it let go
            os.read(go_r, 1)
            try:
                RootLock.acquire(root).release()
                os.write(res_w, b"free".ljust(200))
            except RequestError as e:
                os.write(res_w, str(e).encode()[:200].ljust(200))
        os._exit(0)
    try:
        os.write(go_w, b"x")
        while_held = os.read(res_r, 200).decode().strip()
        a.close()
        b.close()
        os.write(go_w, b"x")
        after = os.read(res_r, 200).decode().strip()
    finally:
        os.waitpid(pid, 0)
    assert while_held.startswith(f"the checkpoint root {root} is in use by pid {os.getpid()} on host")
    assert after == "free"  # the child, alive, does not hold the root: a restart is not blocked


# -- item 1: a node-local tier only ever offers checkpoints of its own run -----------------------


def _linear(seed):
    torch.manual_seed(seed)
    return torch.nn.Linear(3, 3)


def test_two_runs_sharing_a_local_tier_path_never_see_each_other(tmp_path):
    tiers = Tiers(local=TierSpec(path=str(tmp_path / "shm" / "{node}")))  # the README's example
    a, b = _linear(1), _linear(2)
    with ek.Checkpointer(str(tmp_path / "A"), tiers=tiers) as ck_a, ek.Checkpointer(str(tmp_path / "B"), tiers=tiers) as ck_b:
        ck_a.save(5, {"model": a})  # both at once, with the same step numbers
        ck_b.save(5, {"model": b})
    fresh = _linear(3)
    before = fresh.weight.detach().clone()
    with ek.Checkpointer(str(tmp_path / "C"), tiers=tiers) as ck:  # a new run on a fresh root
        assert ck.restore({"model": fresh}) == 0
    assert torch.equal(fresh.weight, before)
    for root, want in (("A", a), ("B", b)):
        got = _linear(4)
        with ek.Checkpointer(str(tmp_path / root), tiers=tiers) as ck:
            assert ck.restore({"model": got}) == 5
        assert torch.equal(got.weight, want.weight), f"run {root} got another run's weights"


def test_a_restart_resumes_from_the_local_tier_and_a_remade_root_is_a_new_run(tmp_path):
    import shutil

    from elastickit.checkpoint.events import read_events

    shm = tmp_path / "shm"
    tiers = Tiers(local=TierSpec(path=str(shm / "{node}")), persistent=None)  # the local tier only
    root = str(tmp_path / "A")
    m = _linear(1)
    with ek.Checkpointer(root, tiers=tiers) as ck:
        ck.save(5, {"model": m})
    got = _linear(2)
    with ek.Checkpointer(root, tiers=tiers) as ck:  # the same root, restarted
        assert ck.restore({"model": got}) == 5
    assert torch.equal(got.weight, m.weight)
    assert [e["tier"] for e in read_events(os.path.join(root, "events.jsonl")) if e["type"] == "restore"] == ["local"]
    shutil.copytree(root, str(tmp_path / "copy"))  # a copy of a root is another run
    with ek.Checkpointer(str(tmp_path / "copy"), tiers=tiers) as ck:
        assert ck.restore({"model": _linear(3)}) == 0
    old = sorted(os.listdir(shm / "0"))
    shutil.rmtree(root)  # deleting the root starts a new run: the old one's local files go
    with ek.Checkpointer(root, tiers=tiers) as ck:
        assert ck.restore({"model": _linear(3)}) == 0
    now = sorted(os.listdir(shm / "0"))
    assert len(old) == 2 and len(now) == 2 and len(set(old) & set(now)) == 1  # the copy's run stays


# -- item 7: a checkpoint directory is not a root -----------------------------------------------


def test_a_checkpoint_directory_as_root_is_refused_naming_the_root(tmp_path):
    import shutil

    root = tmp_path / "ckpt"
    m = _linear(1)
    with ek.Checkpointer(str(root), every=40) as ck:
        ck.save(40, {"model": m})
    step_dir = root / "step-00000040"
    with pytest.raises(
        RequestError,
        match=rf"^{step_dir} is one checkpoint \(step 40\), not a checkpoint root that holds step-\* "
        rf"directories; give its root {root} \(and restore\(step=40\) to resume from this step\)$",
    ):
        ek.Checkpointer(str(step_dir))
    assert sorted(os.listdir(step_dir)) == ["manifest.json", "rank-00000.safetensors"]  # nothing written inside
    bare = tmp_path / "c1r"  # a checkpoint directory under any name (what `reshard` writes)
    shutil.move(str(step_dir), str(bare))
    with pytest.raises(RequestError, match=rf"^{bare} is one checkpoint \(step 40\), .*mv {bare} ROOT/step-00000040"):
        ek.Checkpointer(str(bare))
    new_root = tmp_path / "ROOT"
    new_root.mkdir()
    shutil.move(str(bare), str(new_root / "step-00000040"))  # the advice works
    got = _linear(2)
    with ek.Checkpointer(str(new_root)) as ck:
        assert ck.restore({"model": got}) == 40
    assert torch.equal(got.weight, m.weight)


# -- item 9: strict restore; item 15: a mismatch is not corruption -------------------------------


def _mlp(widths, seed):
    torch.manual_seed(seed)
    layers = [torch.nn.Linear(a, b) for a, b in itertools.pairwise(widths)]
    return torch.nn.Sequential(*layers)


def _saved_root(tmp_path, widths=(4, 6, 5, 3), steps=(1, 2)):
    m = _mlp(widths, 0)
    o = torch.optim.AdamW(m.parameters())
    root = str(tmp_path / "ckpt")
    with ek.Checkpointer(root) as ck:
        for s in steps:
            ck.save(s, {"model": m, "optim": o})
    return root, m


def _params(m):
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def test_restoring_into_a_smaller_model_is_refused_naming_both_sides(tmp_path):
    from elastickit.checkpoint.errors import MismatchError

    root, _ = _saved_root(tmp_path)
    small = _mlp((4, 6, 5), 1)  # the last layer is gone
    before = _params(small)
    with ek.Checkpointer(root) as ck, pytest.raises(
        MismatchError,
        match=r"^step 2 on the persistent tier \(.*step-00000002\) does not fit the state restored into it: "
        r"2 checkpoint tensor\(s\) are not in the state \(model/2\.bias, model/2\.weight\); restore into "
        r"the model that was saved, or pass strict=False to load what matches$",
    ):
        ck.restore({"model": small})
    assert all(torch.equal(v, before[k]) for k, v in small.state_dict().items())  # untouched
    big = _mlp((4, 6, 5, 3, 2), 1)  # one layer more: the checkpoint lacks it
    with ek.Checkpointer(root) as ck, pytest.raises(
        MismatchError, match=r"2 tensor\(s\) of the state are not in the checkpoint \(model/3\.bias, model/3\.weight\)"
    ):
        ck.restore({"model": big})


def test_strict_false_loads_what_matches_and_reports_the_rest(tmp_path, caplog):
    from elastickit.checkpoint.events import read_events

    root, saved = _saved_root(tmp_path)
    small = _mlp((4, 6, 5), 1)
    with ek.Checkpointer(root) as ck, caplog.at_level("WARNING", logger="elastickit"):
        assert ck.restore({"model": small}, strict=False) == 2
        report = ck.last_restore
    assert report.unused == ("model/2.bias", "model/2.weight") and report.missing == ()
    assert torch.equal(small[0].weight, saved[0].weight) and torch.equal(small[1].bias, saved[1].bias)
    assert "strict=False: 2 checkpoint tensor(s) are not in the state (model/2.bias, model/2.weight)" in caplog.text
    (event,) = [e for e in read_events(os.path.join(root, "events.jsonl")) if e["type"] == "restore"]
    assert (event["unused"], event["missing"]) == (2, 0)
    big = _mlp((4, 6, 5, 3, 2), 1)
    kept = big[3].weight.detach().clone()
    with ek.Checkpointer(root) as ck:
        assert ck.restore({"model": big}, strict=False) == 2
        assert ck.last_restore.missing == ("model/3.bias", "model/3.weight")
    assert torch.equal(big[3].weight, kept) and torch.equal(big[2].weight, saved[2].weight)


def test_a_subset_of_the_saved_state_names_is_not_a_mismatch(tmp_path):
    root, saved = _saved_root(tmp_path)
    m = _mlp((4, 6, 5, 3), 1)
    with ek.Checkpointer(root) as ck:
        assert ck.restore({"model": m}) == 2  # the optimizer's tensors are simply not asked for
    assert torch.equal(m[2].weight, saved[2].weight)


@pytest.mark.parametrize("rows", [5, 7])  # fewer rows used to load a slice silently; more, to fall back
def test_a_shape_mismatch_raises_once_without_falling_back(tmp_path, caplog, rows):
    from elastickit.checkpoint.errors import MismatchError
    from elastickit.checkpoint.events import read_events

    root, _ = _saved_root(tmp_path)
    other = _mlp((4, rows, 5, 3), 1)
    with ek.Checkpointer(root) as ck, caplog.at_level("WARNING", logger="elastickit"), pytest.raises(
        MismatchError,
        match=rf"^the model's tensor 'model/0\.weight' has shape \[{rows}, 4\] \(F32\), but in "
        rf"{root}/step-00000002 it has shape \[6, 4\] \(F32\): they are different models",
    ) as e:
        ck.restore({"model": other})
    assert e.value.tensor == "model/0.weight"
    assert "trying the next" not in caplog.text  # step 1 was not tried: it would not fit either
    assert not [x for x in read_events(os.path.join(root, "events.jsonl")) if x["type"] == "restore_fallback"]


def test_a_mismatch_against_the_memory_tier_is_a_mismatch_too(tmp_path):
    from elastickit.checkpoint.errors import MismatchError

    m = _mlp((4, 6, 3), 0)
    with ek.Checkpointer(str(tmp_path), tiers=Tiers(persistent=None)) as ck:  # the memory tier only
        ck.save(1, {"model": m})
        with pytest.raises(MismatchError, match=r"but in the in-memory snapshot of step 1 it has shape \[6, 4\]"):
            ck.restore({"model": _mlp((4, 7, 3), 1)})
        with pytest.raises(MismatchError, match=r"2 checkpoint tensor\(s\) are not in the state \(model/1\.bias, model/1\.weight\)"):
            ck.restore({"model": _mlp((4, 6), 1)})
        small = _mlp((4, 6), 1)
        assert ck.restore({"model": small}, strict=False) == 1
        assert ck.last_restore.tier == "memory" and ck.last_restore.unused == ("model/1.bias", "model/1.weight")
        assert torch.equal(small[0].weight, m[0].weight)
