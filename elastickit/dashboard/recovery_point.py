"""What each tier could restore right now, and the what-if: "if node J died now, the run would
restore step N from tier T".

`scan_tiers` reads the tiers' contents from disk (the persistent root's committed steps; each
node's local directory: manifests, its own rank files and the peer copies of its buddy's);
`what_if` is pure over that scan. A Checkpointer keeps each run's node-local checkpoints in a
directory of their own (`<local path>/run-<key>/`, see `elastickit.checkpoint.runs`): the scan
reads the one of this run (the key of the persistent root's run id), not whatever else the node's
storage holds. It asks the question exactly as a restore would, with the restore's rule
(`elastickit.checkpoint.storage.node.local_restorable`, the persistent tier's committed steps,
the node-local tier first at equal steps) over the inventories of the nodes that would
survive, so the answer is the checkpoint the survivors would actually load (memory snapshots
live inside the processes and are not counted: a lost node takes its ranks' with it).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from .logs import RunSources

# nodes.json states whose node still holds its local tier (killed, stopped, fenced and failed
# nodes do not count: their storage is gone or out of reach).
UP_STATES = ("", "running", "rejoining", "spare", "done")


@dataclass(frozen=True, slots=True, kw_only=True)
class NodeTier:
    """One node's local tier as found on disk.

    Attributes:
        node: the node index.
        path: its local tier directory ("" when unknown).
        state: the node's state in nodes.json ("running", ...; "" when not listed).
        inventory: `storage.node.node_inventory` of `path`: step -> {"files", "needs"}.
    """

    node: int
    path: str
    state: str
    inventory: dict[str, Any]

    @property
    def up(self) -> bool:
        """The node and its storage are there: running, waiting to join, or finished cleanly
        (a finished run's node-local checkpoints stay until the node is lost)."""
        return self.state in UP_STATES

    def committed_steps(self) -> list[int]:
        """Steps whose manifest this directory holds, oldest first."""
        return sorted(int(s) for s, e in self.inventory.items() if "needs" in e)


@dataclass(frozen=True, slots=True, kw_only=True)
class TierContents:
    """What the tiers hold now.

    Attributes:
        persistent_root: the persistent tier's root ("" when unknown).
        persistent_steps: its committed steps, oldest first.
        nodes: every known node's local tier, by node index.
    """

    persistent_root: str = ""
    persistent_steps: tuple[int, ...] = ()
    nodes: tuple[NodeTier, ...] = ()


def scan_tiers(sources: RunSources, nodes: tuple[dict[str, Any], ...]) -> TierContents:
    """Read the tiers' contents from disk (listing directories and reading manifests only)."""
    from elastickit.checkpoint.format.directory import list_checkpoints
    from elastickit.checkpoint.storage.node import node_inventory

    persistent: tuple[int, ...] = ()
    if sources.ckpt_root and os.path.isdir(sources.ckpt_root):
        persistent = tuple(c.step for c in list_checkpoints(sources.ckpt_root) if c.complete)
    base = os.path.dirname(os.path.abspath(sources.nodes)) if sources.nodes else ""
    paths: dict[int, str] = dict(sources.local)
    states: dict[int, str] = {}
    for n in nodes:
        idx = n.get("node")
        if not isinstance(idx, int) or isinstance(idx, bool):
            continue
        states[idx] = str(n.get("state", ""))
        local = n.get("local")
        if isinstance(local, str) and local and idx not in paths:
            paths[idx] = local if os.path.isabs(local) else os.path.join(base, local)
    found = []
    for idx in sorted(set(paths) | set(states)):
        path = _this_run(paths.get(idx, ""), sources.ckpt_root, base)
        inv = node_inventory(path) if path and os.path.isdir(path) else {}
        found.append(NodeTier(node=idx, path=path, state=states.get(idx, ""), inventory=inv))
    return TierContents(
        persistent_root=sources.ckpt_root, persistent_steps=persistent, nodes=tuple(found)
    )


def _this_run(path: str, ckpt_root: str, run_dir: str) -> str:
    """The directory of this run's checkpoints in node-local tier directory `path` ("" when it
    holds none of this run's).

    `path` itself when it holds step directories (a layout without run keys); else its
    `run-<key>` directory: the key of the persistent root's run id (what a restore reads), or the
    one whose `run.json` names this root; else, when `path` lies inside the run directory (as
    `elastickit train --nodes` keeps it) and holds a single run directory, that one: the run
    directory was moved or copied (the key hashes the root's real path), its tiers with it."""
    from elastickit.checkpoint.format.manifest import STEP_DIR_RE
    from elastickit.checkpoint.runs import existing_run_key, local_run_dirs

    if not path or not os.path.isdir(path):
        return path
    if any(STEP_DIR_RE.match(n) for n in os.listdir(path)):
        return path
    runs = local_run_dirs(path)
    if not runs:
        return path
    key = existing_run_key(ckpt_root) if ckpt_root else None
    if key and os.path.join(path, f"run-{key}") in runs:
        return os.path.join(path, f"run-{key}")
    root = os.path.realpath(ckpt_root) if ckpt_root else ""
    named = [p for p, r in runs.items() if root and r == root]
    if len(named) == 1:
        return named[0]
    inside = run_dir and os.path.realpath(path).startswith(os.path.realpath(run_dir) + os.sep)
    if inside and len(runs) == 1:
        return next(iter(runs))
    return ""


def restore_point(contents: TierContents, lost: set[int]) -> dict[str, Any]:
    """The checkpoint the nodes not in `lost` would restore: {"step", "tier", "from_nodes"}
    (step None when nothing survives). tier is "persistent", "peer" (a lost node took part in
    that checkpoint: its shards come from the copies on its buddy) or "local"."""
    from elastickit.checkpoint.storage.node import local_restorable

    survivors = [n for n in contents.nodes if n.up and n.node not in lost]
    local = max(local_restorable([n.inventory for n in survivors]), default=None)
    persistent = max(contents.persistent_steps, default=None)
    if local is None and persistent is None:
        return {"step": None, "tier": None, "from_nodes": []}
    if local is None or (persistent is not None and persistent > local):  # equal: the node-local tier is faster
        return {"step": persistent, "tier": "persistent", "from_nodes": []}
    key = str(local)
    needs: dict[str, int] = next(
        (n.inventory[key]["needs"] for n in survivors if "needs" in n.inventory.get(key, {})), {}
    )
    serving = sorted(
        {n.node for n in survivors if set(n.inventory.get(key, {}).get("files", {})) & set(needs)}
    )
    # A lost node that took part in that checkpoint had its own shards in it: they now come
    # from the copies its buddy holds.
    took_part = any(key in n.inventory for n in contents.nodes if n.node in lost)
    tier = "peer" if took_part else "local"
    return {"step": local, "tier": tier, "from_nodes": serving}


def what_if(contents: TierContents, current_step: int | None) -> list[dict[str, Any]]:
    """For each node that is up: what the run would restore if that node died now; then the
    same for the loss of every node at once (only the persistent tier is left)."""
    rows = []
    for n in contents.nodes:
        if not n.up:
            rows.append({"node": n.node, "state": n.state, "step": None, "tier": None,
                         "from_nodes": [], "lost_steps": None,
                         "text": f"node {n.node} is {n.state or 'down'}"})
            continue
        point = restore_point(contents, {n.node})
        # A finished node cannot die, but its storage can still be lost before a resume.
        when = f"if node {n.node} were lost now" if n.state == "done" else f"if node {n.node} died now"
        rows.append({"node": n.node, "state": n.state or "running", **point,
                     "lost_steps": _lost(current_step, point["step"]),
                     "text": _sentence(when, point, lost=n.node)})
    everything = restore_point(TierContents(persistent_root=contents.persistent_root,
                                            persistent_steps=contents.persistent_steps), set())
    when = "if every node died at once" if contents.nodes else "if this job died now"
    rows.append({"node": "all", "state": "", **everything,
                 "lost_steps": _lost(current_step, everything["step"]),
                 "text": _sentence(when, everything)})
    return rows


def _lost(current: int | None, step: int | None) -> int | None:
    return None if current is None or step is None else max(0, current - step)


def _sentence(when: str, point: dict[str, Any], lost: int | None = None) -> str:
    if point["step"] is None:
        return f"{when}, no checkpoint would survive: the run would start over"
    where = {
        "persistent": "the persistent tier",
        "local": "the node-local tier" + _on(point["from_nodes"]),
        # Which survivor holds the lost node's copies is not on disk (rank files are named by
        # the rank that saved them, not by node): say that they are used, not where.
        "peer": "the node-local tier" + _on(point["from_nodes"])
        + (f", node {lost}'s shards from their peer copies" if lost is not None else ", with peer copies"),
    }[point["tier"]]
    return f"{when}, the run would restore step {point['step']} from {where}"


def _on(nodes: list[int]) -> str:
    if not nodes:
        return ""
    return " on node " + ", ".join(str(n) for n in nodes) if len(nodes) == 1 else (
        " on nodes " + ", ".join(str(n) for n in nodes)
    )
