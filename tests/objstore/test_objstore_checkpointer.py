"""The persistent tier on object storage, through the public API and the CLI, against a real
S3-compatible server (moto's standalone server on 127.0.0.1, a free port)."""

from __future__ import annotations

import json
import logging
import os

import pytest
import torch
from elastickit.checkpoint.errors import DataError, RequestError
from elastickit.checkpoint.storage.objstore import ObjectRoot
from elastickit.checkpoint.tiers import Tiers, TierSpec
from typer.testing import CliRunner

import elastickit as ek
from elastickit.cli.main import app
from tests._s3 import ACCESS_KEY, SECRET_KEY, s3fs_client

pytestmark = pytest.mark.timeout(180)


def _model(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    opt = torch.optim.AdamW(m.parameters(), lr=0.1)
    m(torch.randn(3, 16)).sum().backward()
    opt.step()
    return m, opt


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def _keys(bucket: str) -> list[str]:
    return sorted(k.split("/", 1)[1] for k in s3fs_client().find(bucket))


def test_save_restore_bit_exact_and_retention(bucket, tmp_path):
    url = f"s3://{bucket}/run"
    m, opt = _model(0)
    states = {}
    with ek.Checkpointer(url, keep_last=2, events=str(tmp_path / "events.jsonl")) as ck:
        for step in (1, 2, 3):
            m(torch.randn(3, 16)).sum().backward()
            opt.step()
            ck.save(step, {"model": m, "optim": opt})
            ck.wait()
            states[step] = {k: v.clone() for k, v in m.state_dict().items()}
        assert ck.latest() == 3
    keys = _keys(bucket)
    # Retention deleted step 1 whole; the writer lease is given back at close.
    assert [k for k in keys if "step-" in k] == [
        "run/step-00000002/manifest.json",
        "run/step-00000002/rank-00000.safetensors",
        "run/step-00000003/manifest.json",
        "run/step-00000003/rank-00000.safetensors",
    ]
    assert "run/.elastickit.lock" not in keys
    m2, opt2 = _model(1)
    with ek.Checkpointer(url, events=str(tmp_path / "events.jsonl")) as ck:
        assert ck.restore({"model": m2, "optim": opt2}) == 3
        assert _same(m, m2)
        assert ck.restore({"model": m2, "optim": opt2}, step=2) == 2
        assert all(torch.equal(v, states[2][k]) for k, v in m2.state_dict().items())
    # Optimizer state came back too (bit-exact: the next step matches).
    m(torch.ones(3, 16)).sum().backward(), m2(torch.ones(3, 16)).sum().backward()


def test_multipart_saves_from_the_snapshot_while_training_goes_on(bucket, tmp_path):
    # 40 MiB of state: three parts, sent straight from the host snapshot's memory. Training
    # overwrites the live tensors at once, and saves again while the first upload runs: each
    # step must come back as it was when it was saved.
    url = f"s3://{bucket}/big"
    g = torch.Generator().manual_seed(3)
    live = {f"w{i}": torch.randn(5 << 18, generator=g) for i in range(8)}  # 8 x 5 MiB
    saved = {}
    tiers = Tiers(memory=None, persistent=TierSpec(keep_last=3, max_busy_fraction=1.0))
    with ek.Checkpointer(url, tiers=tiers, rng=False, events=str(tmp_path / "events.jsonl")) as ck:
        for step in (1, 2, 3):
            ck.save(step, {"model": live})
            saved[step] = {k: v.clone() for k, v in live.items()}
            for v in live.values():
                v.mul_(-0.5).add_(step)
        ck.wait()
        committed = ObjectRoot(url).committed_steps()
    assert committed[-1] == 3
    for step in committed:
        got = {k: torch.zeros_like(v) for k, v in live.items()}
        with ek.Checkpointer(url, tiers=tiers, rng=False) as ck:
            assert ck.restore({"model": got}, step=step) == step
        assert all(torch.equal(got[k], saved[step][k]) for k in live)


def test_tierspec_url_with_storage_options_and_local_root(bucket, tmp_path, monkeypatch):
    """The persistent tier elsewhere than the root, credentials and endpoint in storage_options
    only (none in the environment)."""
    endpoint = os.environ["AWS_ENDPOINT_URL"]
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name)
    opts = {"key": ACCESS_KEY, "secret": SECRET_KEY, "endpoint_url": endpoint}
    tiers = Tiers(persistent=TierSpec(path=f"s3://{bucket}/p", storage_options=opts, zstd_level=3))
    assert SECRET_KEY not in repr(tiers)
    m, opt = _model(0)
    with ek.Checkpointer(tmp_path / "root", tiers=tiers) as ck:
        ck.save(5, {"model": m, "optim": opt})
    root = ObjectRoot(f"s3://{bucket}/p", opts)
    assert root.committed_steps() == [5]
    assert root.read_manifest(5).files["rank-00000.safetensors.zst"].compression == "zstd"
    m2, opt2 = _model(1)
    with ek.Checkpointer(tmp_path / "root", tiers=tiers) as ck:
        assert ck.restore({"model": m2, "optim": opt2}) == 5
    assert _same(m, m2)


