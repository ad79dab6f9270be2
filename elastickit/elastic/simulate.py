"""`elastickit train --nodes N`: N simulated nodes on this machine, and faults to throw at them.

The supervisor (this module, the `elastickit train` process) is outside every node: it hosts the
rendezvous store, starts one elastickit agent per node (`python -m elastickit.elastic.agent`,
each in its own session: the process group `nodes.json` names), and writes `RUN/nodes.json`.
Faults are what an operator would do from outside:

    killnode:node=J:step=S   SIGKILL to node J's process group once step S is done (the agent,
                             and its workers through PR_SET_PDEATHSIG); its node-local tier is
                             wiped, as when a machine is lost
    stopnode:node=J:step=S   SIGSTOP to node J (agent and workers): a hung node. Once the job
                             has left it out, the supervisor fences it (SIGKILL), as a cluster
                             manager would before giving its place to anyone else

    hang:rank=R:step=S       rank R's training loop stops at the start of step S (steps.jsonl
                             numbering), once in the job; its process and heartbeat live on.
                             Done by the worker itself (`--inject` is passed on to the workers)

Each injected fault is also written to the store (`fault/<node>`), so the recovery event can say
how long detection took. `rejoin_after_s` restarts a killed or fenced node that many seconds
later: it comes back as a spare, and the job grows back onto it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from elastickit.checkpoint.errors import RequestError

from .injection import NodeFault, parse_node_fault
from .rundir import NodeRecord, RunDir

__all__ = ["Cluster", "NodeFault", "SimRequest", "parse_node_fault"]


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class SimRequest:
    """What `elastickit train --nodes` starts."""

    nodes: int
    run: str
    worker_args: tuple[str, ...]
    """Trainer flags for every worker (without --run and --local-tier, added here)."""
    min_nodes: int = 1
    nproc_per_node: int = 1
    faults: tuple[NodeFault, ...] = ()
    rejoin_after_s: float | None = None
    max_restarts: int = 3
    quiet: bool = False
    """Workers' output (one line per step) to the node logs instead of this process's stdout."""
    rdzv_conf: str = "last_call_timeout=5"
    """The first round waits this long for every node; later rounds happen with the
    workers training on, so it never stalls training."""
    python: str = sys.executable

    def check(self) -> None:
        if self.nodes < 1:
            raise RequestError(f"--nodes must be at least 1, got {self.nodes}")
        if not 1 <= self.min_nodes <= self.nodes:
            raise RequestError(f"--min-nodes {self.min_nodes} must be within 1..--nodes {self.nodes}")
        if self.nproc_per_node < 1:
            raise RequestError(f"--nproc-per-node must be at least 1, got {self.nproc_per_node}")
        if self.rejoin_after_s is not None and self.rejoin_after_s < 0:
            raise RequestError(f"--rejoin-after must be >= 0 seconds, got {self.rejoin_after_s}")


@dataclasses.dataclass(slots=True)
class _Node:
    index: int
    proc: subprocess.Popen[bytes] | None = None
    state: str = "starting"
    down_at: float | None = None
    rejoin_at: float | None = None
    workers: tuple[int, ...] = ()
    log: Any = None


class Cluster:
    """The simulated nodes of one run (see the module docstring). `run()` returns an exit code."""

    def __init__(self, req: SimRequest, *, on_line: Callable[[str], None] | None = None) -> None:
        req.check()
        self.req = req
        self.rundir = RunDir(req.run)
        self.run_id = f"ek-{uuid.uuid4().hex[:12]}"
        self.nodes = [_Node(index=j) for j in range(req.nodes)]
        self.pending = sorted((f for f in req.faults if f.kind != "hang"), key=lambda f: f.step)
        self.on_line = on_line or (lambda s: print(s, file=sys.stderr, flush=True))
        self.store: Any = None
        self.port = 0
        self._steps_pos = 0
        self.step = 0

    # -- processes ---------------------------------------------------------------------------

    def start(self) -> None:
        from .store import master_store

        self.rundir.make()
        os.makedirs(os.path.join(self.rundir.root, "logs"), exist_ok=True)
        # The store lives here, outside every node: a node's death never takes it down.
        self.store = master_store("127.0.0.1", 0)
        self.port = self.store.port
        for node in self.nodes:
            self._start_node(node)
        self._write_nodes()

    def _key(self, name: str) -> str:
        return f"ek/{self.run_id}/{name}"

    def _start_node(self, node: _Node) -> None:
        r = self.req
        log_path = os.path.join(self.rundir.root, "logs", f"node{node.index}.log")
        node.log = open(log_path, "ab")  # noqa: SIM115 - closed when the node goes
        cmd = [
            r.python, "-m", "elastickit.elastic.agent",
            "--nnodes", f"{r.min_nodes}:{r.nodes}",
            "--nproc-per-node", str(r.nproc_per_node),
            "--rdzv-endpoint", f"127.0.0.1:{self.port}",
            "--rdzv-id", self.run_id,
            "--rdzv-conf", r.rdzv_conf,
            "--max-restarts", str(r.max_restarts),
            "--node", str(node.index),
            "--local-addr", "127.0.0.1",
            "--", *r.worker_args,
            "--run", self.rundir.root,
            "--local-tier", self.rundir.local_tier(node.index),
        ]
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        # Its own session: the agent leads the process group that `kill -9 -PGID` takes down.
        node.proc = subprocess.Popen(
            cmd, stdout=node.log if r.quiet else None, stderr=node.log, env=env, start_new_session=True
        )
        node.state = "running"
        node.workers = ()

    def _worker_pids(self, node: _Node) -> tuple[int, ...]:
        """The node's worker processes: children of its agent (their own sessions)."""
        if node.proc is None:
            return ()
        out = []
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            try:
                with open(f"/proc/{name}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == node.proc.pid:
                out.append(int(name))
        return tuple(sorted(out))

    def _write_nodes(self) -> None:
        recs = []
        for n in self.nodes:
            pid = n.proc.pid if n.proc is not None else 0
            local = os.path.relpath(self.rundir.local_tier(n.index), self.rundir.root)
            recs.append(NodeRecord(node=n.index, pid=pid, pgid=pid, state=n.state, workers=n.workers, local=local))
        self.rundir.write_nodes(recs)

    # -- faults ----------------------------------------------------------------------------

    def _mark_fault(self, node: _Node, kind: str) -> None:
        self.store.set(self._key(f"fault/{node.index}"), json.dumps({"kind": kind, "time": time.time()}))

    def kill_node(self, node: _Node, *, kind: str = "killnode", quiet: bool = False) -> None:
        """SIGKILL the node's process group (its workers follow through PDEATHSIG)."""
        assert node.proc is not None
        workers = self._worker_pids(node)
        self._mark_fault(node, kind)
        try:
            os.killpg(node.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for pid in workers:  # a stopped worker dies only once it runs: kill it outright
            _signal(pid, signal.SIGKILL)
        node.proc.wait()
        node.log.close()
        self._lost(node)
        if not quiet:
            self.on_line(f"elastickit train: killed node {node.index} (kill -9 -{node.proc.pid}) after step {self.step}")

    def _lost(self, node: _Node) -> None:
        # The machine is gone, and its node-local storage with it.
        shutil.rmtree(self.rundir.local_tier(node.index), ignore_errors=True)
        node.state = "killed"
        node.down_at = time.monotonic()
        if self.req.rejoin_after_s is not None:
            node.rejoin_at = node.down_at + self.req.rejoin_after_s

    def stop_node(self, node: _Node) -> None:
        """SIGSTOP the node: its agent and every worker (a hung machine)."""
        assert node.proc is not None
        node.workers = self._worker_pids(node)
        self._mark_fault(node, "stopnode")
        try:
            os.killpg(node.proc.pid, signal.SIGSTOP)
        except ProcessLookupError:
            pass
        for pid in node.workers:
            _signal(pid, signal.SIGSTOP)
        node.state = "stopped"
        node.down_at = time.monotonic()
        if self.req.rejoin_after_s is not None:
            node.rejoin_at = node.down_at + self.req.rejoin_after_s
        self.on_line(f"elastickit train: stopped node {node.index} (SIGSTOP) after step {self.step}")

    def _in_plan(self, node: _Node) -> bool:
        """The job's newest plan still has a worker of `node` training (or there is no plan)."""
        plan = self._latest_plan()
        return plan is None or any(m.split(".")[0] == str(node.index) for m in plan.get("active", ()))

    def _fence_if_evicted(self, node: _Node) -> None:
        """A stopped node the job left out is killed (fenced), never woken into a stale plan."""
        if self._in_plan(node):
            return
        rejoin_at = node.rejoin_at
        self.kill_node(node, kind="stopnode", quiet=True)
        node.state = "fenced"
        node.rejoin_at = rejoin_at
        self.on_line(f"elastickit train: node {node.index} was left out by the job; fenced it (SIGKILL)")

    def _latest_plan(self) -> dict[str, Any] | None:
        gen, plan = 0, None
        while self.store.check([self._key(f"plan/{gen + 1}")]):
            gen += 1
        if gen:
            plan = json.loads(self.store.get(self._key(f"plan/{gen}")))
        return plan

    def _rejoin(self, node: _Node) -> None:
        try:
            self.store.delete_key(self._key(f"fault/{node.index}"))
        except Exception:  # noqa: BLE001
            pass
        self._start_node(node)
        node.state = "rejoining"
        node.rejoin_at = None
        self.on_line(f"elastickit train: node {node.index} is back (a new agent, pid {node.proc.pid}); it joins as a spare")

    # -- the loop ----------------------------------------------------------------------------

    def _read_steps(self) -> None:
        try:
            with open(self.rundir.steps, "rb") as f:
                f.seek(self._steps_pos)
                data = f.read()
        except FileNotFoundError:
            return
        end = data.rfind(b"\n") + 1
        self._steps_pos += end
        for line in data[:end].splitlines():
            try:
                self.step = max(self.step, int(json.loads(line)["step"]))
            except (ValueError, KeyError):
                continue

    def poll(self) -> None:
        """One round: steps so far, due faults, fencing, rejoins, node states."""
        self._read_steps()
        changed = False
        while self.pending and self.step >= self.pending[0].step:
            fault = self.pending.pop(0)
            node = self.nodes[fault.node]
            if node.state not in ("running", "rejoining"):
                continue
            (self.kill_node if fault.kind == "killnode" else self.stop_node)(node)
            changed = True
        now = time.monotonic()
        for node in self.nodes:
            if node.state == "stopped":
                self._fence_if_evicted(node)
                changed = True
            if (node.rejoin_at is not None and now >= node.rejoin_at and node.state in ("killed", "fenced")
                    and not self._in_plan(node)):  # not before the job left it out: the fault is named then
                self._rejoin(node)
                changed = True
            if node.state in ("running", "rejoining") and node.proc is not None:
                code = node.proc.poll()
                if code is not None and code < 0 and self.done() is None:
                    node.log.close()  # killed from outside (`kill -9 -PGID`): a lost node
                    self._lost(node)
                    self.on_line(f"elastickit train: node {node.index} was killed from outside (signal {-code})")
                    changed = True
                elif code is not None:
                    node.state = "done" if code == 0 else "failed"
                    changed = True
                elif not node.workers:
                    node.workers = self._worker_pids(node)
                    changed = changed or bool(node.workers)
        if changed:
            self._write_nodes()

    def done(self) -> dict[str, Any] | None:
        key = self._key("done")
        return json.loads(self.store.get(key)) if self.store.check([key]) else None

    def run(self, timeout_s: float | None = None) -> int:
        """Start, supervise until the job is done; 0 when every step was trained."""
        self.start()
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        try:
            while True:
                self.poll()
                if self.done() is not None:
                    break
                live = [n for n in self.nodes if n.state in ("running", "rejoining", "stopped")]
                waiting = [n for n in self.nodes if n.rejoin_at is not None]
                if not live and not waiting:
                    self.on_line("elastickit train: every node exited before the last step")
                    return 1
                if deadline is not None and time.monotonic() > deadline:
                    self.on_line(f"elastickit train: not done within {timeout_s:.0f} s; stopping")
                    return 1
                time.sleep(0.05)
            return self._wind_down()
        finally:
            self.shutdown()

    def _wind_down(self, grace_s: float = 30.0) -> int:
        """The job is done: agents whose workers finished exit on their own; the others (a node
        still waiting in the rendezvous) are stopped."""
        end = time.monotonic() + grace_s
        for node in self.nodes:
            if node.proc is None or node.state not in ("running", "rejoining"):
                continue
            left = max(0.0, end - time.monotonic())
            try:
                code = node.proc.wait(timeout=left)
                node.state = "done" if code == 0 else "failed"
            except subprocess.TimeoutExpired:
                self._terminate(node)
                node.state = "done"
        self._write_nodes()
        failed = [n.index for n in self.nodes if n.state == "failed"]
        if failed:
            self.on_line(f"elastickit train: node(s) {failed} exited with errors; see {self.rundir.root}/logs/")
        return 1 if failed else 0

    def _terminate(self, node: _Node) -> None:
        if node.proc is None or node.proc.poll() is not None:
            return
        for sig in (signal.SIGCONT, signal.SIGTERM):
            try:
                os.killpg(node.proc.pid, sig)
            except ProcessLookupError:
                return
        try:
            node.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            _signal(node.proc.pid, signal.SIGKILL, group=True)
            node.proc.wait()

    def shutdown(self) -> None:
        """Stop every node still up (the job failed, or the caller was interrupted): the workers
        are told first, so that none takes the others' exits for failures to recover from."""
        up = [n for n in self.nodes if n.proc is not None and n.proc.poll() is None]
        if up and self.store is not None and self.done() is None:
            try:
                self.store.set(self._key("done"), json.dumps({"stopped": True, "time": time.time()}))
            except Exception:  # noqa: BLE001 - stopping goes on regardless
                pass
        for node in up:
            for pid in self._worker_pids(node):
                _signal(pid, signal.SIGCONT)
            _signal(node.proc.pid, signal.SIGCONT, group=True)
            _signal(node.proc.pid, signal.SIGTERM, group=True)
        deadline = time.monotonic() + 15
        for node in up:
            try:
                node.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                for pid in self._worker_pids(node):
                    _signal(pid, signal.SIGKILL)
                _signal(node.proc.pid, signal.SIGKILL, group=True)
                node.proc.wait()
        for node in self.nodes:
            if node.log is not None and not node.log.closed:
                node.log.close()


def _signal(pid: int, sig: signal.Signals, *, group: bool = False) -> None:
    try:
        (os.killpg if group else os.kill)(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def worker_flags(**values: Any) -> tuple[str, ...]:
    """`--flag value` pairs for the worker from keyword values (None values left out)."""
    out: list[str] = []
    for key, value in values.items():
        if value is None:
            continue
        out += [f"--{key.replace('_', '-')}", str(value)]
    return tuple(out)


def nodes_request(
    *,
    nodes: int,
    run: str,
    trainer: dict[str, Any],
    inject: Sequence[str] = (),
    min_nodes: int | None = None,
    nproc_per_node: int = 1,
    rejoin_after_s: float | None = None,
    max_restarts: int = 3,
) -> tuple[SimRequest, str]:
    """The checked request of `elastickit train --nodes` and the layout it starts on.

    `trainer` holds the trainer's flags (steps, model, layout, global_batch...; None values are
    left out). Everything is checked before anything starts: RequestError names the flag."""
    from .config import first_layout
    from .worker import parse_flags

    if os.path.exists(run) and not os.path.isdir(run):
        raise RequestError(f"--run {run} is a file; give a directory for the run")
    flags = worker_flags(**trainer)
    cfg = parse_flags((*flags, "--run", run))
    faults = tuple(parse_node_fault(f, nodes, nodes * nproc_per_node) for f in inject)
    for f in faults:
        if f.kind == "hang":  # the worker's own doing: its training loop stops
            flags += ("--inject", f.text)
    req = SimRequest(
        nodes=nodes,
        run=run,
        worker_args=flags,
        min_nodes=min_nodes or 1,
        nproc_per_node=nproc_per_node,
        faults=faults,
        rejoin_after_s=rejoin_after_s,
        max_restarts=max_restarts,
    )
    req.check()
    return req, first_layout(cfg, [nproc_per_node] * nodes)


def run_simulation(req: SimRequest, timeout_s: float | None = None) -> int:
    """Run the simulated cluster to the end (see `Cluster`)."""
    return Cluster(req).run(timeout_s)

