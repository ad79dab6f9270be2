"""What a new user gets wrong with a Checkpointer (issue 13): each guard names the problem in
one sentence instead of losing data or resuming someone else's state."""

import os

import pytest
import torch
from typer.testing import CliRunner

import elastickit as ek
from elastickit.checkpoint.catalog import list_checkpoints
from elastickit.checkpoint.errors import RequestError
from elastickit.checkpoint.tiers import Tiers, TierSpec
from elastickit.cli.main import app


# -- item 3: URLs are not relative paths; `~` is the home directory ------------------------------


@pytest.mark.parametrize("url", ["gs://bucket/x", "s3://bucket/x", "file:///tmp/x"])
def test_url_root_is_refused_and_writes_nothing(tmp_path, monkeypatch, url):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RequestError, match=rf"the Checkpointer root '{url}' is a \w+:// URL.*local"):
        ek.Checkpointer(url)
    with pytest.raises(RequestError, match=r"the tier path 'gs://b/\{node\}' is a gs:// URL"):
        TierSpec(path="gs://b/{node}")
    assert os.listdir(tmp_path) == []  # no ./gs:/bucket/x, no ./file:/...


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
        ("verify", "s3://bucket/c1"),
        ("ls", "file:///tmp/c1"),
        ("convert", "c1", "gs://bucket/y"),
        ("convert", "gs://bucket/c1", "y"),
        ("reshard", "c1", "gs://bucket/y", "--to", "tp=1"),
        ("train", "--ckpt", "gs://bucket/run", "--steps", "1"),
    ],
)
def test_cli_refuses_urls(tmp_path, monkeypatch, args):
    with ek.Checkpointer(str(tmp_path / "c1")) as ck:
        ck.save(1, {"model": torch.nn.Linear(2, 2)})
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(app, list(args))
    assert r.exit_code == 2, r.output
    url = next(a for a in args if "://" in a)
    assert r.output.startswith("error: ") and f"'{url}' is a" in r.output and "URL" in r.output
    assert len(r.output.strip().splitlines()) == 1
    assert sorted(os.listdir(tmp_path)) == ["c1"]  # nothing written under ./gs:, ./y