def test_corrupt_object_falls_back_naming_it(bucket, tmp_path, caplog):
    url = f"s3://{bucket}/run"
    m, opt = _model(0)
    events = tmp_path / "events.jsonl"
    with ek.Checkpointer(url, events=str(events)) as ck:
        ck.save(1, {"model": m, "optim": opt})
        ck.wait()
        m(torch.randn(3, 16)).sum().backward()
        opt.step()
        ck.save(2, {"model": m, "optim": opt})
    fs = s3fs_client()
    key = f"{bucket}/run/step-00000002/rank-00000.safetensors"
    blob = bytearray(fs.cat_file(key))
    blob[-3] ^= 0x55  # a byte of the last stored tensor
    fs.pipe_file(key, bytes(blob))
    m2, opt2 = _model(1)
    with caplog.at_level(logging.WARNING, logger="elastickit"), ek.Checkpointer(url, events=str(events)) as ck:
        assert ck.restore({"model": m2, "optim": opt2}) == 1
    named = f"s3://{bucket}/run/step-00000002/rank-00000.safetensors"
    assert any(named in r.getMessage() and "checksum" in r.getMessage() for r in caplog.records)
    fallback = [json.loads(x) for x in events.read_text().splitlines() if '"restore_fallback"' in x]
    assert fallback and named in fallback[0]["reason"]
    # Every copy damaged: one error naming the object, no silent step 0.
    key1 = f"{bucket}/run/step-00000001/rank-00000.safetensors"
    fs.pipe_file(key1, fs.cat_file(key1)[:-1])
    with ek.Checkpointer(url, events=str(events)) as ck, pytest.raises(DataError, match=r"step-00000001/rank-00000.safetensors is \d+ bytes"):
        ck.restore({"model": m2, "optim": opt2})


def test_credentials_never_logged(bucket, tmp_path, caplog, capfd, monkeypatch):
    """The secret appears in no log record (debug included), no event, no manifest, no error."""
    endpoint = os.environ["AWS_ENDPOINT_URL"]
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    opts = {"key": ACCESS_KEY, "secret": SECRET_KEY, "endpoint_url": endpoint}
    tiers = Tiers(persistent=TierSpec(storage_options=opts, keep_last=1))
    events = tmp_path / "events.jsonl"
    m, opt = _model(0)
    seen: list[str] = []
    with caplog.at_level(logging.DEBUG):
        with ek.Checkpointer(f"s3://{bucket}/run", tiers=tiers, events=str(events)) as ck:
            for step in (1, 2):
                ck.save(step, {"model": m, "optim": opt})
                ck.wait()
            ck.restore({"model": m, "optim": opt})
        # A failing store: the errors must not carry the secret either.
        down = {**opts, "endpoint_url": "http://127.0.0.1:9", "config_kwargs": {"retries": {"max_attempts": 1}}}
        bad = Tiers(persistent=TierSpec(storage_options=down))
        with pytest.raises(RequestError) as e:
            ek.Checkpointer(f"s3://{bucket}/other", tiers=bad, events=str(events))
        seen.append(str(e.value))
        with pytest.raises(RequestError) as e:
            ek.Checkpointer("s3://bucket/x", tiers=Tiers(persistent=TierSpec(storage_options={**opts, "no_such_option": 1})))
        seen.append(str(e.value))
    assert "cannot write to s3://" in seen[0]
    seen += [r.getMessage() for r in caplog.records] + [str(r.args) for r in caplog.records]
    seen.append(events.read_text())
    fs = ObjectRoot(f"s3://{bucket}", opts).fs
    seen += [fs.cat_file(k).decode() for k in fs.find(bucket) if k.endswith("manifest.json")]
    out, err = capfd.readouterr()
    seen += [out, err]
    assert len(seen) > 10
    for text in seen:
        assert SECRET_KEY not in text


