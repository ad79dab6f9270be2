"""Restore from the node-local tier under damage (issue 17, item 2, on `storage.node.NodeTier`):
a step no node can serve whole is skipped with a restore_fallback event naming the file, and a
damaged manifest copy on one node does not hide an intact copy on another."""

import glob
import os

import torch
from elastickit.checkpoint.events import read_events
from elastickit.checkpoint.storage.node import local_restorable, local_unservable
from elastickit.checkpoint.tiers import Tiers, TierSpec

import elastickit as ek


def _local_only(tmp_path) -> Tiers:
    return Tiers(memory=None, local=TierSpec(path=str(tmp_path / "shm"), keep_last=3), persistent=None)


def _save_two(tmp_path) -> tuple[str, dict[int, torch.Tensor]]:
    root = str(tmp_path / "root")
    weights = {}
    m = torch.nn.Linear(3, 2)
    with ek.Checkpointer(root, tiers=_local_only(tmp_path)) as ck:
        for step in (1, 2):
            with torch.no_grad():
                m.weight.fill_(float(step))
            weights[step] = m.weight.detach().clone()
            ck.save(step, {"model": m}, force=True)
            ck.wait()
    return root, weights


def _step_dir(tmp_path, step: int) -> str:
    (found,) = glob.glob(str(tmp_path / "shm" / "**" / f"step-{step:08d}"), recursive=True)
    return found


def _restore(root: str, tmp_path) -> tuple[int, torch.Tensor, list[dict]]:
    m = torch.nn.Linear(3, 2)
    with ek.Checkpointer(root, tiers=_local_only(tmp_path)) as ck:
        step = ck.restore({"model": m})
    events = [e for e in read_events(os.path.join(root, "events.jsonl")) if e["type"] == "restore_fallback"]
    return step, m.weight.detach(), events


def test_a_damaged_local_manifest_is_skipped_with_an_event_naming_it(tmp_path):
    root, weights = _save_two(tmp_path)
    manifest = os.path.join(_step_dir(tmp_path, 2), "manifest.json")
    with open(manifest, "rb") as f:
        data = bytearray(f.read())
    data[len(data) // 2] ^= 0x20  # still UTF-8, no longer the manifest its checksum vouches for
    with open(manifest, "wb") as f:
        f.write(bytes(data))
    step, w, events = _restore(root, tmp_path)
    assert step == 1 and torch.equal(w, weights[1])
    assert [(e["step"], e["tier"]) for e in events] == [(2, "local")]
    assert manifest in events[0]["reason"]


def test_a_short_local_file_is_skipped_with_an_event_naming_it(tmp_path):
    root, weights = _save_two(tmp_path)
    (rank_file,) = glob.glob(os.path.join(_step_dir(tmp_path, 2), "rank-*"))
    size = os.path.getsize(rank_file)
    os.truncate(rank_file, size - 7)
    step, w, events = _restore(root, tmp_path)
    assert step == 1 and torch.equal(w, weights[1])
    assert [(e["step"], e["tier"]) for e in events] == [(2, "local")]
    name = os.path.basename(rank_file)
    assert f"{name} is {size - 7} bytes instead of {size}" in events[0]["reason"]


def test_one_nodes_damaged_manifest_does_not_hide_the_others_copy():
    good = {"5": {"files": {"rank-00000.safetensors": 10}, "needs": {"rank-00000.safetensors": 10, "rank-00001.safetensors": 12}}}
    bad = {"5": {"files": {"rank-00001.safetensors": 12}, "bad_manifest": "/n1/step-00000005/manifest.json is corrupt"}}
    assert local_restorable([bad, good]) == [5]
    assert local_unservable([bad, good]) == {}
    # Every copy damaged: unservable, saying why; a file lost on every node: named.
    assert local_unservable([bad, {"5": dict(bad["5"])}]) == {5: "/n1/step-00000005/manifest.json is corrupt"}
    lost = {"5": {"files": {"rank-00000.safetensors": 10}, "needs": good["5"]["needs"]}}
    assert local_unservable([lost]) == {5: "on every node that holds step 5: rank-00001.safetensors is missing"}
