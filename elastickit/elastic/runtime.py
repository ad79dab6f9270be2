"""The in-process elastic training loop of one worker.

Every worker process runs `ElasticWorker.run()` once; the process survives every change of the
job. One generation (a `Plan` of `elastickit.elastic.membership`) is:

    arrive (store barrier of the plan's members)
    -> init_process_group on a fresh store prefix -> build the model, optimizer and data loader
       at the plan's layout (DeviceMesh, FSDP2, tensor parallel) -> Checkpointer with memory,
       node-local, peer and persistent tiers -> restore the freshest checkpoint, resharded
    -> train until the last step, or until the plan is superseded.

A failure (a peer dead or hung) ends the generation at once: the watcher thread sees the next
plan, shuts down the connections of this generation's process groups (which wakes any
collective waiting for the dead peer, `elastickit.elastic.sockets`), the training thread tears
the groups down and enters the next plan. Growing (a node back, spares that make a larger
layout) happens at a step boundary the ranks agree on through the loss all-reduce, after every
tier holds that step. Python, torch and the data stay loaded: no process restarts, no imports.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import threading
import time
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from .config import ElasticConfig, WorkerEnv, model_limits
from .membership import Member, Membership, Plan, Superseded
from .monitoring import backend, close_monitor, start_monitor
from .policy import Layout, LayoutRequest, NoLayoutError, choose_layout, parse_pins
from .progress import IDLE, Progress
from .record import recovery_record
from .reform import close_async, forget_process_groups, looks_like_comm_failure, wait_quietly
from .rundir import RunDir, StepRecord
from .sockets import SocketTracker

log = logging.getLogger("elastickit.elastic")

__all__ = ["STUCK_EXIT_CODE", "ElasticWorker"]

STUCK_EXIT_CODE = 75
"""A worker the job left out because its training loop stopped exits with this (EX_TEMPFAIL):
its agent starts a fresh one, which joins as a spare."""


@dataclasses.dataclass(slots=True)
class _Gen:
    """One generation as this rank lives it."""

    plan: Plan
    rank: int
    tracker: SocketTracker
    times: dict[str, float] = dataclasses.field(default_factory=dict)
    aborted: bool = False
    voluntary: bool = False
    job: Any = None
    ck: Any = None
    monitor: Any = None
    started: float = dataclasses.field(default_factory=time.time)


class _Transition(Exception):
    def __init__(self, plan: Plan) -> None:
        super().__init__(f"plan {plan.gen}")
        self.plan = plan


class ElasticWorker:
    """One worker process of an elastic job (see the module docstring)."""

    def __init__(self, cfg: ElasticConfig, env: WorkerEnv) -> None:
        self.cfg = cfg
        self.env = env
        self.rundir = RunDir(cfg.run, cfg.ckpt)
        self.local_tier = cfg.local_tier or os.environ.get("ELASTICKIT_LOCAL_TIER") or self.rundir.local_tier(env.node)
        self.me = Member.this_process(env.node, env.local_rank)
        self.limits = model_limits(cfg.model)
        self.pins = tuple(parse_pins(cfg.layout).items())
        self._gen: _Gen | None = None
        self._last_step: int | None = None  # the last step this process completed
        self._abort_times: dict[str, float] = {}
        self._said: set[str] = set()
        self._closing: threading.Event | None = None  # set when the last generation's checkpointer closed
        self._progress_at: float | None = None  # monotonic time of this rank's last step, while training
        self._monitor_closing: threading.Event | None = None
        self._hangs = _hang_faults(cfg.inject)
        self.membership = Membership(
            self._store_client, self.me, self._planner, hang_s=cfg.hang_s, on_new_plan=self._on_new_plan,
            progress_s=lambda: None if self._progress_at is None else time.monotonic() - self._progress_at,
            progress=self._progress,
        )

    # -- plumbing ---------------------------------------------------------------------------

    def _store_client(self, prefix: str | None = None) -> Any:
        import torch.distributed as dist

        client = dist.TCPStore(
            self.env.store_host, self.env.store_port, is_master=False, timeout=timedelta(seconds=60)
        )
        return dist.PrefixStore(prefix or f"ek/{self.env.run_id}", client)

    def _planner(self, members: Sequence[Member], previous: Plan | None) -> tuple[str, int, tuple[str, ...], tuple[str, ...], str]:
        nodes: list[int] = []
        last = None
        for m in members:
            if m.node != last:
                nodes.append(0)
                last = m.node
            nodes[-1] += 1
        budget = int(self.cfg.rank_memory_mib * 2**20) if self.cfg.rank_memory_mib else None
        prev = Layout.parse(previous.layout) if previous is not None and previous.layout else None
        try:
            choice = choose_layout(
                LayoutRequest(
                    nodes=tuple(nodes),
                    global_batch=self.cfg.global_batch,
                    micro_batch=self.cfg.micro_batch,
                    limits=self.limits,
                    pins=self.pins,
                    previous=prev,
                    rank_budget_bytes=budget,
                )
            )
        except NoLayoutError as e:
            return "", 0, (), tuple(m.id for m in members), str(e)
        ids = [m.id for m in members]
        return (
            choice.layout.text(),
            choice.grad_accum,
            tuple(ids[i] for i in choice.active),
            tuple(ids[i] for i in choice.spares),
            "",
        )

    def _progress(self) -> tuple[Progress, float | None]:
        """Watcher thread: this rank's loop progress (collectives entered, steps done) and how
        long it has been blocked in a collective (`elastickit.elastic.progress`)."""
        from elastickit.monitor.probe import PROBE

        g = self._gen
        if g is None or self._progress_at is None:
            return IDLE, None
        entered, p2p = PROBE.buffer.entered_seqs()
        newest = PROBE.buffer.newest_in_flight()
        blocked = newest is not None and newest >= g.started  # older ones: a past generation's
        counter = f"{g.plan.gen}:{self._last_step}:{sum(entered.values()) + sum(p2p.values())}"
        return Progress(counter=counter, blocked=blocked, gen=g.plan.gen), (time.time() - newest if blocked else None)

    def _on_new_plan(self, plan: Plan) -> None:
        """Watcher thread: a newer plan ends the current generation at once."""
        if self.me.id in plan.stuck:
            # The training thread is stuck where nothing can wake it; a fresh process can serve.
            print(f"elastickit: worker {self.me.id}: its training loop made no progress while its peers waited "
                  f"in a collective; the job went on without it (plan {plan.gen}); exiting so that its agent "
                  "starts a fresh worker", file=sys.stderr, flush=True)
            os._exit(STUCK_EXIT_CODE)
        g = self._gen
        if g is None or plan.gen <= g.plan.gen or g.voluntary or g.aborted:
            return
        g.aborted = True
        g.times["abort_signal"] = time.time()
        n = g.tracker.shutdown()  # a collective waiting for the dead or hung peer raises now
        log.info("plan %d supersedes %d: shut %d connection(s)", plan.gen, g.plan.gen, n)

    def _say(self, key: str, text: str) -> None:
        if key not in self._said:
            self._said.add(key)
            print(text, file=sys.stderr, flush=True)

    # -- the run ----------------------------------------------------------------------------

    def run(self) -> int:
        """Train until the job is done; 0 on success."""
        import torch

        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        _preload()  # before the first heartbeat: imports hold the interpreter for seconds
        self.membership.start()
        plan: Plan | None = self.membership.first_plan(self.env.expected)
        try:
            while plan is not None:
                rank = plan.rank_of(self.me.id)
                if rank is None:
                    if not plan.active and plan.reason:
                        self._say(f"paused{plan.gen}", f"elastickit: training paused: {plan.reason}")
                    plan = self.membership.wait_for_plan(plan.gen)
                    continue
                try:
                    plan = self._generation(plan, rank)
                except _Transition as t:
                    plan = t.plan
                except Exception as e:  # noqa: BLE001 - classified below
                    log.info("generation %d ended: %s: %s", plan.gen, type(e).__name__, str(e)[:300])
                    plan = self._after_failure(plan, e)
        finally:
            if self._closing is not None:
                self._closing.wait(30.0)  # the last checkpoints are durable; let the threads end
            if self._monitor_closing is not None:
                self._monitor_closing.wait(5.0)
            self.membership.leave()
        return 0

    def _after_failure(self, plan: Plan, error: Exception) -> Plan | None:
        """The plan to enter after `plan` ended with `error` (raise it when it is no failure of
        the job but of this process)."""
        wait_s = 2 * self.cfg.hang_s + 2.0
        nxt = self.membership.wait_for_plan(plan.gen, timeout_s=wait_s)
        if nxt is not None or self.membership.done is not None:
            return nxt
        if not looks_like_comm_failure(error):
            raise error
        # Everyone alive, yet a collective broke: start over in a new generation.
        return self.membership.propose(plan, cause="crash")

    def _generation(self, plan: Plan, rank: int) -> Plan | None:
        g = _Gen(plan=plan, rank=rank, tracker=SocketTracker())
        self._gen = g
        try:
            self._enter(g)
            return self._train(g)
        finally:
            self._teardown(g)

    def _enter(self, g: _Gen) -> None:
        import torch.distributed as dist

        from elastickit.trainer.loop import TrainConfig, build_job
        from elastickit.trainer.parallel import TrainLayout

        plan, cfg = g.plan, self.cfg
        g.tracker.start()
        self.membership.set_state("forming")
        self.membership.arrive(plan, g.rank)
        store = self._store_client(f"ek/{self.env.run_id}/pg/{plan.gen}")
        if g.aborted:  # superseded before the client existed: nothing would wake it
            raise Superseded(f"plan {plan.gen} was superseded while it formed")
        dist.init_process_group(
            backend(),  # gloo inside the monitor's probes
            store=store,
            rank=g.rank,
            world_size=plan.world_size,
            timeout=timedelta(seconds=max(60.0, 20 * cfg.hang_s)),
        )
        g.times["formed"] = time.time()
        log.info("generation %d: rank %d of %d formed", plan.gen, g.rank, plan.world_size)
        lay = TrainLayout(**{a: int(v) for a, v in (x.split("=") for x in plan.layout.split(","))})
        g.job = build_job(
            TrainConfig(
                model=cfg.model,
                layout=lay,
                steps=cfg.steps,
                global_batch=cfg.global_batch,
                seq_len=cfg.seq_len,
                grad_accum=plan.grad_accum,
                lr=cfg.lr,
                seed=cfg.seed,
                dp_mode=cfg.dp_mode,
            )
        )
        g.times["built"] = time.time()
        if self._closing is not None and not self._closing.wait(10.0):
            log.info("the previous generation's checkpointer is still closing after 10 s; going on")
        self._closing = None
        g.ck = self._checkpointer(g)
        g.times["ck"] = time.time()
        with self.membership._lock:
            members = dict(self.membership.members)
        g.monitor = start_monitor(store, plan=plan, rank=g.rank, members=members, run=self.rundir)
        g.tracker.stop()  # every connection of this generation is open by now
        log.info("generation %d: %d socket(s) tracked", plan.gen, len(g.tracker.owned))
        if g.aborted:
            raise Superseded("a newer plan arrived while this one was forming")

    def _checkpointer(self, g: _Gen) -> Any:
        import elastickit
        from elastickit.checkpoint.tiers import Tiers, TierSpec
        from elastickit.trainer.rules import model_rules, parallel_layout

        tiers = Tiers(
            memory=TierSpec(keep_last=1),
            local=TierSpec(path=self.local_tier, keep_last=2, max_busy_fraction=self.cfg.local_busy),
            peer=g.plan.world_size > 1,
            persistent=TierSpec(keep_last=3),
        )
        return elastickit.Checkpointer(
            self.rundir.ckpt,
            every=self.cfg.every,
            tiers=tiers,
            layout=parallel_layout(g.job.layout),
            rules=model_rules(g.job.cfg.model_config()),
            events=self.rundir.events,
            timeout_s=max(30.0, 10 * self.cfg.hang_s),
        )

    def _train(self, g: _Gen) -> Plan | None:
        import torch

        cfg, plan, job, ck = self.cfg, g.plan, g.job, g.ck
        state = job.state()
        start = ck.restore(state)
        g.times["restored"] = time.time()
        restored = _restore_info(ck.last_restore)
        log.info("generation %d: build %.3f s, checkpointer %.3f s, restore %.3f s (step %s from %s)", plan.gen,
                 g.times["built"] - g.times["formed"], g.times["ck"] - g.times["built"],
                 g.times["restored"] - g.times["ck"], restored.get("step"), restored.get("tier"))
        before = self._last_step
        self.membership.set_state("training")
        self._progress_at = time.monotonic()
        for step in range(start, cfg.steps):
            if g.aborted:
                raise Superseded(f"plan {plan.gen} was superseded")
            if (g.rank, step + 1) in self._hangs:
                self._hang(step + 1)
            torch.manual_seed(_step_seed(cfg.seed, step, g.rank))
            g.monitor.on_step_start(step + 1)
            t0 = time.perf_counter()
            vote = 1.0 if self.membership.grow_pending else 0.0
            first_sample = job.loader.sample_index
            loss, votes = job.train_step_and_vote(step, vote)
            ck.save(step + 1, state)
            if cfg.step_sleep_s:
                time.sleep(cfg.step_sleep_s)
            dt = time.perf_counter() - t0
            g.monitor.on_step_end(step + 1, loss, dt)
            self._progress_at = time.monotonic()
            self._last_step = step + 1
            if g.rank == 0:
                self.rundir.append_step(
                    StepRecord(step=step + 1, loss=loss, world_size=plan.world_size, layout=plan.layout,
                               grad_accum=plan.grad_accum, step_s=round(dt, 6), time=time.time(),
                               samples=(first_sample, job.loader.sample_index))
                )
                print(f"step {step + 1}/{cfg.steps}  loss {loss:.6f}  world {plan.world_size}  "
                      f"{plan.layout}  grad_accum {plan.grad_accum}  step_time {dt:.3f} s", flush=True)
            if "first" not in g.times:
                g.times["first"] = time.time()
                self._publish_times(g, restored, before)
            if votes > 0 and step + 1 < cfg.steps:
                return self._grow(g, step + 1)
        wait_quietly(ck, "the last checkpoint")
        import torch.distributed as dist

        g.monitor.reporter.close()  # the last summaries are in the store before the barrier
        if g.monitor.collector is not None:
            g.monitor.collector.stop_polling()  # no poll while the ranks leave: their exits are the end
        dist.barrier()
        if g.rank == 0:
            g.monitor.collector.close(final_wait_s=2.0, ended=True)
            self.membership.finish({"step": cfg.steps, "time": time.time()})
        return None

    def _grow(self, g: _Gen, step: int) -> Plan:
        """Every rank agreed (through the loss all-reduce) to grow after `step`."""
        wait_quietly(g.ck, f"checkpoint {step} before growing")  # the node-local tier and its peer copies hold `step`
        g.monitor.reporter.close()
        if g.monitor.collector is not None:
            g.monitor.collector.close(final_wait_s=1.0)  # the others' last summaries, before the connections end
        g.voluntary = True
        g.times["voted"] = time.time()
        self._abort_times = {"caught": g.times["voted"]}
        if g.rank == 0:
            nxt = self.membership.propose(g.plan, cause="join", step=step)
        else:
            nxt = self.membership.wait_for_plan(g.plan.gen, timeout_s=30.0)
            if nxt is None:
                raise Superseded("no plan followed the agreed grow")
        raise _Transition(nxt)

    def _teardown(self, g: _Gen) -> None:
        """Leave the generation: stop its checkpoint threads, end its connections, destroy its
        process groups. Never raises."""

        caught = time.time()
        if not g.voluntary:
            g.tracker.shutdown()  # a background tier blocked on a peer wakes up too
        if g.monitor is not None:
            self._monitor_closing = close_monitor(g.monitor, wait_s=0.0)  # a no-op when closed already
        t1 = time.time()
        if g.ck is not None:
            # Its threads fail fast now that their connections are gone; the close overlaps the
            # next rendezvous and build, and ends before the next Checkpointer starts.
            self._closing = close_async(g.ck)
        t2 = time.time()
        g.tracker.shutdown()
        forget_process_groups()
        # No gc.collect() here: a full collection of a torch heap costs 0.2-0.8 s of the stall;
        # the old model's cycles go with the automatic collections.
        g.job = g.ck = g.monitor = None
        self._gen = None
        self._progress_at = None
        log.info("teardown: shut %.3f close %.3f destroy %.3f", t1 - caught, t2 - t1, time.time() - t2)
        self._abort_times = {"caught": g.times.get("abort_signal", caught), "aborted": time.time()}
        log.info("left generation %d in %.3f s", g.plan.gen, self._abort_times["aborted"] - caught)

    def _hang(self, step: int) -> None:
        """The injected `hang:rank=R:step=S`: this training loop stops for good (once in the
        job: the first rank to claim it), while the process and its heartbeat live on."""
        import json

        s = self.membership._store
        if s.compare_set(f"inject/hang/{step}", "", self.me.id).decode() != self.me.id:
            return  # claimed before: a step redone after the hang does not hang again
        s.set(f"fault/{self.env.node}", json.dumps({"kind": "hang", "time": time.time()}))
        print(f"elastickit: injected hang: the training loop of worker {self.me.id} stops at step {step}",
              file=sys.stderr, flush=True)
        while True:
            time.sleep(1.0)

    # -- the recovery record ----------------------------------------------------------------

    def _publish_times(self, g: _Gen, restored: dict[str, Any], before: int | None) -> None:
        plan = g.plan
        if plan.cause == "start" and plan.gen == 1:
            return
        mine = {
            **g.times,
            **self._abort_times,
            "last_step": before,
            "restore": restored,
        }
        self.membership.put(f"times/{plan.gen}/{g.rank}", mine)
        if g.rank == 0:
            threading.Thread(target=self._report, args=(plan,), name="elastickit-report", daemon=True).start()

    def _report(self, plan: Plan) -> None:
        keys = [f"times/{plan.gen}/{r}" for r in range(plan.world_size)]
        got = self.membership.get_all(keys, timeout_s=30.0)
        if got is None:
            return
        rec = recovery_record(plan, got)
        self.rundir.emit_recovery(rec)
        p = rec.phases
        who = f"node {rec.node}" if rec.node is not None else "a member"
        print(
            f"elastickit: recovered from {rec.cause} of {who} (ranks {list(rec.ranks)}) in "
            f"{rec.extra['mttr_s']:.2f} s: detect {p.detect_s:.2f}, abort {p.abort_s:.2f}, "
            f"rendezvous {p.rendezvous_s:.2f}, start {p.start_s:.2f}, restore {p.restore_s:.2f}, "
            f"first step {p.first_step_s:.2f}; {rec.old_layout} -> {rec.new_layout}, restored step "
            f"{rec.restore.get('step')} from {rec.restore.get('tier')}, {rec.lost_steps} step(s) redone",
            flush=True,
        )


def _restore_info(last: Any) -> dict[str, Any]:
    """{"step", "tier", "bytes", "path"} of `Checkpointer.last_restore` (a RestoreReport, or a
    dict); the tier is "peer" when files came from a buddy node."""
    if last is None:
        return {"step": 0, "tier": "none", "bytes": 0, "path": ""}
    if isinstance(last, dict):
        return {"bytes": 0, "path": "", **last}
    tier = "peer" if getattr(last, "fetched", ()) else getattr(last, "tier", "?")
    return {"step": last.step, "tier": tier, "bytes": getattr(last, "bytes", 0), "path": getattr(last, "path", "")}


def _hang_faults(texts: Sequence[str]) -> frozenset[tuple[int, int]]:
    """(rank, step) of each `hang:rank=R:step=S` (checked when the flags were parsed)."""
    from .injection import parse_node_fault

    faults = [parse_node_fault(t, nodes=1 << 30) for t in texts]
    return frozenset((f.rank, f.step) for f in faults if f.kind == "hang")


def _preload() -> None:
    """Import now what forming a generation needs (and torch's lazy imports on a first step)."""
    import torch._dynamo
    import torch.distributed.fsdp
    import torch.distributed.tensor.parallel  # noqa: F401

    import elastickit.api
    import elastickit.trainer.loop
    import elastickit.trainer.rules  # noqa: F401


def _step_seed(seed: int, step: int, rank: int) -> int:
    """The RNG seed of (seed, step, rank): reproducible across restarts and layouts."""
    return (seed * 1_000_003 + step) * 65_537 + rank & 0x7FFF_FFFF_FFFF_FFFF