def test_url_without_backend_is_refused_naming_the_package(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RequestError, match=r"^the Checkpointer root gs://b/x needs the fsspec backend for gs://.*gcsfs"):
        ek.Checkpointer("gs://b/x")
    assert os.listdir(tmp_path) == []


def test_cli_on_s3_urls(bucket, tmp_path):
    url = f"s3://{bucket}/run"
    m, opt = _model(0)
    with ek.Checkpointer(url, events=str(tmp_path / "e.jsonl")) as ck:
        ck.save(3, {"model": m, "optim": opt})
    fs = s3fs_client()
    fs.pipe_file(f"{bucket}/run/step-00000004/rank-00000.safetensors", b"partial")  # never committed
    cli = CliRunner()

    r = cli.invoke(app, ["ls", url, "--json"])
    assert r.exit_code == 0, r.output
    rows = json.loads(r.output)
    assert [(x["step"], x["status"]) for x in rows] == [(3, "complete"), (4, "incomplete")]

    r = cli.invoke(app, ["inspect", url, "--json"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.output)
    assert info["step"] == 3 and info["path"] == f"{url}/step-00000003" and info["integrity"] == "files present"

    r = cli.invoke(app, ["verify", url])
    assert r.exit_code == 0 and "ok:" in r.output, r.output

    # reshard: a URL source read by ranged GETs, a URL destination uploaded manifest last.
    r = cli.invoke(app, ["reshard", url, f"s3://{bucket}/tp1", "--to", "dp=2"])
    assert r.exit_code == 0, r.output
    assert ObjectRoot(f"s3://{bucket}/tp1").committed_steps() == [3]
    # ... and back to a local root, to a local DST from a URL SRC.
    r = cli.invoke(app, ["reshard", f"s3://{bucket}/tp1", str(tmp_path / "back"), "--to", "dp=1"])
    assert r.exit_code == 0, r.output
    m2, opt2 = _model(1)
    with ek.Checkpointer(tmp_path / "back") as ck:
        assert ck.restore({"model": m2, "optim": opt2}) == 3
    assert _same(m, m2)

    # convert: URL -> URL (staged), then DCP to a URL and back.
    r = cli.invoke(app, ["convert", url, f"s3://{bucket}/conv"])
    assert r.exit_code == 0, r.output
    assert f"converted {url}" in r.output
    r = cli.invoke(app, ["convert", f"s3://{bucket}/conv", f"s3://{bucket}/dcp", "--to", "dcp"])
    assert r.exit_code == 0, r.output
    keys = [k for k in fs.find(f"{bucket}/dcp")]
    assert any(k.endswith(".metadata") for k in keys)
    r = cli.invoke(app, ["convert", f"s3://{bucket}/dcp", str(tmp_path / "fromdcp")])
    assert r.exit_code == 0, r.output
    m3, opt3 = _model(2)
    with ek.Checkpointer(tmp_path / "fromdcp") as ck:
        assert ck.restore({"model": m3, "optim": opt3}) == 3
    assert _same(m, m3)

    # A non-empty URL destination is refused; a corrupt object makes verify exit 1 naming it.
    r = cli.invoke(app, ["convert", url, f"s3://{bucket}/conv"])
    assert r.exit_code == 2 and "is not empty" in r.output, r.output
    key = f"{bucket}/run/step-00000003/rank-00000.safetensors"
    blob = bytearray(fs.cat_file(key))
    blob[-1] ^= 1
    fs.pipe_file(key, bytes(blob))
    r = cli.invoke(app, ["verify", url])
    assert r.exit_code == 1 and f"{url}/step-00000003/rank-00000.safetensors" in r.output, r.output


def test_cli_refuses_a_scheme_without_backend(tmp_path):
    r = CliRunner().invoke(app, ["ls", "gs://bucket/run"])
    assert r.exit_code == 2 and "gcsfs" in r.output and len(r.output.strip().splitlines()) == 1, r.output
