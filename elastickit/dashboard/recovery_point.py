"""What each tier could restore right now, and the what-if: "if node J died now, the run would
restore step N from tier T".

`scan_tiers` reads the tiers' contents from disk (the persistent root's committed steps; each
node's local directory: manifests, its own rank files and the peer copies of its buddy's);
`what_if` is pure over that scan. It asks the question exactly as a restore would, with
`elastickit.checkpoint.recover.candidates` over the inventories of the nodes that would
survive, so the answer is the checkpoint the survivors would actually load (memory snapshots
live inside the processes and are not counted: a lost node takes its ranks' with it).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from .logs import RunSources

@dataclass(frozen=True, slots=True, kw_only=True)
class NodeTier:
    """One node's local tier as found on disk.

    Attributes:
        node: the node index.
        path: its local tier directory ("" when unknown).
        state: the node's state in nodes.json ("running", ...; "" when not listed).
        inventory: `recover.local_inventory` of `path`: step -> {"files", "needs"}.
    """

    node: int
    path: str
    state: str
    inventory: dict[str, Any]

    @property
    def up(self) -> bool:
        return self.state in ("", "running")

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
    from elastickit.checkpoint.catalog import list_checkpoints
    from elastickit.checkpoint.recover import local_inventory

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
        path = paths.get(idx, "")
        inv = local_inventory(path) if path and os.path.isdir(path) else {}
        found.append(NodeTier(node=idx, path=path, state=states.get(idx, ""), inventory=inv))
    return TierContents(
        persistent_root=sources.ckpt_root, persistent_steps=persistent, nodes=tuple(found)
    )


def restore_point(contents: TierContents, lost: set[int]) -> dict[str, Any]:
    """The checkpoint the nodes not in `lost` would restore: {"step", "tier", "from_nodes"}
    (step None when nothing survives). tier is "persistent", "peer" (a lost node took part in
    that checkpoint: its shards come from the copies on its buddy) or "local"."""
    from elastickit.checkpoint.recover import candidates

    survivors = [n for n in contents.nodes if n.up and n.node not in lost]
    persistent = list(contents.persistent_steps)
    gathered = [{"memory": [], "local": n.inventory, "persistent": persistent} for n in survivors]
    if not gathered:
        gathered = [{"memory": [], "local": {}, "persistent": persistent}]
    found = candidates(gathered)
    if not found:
        return {"step": None, "tier": None, "from_nodes": []}
    best = found[0]
    if best.tier == "persistent":
        return {"step": best.step, "tier": "persistent", "from_nodes": []}
    key = str(best.step)
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
    return {"step": best.step, "tier": tier, "from_nodes": serving}


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
        rows.append({"node": n.node, "state": n.state or "running", **point,
                     "lost_steps": _lost(current_step, point["step"]),
                     "text": _sentence(f"node {n.node}", point)})
    everything = restore_point(TierContents(persistent_root=contents.persistent_root,
                                            persistent_steps=contents.persistent_steps), set())
    rows.append({"node": "all", "state": "", **everything,
                 "lost_steps": _lost(current_step, everything["step"]),
                 "text": _sentence("every node" if contents.nodes else "this job", everything)})
    return rows


def _lost(current: int | None, step: int | None) -> int | None:
    return None if current is None or step is None else max(0, current - step)


def _sentence(who: str, point: dict[str, Any]) -> str:
    when = "if every node died at once" if who == "every node" else f"if {who} died now"
    if point["step"] is None:
        return f"{when}, no checkpoint would survive: the run would start over"
    where = {
        "persistent": "the persistent tier",
        "local": "the node-local tier" + _on(point["from_nodes"]),
        "peer": "peer copies" + _on(point["from_nodes"]),
    }[point["tier"]]
    return f"{when}, the run would restore step {point['step']} from {where}"


def _on(nodes: list[int]) -> str:
    if not nodes:
        return ""
    return " on node " + ", ".join(str(n) for n in nodes) if len(nodes) == 1 else (
        " on nodes " + ", ".join(str(n) for n in nodes)
    )
