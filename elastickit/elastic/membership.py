"""Who trains: generations of members agreed through the rendezvous store.

Every worker process registers itself (a `Member`) under `ek/<run>/` on the job's rendezvous
store, the TCPStore that lives outside every node, and beats a heartbeat counter there from a
watcher thread. A generation is a `Plan`: the members that train, in rank order, and their
layout. Plans are numbered; plan g+1 is decided by whoever writes `plan/<g+1>` first with an
atomic compare-and-set, and every member adopts the plan the store holds, so there is no leader
to lose and no two plans of one number.

The watcher thread of every member (one poll every `poll_s`):
- beats its own heartbeat;
- reads the registry (new members and joiners);
- follows the newest plan, and calls `on_new_plan` when one supersedes the member's current one
  (the runtime then aborts its collectives at once);
- looks at the members of the newest plan: a process gone on this host (crash) or a heartbeat
  unchanged for `hang_s` (a hung or unreachable node) makes it propose the next plan without
  them; nobody waits for a collective timeout;
- on the first rank of the plan, notices members waiting (spares, a node that came back) that
  would make a larger layout, and raises `grow_pending` for the training loop, which agrees on
  the step to grow at.

A process that lives while its training loop is stuck (its heartbeat goes on) is found by its
progress (`elastickit.elastic.progress`): while this member has been blocked in a collective for
`hang_s`, a peer that trains, is in no collective and has not moved for its bound is the one
everyone waits on. It is left out as `stuck`: every member stops counting it alive, and the
worker itself exits when it sees the plan (its agent starts a fresh one, which joins as a spare).

A silent peer is only accused of hanging while this member's own training is stuck too (a hung
peer stops every rank's next collective; a peer whose heartbeat thread is merely starved does
not). A watcher that was itself descheduled longer than `hang_s / 2` does not accuse anyone in that
round: its own view of time is what stalled. On a loaded machine a member's silence bound
stretches with its recent heartbeat intervals (`silence_bound`), as TCP's retransmission
timeout follows the measured round trip.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from elastickit.monitor.collector import process_exited

from .progress import IDLE, Progress, ProgressWatch

log = logging.getLogger("elastickit.elastic")

__all__ = ["Member", "Membership", "Plan", "Planner", "Superseded"]

PROTOCOL = 1


class Superseded(Exception):
    """A newer plan replaced the one this member was entering or training in."""


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Member:
    """One worker process."""

    id: str
    """Unique: `<node>.<local_rank>.<host>.<pid>`."""
    node: str
    """The node's name (a simulated node's index, or a machine's name)."""
    local_rank: int
    host: str
    pid: int

    def sort_key(self) -> tuple[Any, ...]:
        """Member order: node by node (numeric names numerically), then local rank."""
        key: tuple[Any, ...] = (0, int(self.node)) if self.node.isdigit() else (1, self.node)
        return (*key, self.local_rank, self.id)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> Member:
        d = json.loads(text)
        return cls(id=d["id"], node=str(d["node"]), local_rank=int(d["local_rank"]), host=d["host"], pid=int(d["pid"]))

    @classmethod
    def this_process(cls, node: str, local_rank: int) -> Member:
        host, pid = socket.gethostname(), os.getpid()
        return cls(id=f"{node}.{local_rank}.{host}.{pid}", node=str(node), local_rank=local_rank, host=host, pid=pid)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Plan:
    """One generation: who trains, in which layout, and why it changed."""

    gen: int
    active: tuple[str, ...]
    """Member ids in rank order (empty: paused, see `reason`)."""
    layout: str
    """`pp=1,dp=3,tp=1`."""
    grad_accum: int
    spares: tuple[str, ...] = ()
    """Members alive but left out by the layout (they wait, hot)."""
    cause: str = "start"
    """start | crash | hang | killnode | stopnode | join"""
    failed: tuple[str, ...] = ()
    failed_ranks: tuple[int, ...] = ()
    """Ranks the failed members had in the previous plan."""
    failed_node: str | None = None
    joined: tuple[str, ...] = ()
    """Members that were not in the previous plan."""
    fault_time: float | None = None
    """When the failure happened, if known (an injected fault), else the failed member's last
    observed heartbeat."""
    detected_at: float = 0.0
    prev_layout: str | None = None
    prev_world: int = 0
    step: int | None = None
    """The step boundary a voluntary change (a join) happens at."""
    reason: str = ""
    """Why no layout fits (a paused plan)."""
    considered: tuple[str, ...] = ()
    """Every member the proposer counted as alive."""
    proposer: str = ""
    stuck: tuple[str, ...] = ()
    """Failed members whose process lives but whose training loop stopped: never counted
    alive again (the worker exits; its agent starts a fresh one)."""

    def rank_of(self, member_id: str) -> int | None:
        try:
            return self.active.index(member_id)
        except ValueError:
            return None

    @property
    def world_size(self) -> int:
        return len(self.active)

    def to_json(self) -> str:
        return json.dumps({"protocol": PROTOCOL, **dataclasses.asdict(self)}, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> Plan:
        d = json.loads(text)
        d.pop("protocol", None)
        for name in ("active", "spares", "failed", "failed_ranks", "joined", "considered", "stuck"):
            d[name] = tuple(d.get(name) or ())
        return cls(**d)


Planner = Callable[[Sequence[Member], "Plan | None"], tuple[str, int, tuple[str, ...], tuple[str, ...], str]]
"""(members alive in member order, previous plan) -> (layout, grad_accum, active ids,
spare ids, reason); active empty with a one-sentence reason when no layout fits."""


class Membership:
    """This member's view of the generations (see the module docstring).

    Call order: `start()` (registers and starts the watcher), then `first_plan()` or
    `wait_for_plan(...)`, `arrive(...)`, `propose(...)`, and at the end `finish()` or `leave()`.
    """

    def __init__(
        self,
        store_factory: Callable[[], Any],
        me: Member,
        planner: Planner,
        *,
        hang_s: float = 1.0,
        form_s: float = 10.0,
        poll_s: float = 0.05,
        on_new_plan: Callable[[Plan], None] | None = None,
        progress_s: Callable[[], float | None] | None = None,
        progress: Callable[[], tuple[Progress, float | None]] | None = None,
    ) -> None:
        self.me = me
        self.progress_s = progress_s
        """Seconds since this member's training last made progress (None: not training)."""
        self.progress = progress
        """This member's loop now: its `Progress`, and the seconds it has been blocked in a
        collective (None: not blocked)."""
        self._watch = ProgressWatch(hang_s)
        self._published: Progress | None = None
        self._evicted: set[str] = set()  # stuck members: never alive again
        self.planner = planner
        self.hang_s = hang_s
        self.form_s = form_s
        self.poll_s = poll_s
        self.on_new_plan = on_new_plan
        self._factory = store_factory
        self._store = store_factory()  # the training thread's client (never a blocking wait)
        self._wstore: Any = None  # the watcher's own client
        self._lock = threading.Lock()
        self.members: dict[str, Member] = {}
        self._registered = 0
        self._beats: dict[str, int] = {}
        self._changed: dict[str, float] = {}
        self._bye: set[str] = set()
        self._gaps: dict[str, collections.deque[float]] = {}  # recent heartbeat intervals
        self._states: dict[str, str] = {}  # "training" or not, of the newest plan's members
        self.latest: Plan | None = None
        self.grow_pending = False
        self._grow_memo: tuple[frozenset[str], int, bool] | None = None
        self.done: dict[str, Any] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_loop = time.monotonic()

    # -- registration and the watcher ------------------------------------------------------

    def start(self) -> None:
        """Register this member and start watching."""
        self._wstore = self._factory()
        s = self._store
        s.set(f"member/{self.me.id}", self.me.to_json())
        s.add(f"hb/{self.me.id}", 1)
        s.set(f"prog/{self.me.id}", IDLE.encode())
        index = s.add("joined", 1) - 1
        s.set(f"joined/{index}", self.me.id)
        self._poll()  # a first look before anyone reads `latest`
        self._thread = threading.Thread(target=self._run, name="elastickit-watcher", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._poll()
            except Exception as e:  # noqa: BLE001 - a store hiccup must not kill the watcher
                log.info("watcher: %s: %s", type(e).__name__, e)
            self._stop.wait(self.poll_s)

    def _poll(self) -> None:
        s = self._wstore
        now = time.monotonic()
        stalled = now - self._last_loop > self.hang_s / 2
        self._last_loop = now
        s.add(f"hb/{self.me.id}", 1)
        blocked_s = self._publish_progress(s)
        self._read_registry(s)
        self._follow_plans(s)
        if self.done is None and s.check(["done"]):
            self.done = json.loads(s.get("done"))
        if self.done is not None:
            return
        self._read_beats(s, now, stalled)
        plan = self.latest
        if plan is None:
            return
        if plan.active:
            suspects = [m for m in plan.active if m != self.me.id and not self.alive(m)]
            silent = [m for m in suspects if m not in self._bye and not self.exited(m)]
            if silent and self._moving():
                suspects = [m for m in suspects if m not in silent]  # a busy peer, not a hung one
            if suspects:
                self.propose(plan, failed=suspects, store=s)
                return
            if blocked_s is not None and blocked_s >= self.hang_s and self.me.id in plan.active:
                stuck = [m for m in plan.active if m != self.me.id and self._watch.stuck(m, now, plan.gen)]
                if stuck:
                    log.info("stuck: %s (idle %s s) while this member waits %.1f s in a collective", stuck,
                             [round(self._watch.idle_s(m, now), 2) for m in stuck], blocked_s)
                    self.propose(plan, failed=stuck, stuck=stuck, store=s)
                    return
            if plan.active and plan.active[0] == self.me.id:
                self._check_grow(plan)
        elif self.me.id in self.alive_members() and frozenset(self.alive_members()) != frozenset(plan.considered):
            self.propose(plan, store=s)  # paused: members came or went, try again

    def _publish_progress(self, s: Any) -> float | None:
        """Publish this member's loop progress when it changed; the seconds it has been
        blocked in a collective (None: not blocked, or nothing to tell)."""
        if self.progress is None:
            return None
        mine, blocked_s = self.progress()
        if mine != self._published:
            s.set(f"prog/{self.me.id}", mine.encode())
            self._published = mine
        latest = self.latest
        if latest is None or mine.gen != latest.gen:
            return None  # blocked in a superseded plan's collective: it is being woken
        return blocked_s

    def _read_registry(self, s: Any) -> None:
        count = s.add("joined", 0)
        if count > self._registered:
            ids = s.multi_get([f"joined/{i}" for i in range(self._registered, count)])
            infos = s.multi_get([f"member/{i.decode()}" for i in ids])
            with self._lock:
                for raw in infos:
                    m = Member.from_json(raw)
                    self.members[m.id] = m
            self._registered = count

    def _read_beats(self, s: Any, now: float, stalled: bool) -> None:
        ids = list(self.members)
        if not ids:
            return
        beats = s.multi_get([f"hb/{m}" for m in ids])
        plan = self.latest
        watched = [m for m in (plan.active if plan is not None else ()) if m in self.members]
        if watched:
            have = [m for m in watched if s.check([f"state/{m}"])]
            states = s.multi_get([f"state/{m}" for m in have]) if have else []
            self._states = {m: v.decode() for m, v in zip(have, states, strict=True)}
            if self.progress is not None:
                for m, raw in zip(watched, s.multi_get([f"prog/{m}" for m in watched]), strict=True):
                    self._watch.observe(m, Progress.decode(raw), now, stalled=stalled)
        with self._lock:
            for m, raw in zip(ids, beats, strict=True):
                value = int(raw)
                if value < 0:  # `leave()`: a clean exit, not a failure
                    self._bye.add(m)
                elif stalled or self._beats.get(m) != value:
                    if m in self._changed and not stalled:
                        self._gaps.setdefault(m, collections.deque(maxlen=200)).append(now - self._changed[m])
                    self._beats[m] = value
                    self._changed[m] = now

    def _follow_plans(self, s: Any) -> None:
        gen = self.latest.gen if self.latest is not None else 0
        newest = None
        while s.check([f"plan/{gen + 1}"]):
            gen += 1
            newest = Plan.from_json(s.get(f"plan/{gen}"))
        if newest is not None:
            self._adopt(newest)

    def _adopt(self, plan: Plan) -> None:
        with self._lock:
            if self.latest is not None and plan.gen <= self.latest.gen:
                return
            self.latest = plan
            self._evicted.update(plan.stuck)
            log.info("plan %d: %s on %d (%s, failed %s, joined %s)", plan.gen, plan.layout or "paused",
                     plan.world_size, plan.cause, list(plan.failed), list(plan.joined))
            self.grow_pending = False
            self._grow_memo = None
        if self.on_new_plan is not None:
            self.on_new_plan(plan)

    # -- liveness ---------------------------------------------------------------------------

    def alive(self, member_id: str) -> bool:
        """Beating within `hang_s`, not gone from this host, not said goodbye."""
        if member_id in self._evicted:
            return False
        if member_id == self.me.id:
            return True
        if member_id in self._bye:
            return False
        m = self.members.get(member_id)
        if m is None:
            return False
        if m.host == self.me.host and process_exited(m.pid):
            return False
        changed = self._changed.get(member_id)
        return changed is not None and time.monotonic() - changed <= self.silence_bound(member_id)

    def _moving(self) -> bool:
        """This member's own training made progress within `hang_s`: every peer took part in
        that step's collectives, so a silent peer is only slow to beat (its watcher starved of
        the CPU or the interpreter), not hung. A hung peer stops everyone's steps at once."""
        if self.progress_s is None:
            return False
        since = self.progress_s()
        return since is not None and since < self.hang_s

    def _recent_gaps(self, member_id: str) -> list[float]:
        with self._lock:  # the watcher appends while the training thread reads
            return list(self._gaps.get(member_id, ()))

    def silence_bound(self, member_id: str) -> float:
        """How long `member_id` may be silent: `hang_s` while it trains, or 2.5x the longest of
        its recent heartbeat intervals when the machine is so loaded that it beats that
        irregularly (at most 5x `hang_s`): a busy member is not a hung one. While it forms a
        generation (connecting, building, restoring: long stretches of Python holding the
        interpreter) the bound is `form_s` (a crash is still seen at once: its process is gone,
        or its peers' connections break)."""
        gaps = self._recent_gaps(member_id)
        bound = self.hang_s if not gaps else min(5 * self.hang_s, max(self.hang_s, 2.5 * max(gaps)))
        if self._states.get(member_id) != "training":
            bound = max(bound, self.form_s)
        return bound

    def set_state(self, state: str) -> None:
        """Publish this member's phase: "training" (steps running) or "forming"."""
        self._store.set(f"state/{self.me.id}", state)

    def exited(self, member_id: str) -> bool:
        """Known gone (its process exited on this host), not merely silent."""
        m = self.members.get(member_id)
        return m is not None and m.host == self.me.host and process_exited(m.pid)

    def last_seen(self, member_id: str) -> float:
        """Wall time of the member's last observed heartbeat change (now if never seen)."""
        changed = self._changed.get(member_id)
        if changed is None:
            return time.time()
        return time.time() - (time.monotonic() - changed)

    def alive_members(self) -> list[str]:
        with self._lock:  # the watcher thread adds members while the training thread asks
            known = list(self.members.values())
        ms = sorted((m for m in known if self.alive(m.id)), key=Member.sort_key)
        return [m.id for m in ms]

    # -- plans ----------------------------------------------------------------------------

    def propose(
        self,
        base: Plan | None,
        *,
        failed: Sequence[str] = (),
        cause: str | None = None,
        step: int | None = None,
        stuck: Sequence[str] = (),
        store: Any = None,
    ) -> Plan:
        """Propose the plan after `base` without `failed`; return the plan the store holds."""
        s = store or self._store
        gen = base.gen + 1 if base is not None else 1
        if s.check([f"plan/{gen}"]):
            plan = Plan.from_json(s.get(f"plan/{gen}"))
            self._adopt(plan)
            return plan
        seen_failed = list(failed)
        if failed:
            failed = [*failed, *self._gone_with(failed, s)]
        alive = [m for m in self.alive_members() if m not in failed]
        members = [self.members[m] for m in alive]
        layout, grad_accum, active, spares, reason = self.planner(members, base)
        prev_active = base.active if base is not None else ()
        fault_time, cause_found, failed_node = None, cause, None
        if failed:
            failed_node = self.members[failed[0]].node if failed[0] in self.members else None
            injected = self._injected(s, failed_node)
            if injected is not None:
                cause_found = cause_found or injected["kind"]
                fault_time = float(injected["time"])
            else:
                cause_found = cause_found or ("crash" if all(self.exited(m) for m in seen_failed) else "hang")
                fault_time = min(self.last_seen(m) for m in seen_failed)
        if failed:
            # Members of the old plan that nobody counted alive went with the failure too (a
            # node's other workers die a moment after the first one is seen gone).
            failed = [*failed, *(m for m in prev_active if m not in active and m not in spares and m not in failed)]
        plan = Plan(
            gen=gen,
            active=active,
            layout=layout,
            grad_accum=grad_accum,
            spares=spares,
            cause=cause_found or ("start" if base is None else "join"),
            failed=tuple(failed),
            failed_ranks=tuple(sorted(prev_active.index(m) for m in failed if m in prev_active)),
            failed_node=failed_node,
            joined=tuple(m for m in active if m not in prev_active) if base is not None else (),
            fault_time=fault_time,
            detected_at=time.time(),
            prev_layout=base.layout if base is not None else None,
            prev_world=len(prev_active),
            step=step,
            reason=reason,
            considered=tuple(alive),
            proposer=self.me.id,
            stuck=tuple(stuck),
        )
        held = Plan.from_json(s.compare_set(f"plan/{gen}", "", plan.to_json()))
        log.info("proposed plan %d (%s, failed %s): %s; the store holds %s's", gen, plan.cause,
                 list(failed), plan.layout or plan.reason, held.proposer)
        self._adopt(held)
        return held

    def _gone_with(self, failed: Sequence[str], s: Any) -> list[str]:
        """The members of a failed member's node that do not prove alive: they beat twice
        more (a beat already on its way when its process was killed proves nothing) or they
        went too. A node's workers die within moments of each other (its agent killed, the
        machine lost), so the one seen first must not leave its siblings counted alive: they
        would become spares or, worse, ranks of the next plan that never arrive."""
        nodes = {self.members[m].node for m in failed if m in self.members}
        siblings = [m for m in self.alive_members()
                    if m not in failed and m != self.me.id and self.members[m].node in nodes]
        if not siblings:
            return []
        start = dict(zip(siblings, (int(v) for v in s.multi_get([f"hb/{m}" for m in siblings])), strict=True))
        now = time.monotonic()
        deadline = {m: now + self._confirm_s(m) for m in siblings}
        pending, gone = set(siblings), []
        while pending:
            beats = dict(zip(sorted(pending), s.multi_get([f"hb/{m}" for m in sorted(pending)]), strict=True))
            now = time.monotonic()
            for m, raw in beats.items():
                value = int(raw)
                if value < 0 or self.exited(m) or (value < start[m] + 2 and now > deadline[m]):
                    gone.append(m)  # said goodbye, exited, or silent past its bound
                elif value < start[m] + 2:
                    continue
                pending.discard(m)
            if pending:
                s.add(f"hb/{self.me.id}", 1)  # the watcher waits here: this member still beats
                time.sleep(min(self.poll_s / 5, 0.01))
        if gone:
            log.info("%s went with %s (same node)", sorted(gone), list(failed))
        return sorted(gone, key=lambda m: self.members[m].sort_key())

    def _confirm_s(self, member_id: str) -> float:
        """How long a failed member's sibling gets to beat twice: a few watcher polls, or 3x its
        longest recent heartbeat interval on a loaded machine, never above its silence bound."""
        gaps = self._recent_gaps(member_id)
        wanted = max(5 * self.poll_s, 3 * max(gaps) if gaps else 0.0)
        return min(wanted, self.silence_bound(member_id))

    @staticmethod
    def _injected(s: Any, node: str | None) -> dict[str, Any] | None:
        if node is None or not s.check([f"fault/{node}"]):
            return None
        return json.loads(s.get(f"fault/{node}"))

    def _check_grow(self, plan: Plan) -> None:
        waiting = frozenset(m for m in self.alive_members() if m not in plan.active)
        if not waiting:
            self.grow_pending = False
            return
        memo = self._grow_memo
        if memo is None or memo[0] != waiting or memo[1] != plan.gen:
            members = [self.members[m] for m in self.alive_members()]
            _layout, _ga, active, _spares, _reason = self.planner(members, plan)
            memo = (waiting, plan.gen, len(active) > len(plan.active))
            self._grow_memo = memo
            log.info("waiting members %s: grow to %d rank(s): %s", sorted(waiting), len(active), memo[2])
        self.grow_pending = memo[2]

    def first_plan(self, expected: int, timeout_s: float = 600.0) -> Plan:
        """The plan this member starts in: the current one, or the first one of the job once
        `expected` members (torchrun's world at the first rendezvous) have registered."""
        deadline = time.monotonic() + timeout_s
        while True:
            if self.latest is not None:
                return self.latest
            if len(self.alive_members()) >= expected:
                return self.propose(None)
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"only {len(self.alive_members())} of {expected} workers registered within {timeout_s:.0f} s"
                )
            time.sleep(self.poll_s / 2)

    def wait_for_plan(self, after: int, timeout_s: float | None = None) -> Plan | None:
        """The newest plan with a number above `after` (None at timeout or when the job is done)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            plan = self.latest
            if plan is not None and plan.gen > after:
                return plan
            if self.done is not None:
                return None
            if deadline is not None and time.monotonic() > deadline:
                return None
            time.sleep(0.002)

    def arrive(self, plan: Plan, rank: int, timeout_s: float = 60.0) -> None:
        """Barrier of `plan`'s active members; Superseded when a newer plan appears meanwhile."""
        s = self._store
        s.set(f"arrive/{plan.gen}/{rank}", "1")
        keys = [f"arrive/{plan.gen}/{r}" for r in range(plan.world_size)]
        deadline = time.monotonic() + timeout_s
        pause = 0.0005
        while not s.check(keys):
            if self.latest is not None and self.latest.gen > plan.gen:
                raise Superseded(f"plan {self.latest.gen} replaced plan {plan.gen}")
            if time.monotonic() > deadline:
                missing = [plan.active[r] for r, k in enumerate(keys) if not s.check([k])]
                self.propose(plan, failed=missing, cause="hang")
                raise Superseded(f"members {missing} never arrived in plan {plan.gen}")
            time.sleep(pause)
            pause = min(pause * 1.5, 0.005)

    def put(self, key: str, value: Any) -> None:
        """Publish a JSON value under the run's prefix (the training thread's client)."""
        self._store.set(key, json.dumps(value))

    def get_all(self, keys: Sequence[str], timeout_s: float) -> list[Any] | None:
        """The JSON values of `keys` once all are set (None at timeout); polls, never blocks."""
        deadline = time.monotonic() + timeout_s
        while not self._store.check(list(keys)):
            if time.monotonic() > deadline:
                return None
            time.sleep(0.005)
        return [json.loads(v) for v in self._store.multi_get(list(keys))]

    def finish(self, info: dict[str, Any]) -> None:
        """Mark the job done (every member then exits)."""
        self._store.set("done", json.dumps(info))
        self.done = info

    def leave(self) -> None:
        """Stop the watcher and say goodbye (an exit that is not a failure)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2.0)
        try:
            self._store.set(f"hb/{self.me.id}", "-1")
        except Exception:  # noqa: BLE001 - the store may be gone at the very end
            pass
