"""The detector on synthetic windows: each fault is named, clean noise is not."""

from __future__ import annotations

import random

import pytest
from elastickit.monitor.detector import (
    AnomalyEvent,
    DetectorConfig,
    ObservedHeartbeat,
    detect,
)
from elastickit.monitor.summary import GroupStat, Heartbeat, InFlightOp, PeerStat, StepSummary

pytestmark = pytest.mark.timeout(60)

WORLD = 4
TP = [(0, 1), (2, 3)]
DP = [(0, 2), (1, 3)]
GROUP_NAMES = {(0, 1): "3", (2, 3): "4", (0, 2): "1", (1, 3): "2"}


def _window(
    num_steps: int,
    *,
    slow_rank: int | None = None,
    slow_share: float = 0.3,
    slow_pair: tuple[int, int] | None = None,
    slow_group: tuple[int, int] | None = None,
    seed: int = 0,
    noise: float = 0.03,
) -> dict[int, list[StepSummary]]:
    """Summaries of a 4-rank job: each rank computes ~0.1 s, then a ring of p2p and two
    collectives (tp and dp pairs); everyone leaves each collective when the last arrives."""
    rng = random.Random(seed)
    out: dict[int, list[StepSummary]] = {r: [] for r in range(WORLD)}
    for step in range(num_steps):
        compute = {r: 0.1 * (1 + rng.uniform(-noise, noise)) for r in range(WORLD)}
        if slow_rank is not None:
            compute[slow_rank] *= 1 + slow_share
        step_time = max(compute.values()) + 0.01
        peers: dict[int, list[PeerStat]] = {r: [] for r in range(WORLD)}
        for a in range(WORLD):
            b = (a + 1) % WORLD
            link = 0.001 * (1 + rng.uniform(0, 0.5))
            if slow_pair is not None and {a, b} == set(slow_pair):
                link += 0.03
            # receiver b also waits for a's late arrival: only the max end sees compute skew
            recv_wait = link + max(0.0, compute[a] - compute[b])
            peers[a].append(PeerStat(peer=b, num_ops=1, wait_s=link, num_bytes=400))
            peers[b].append(PeerStat(peer=a, num_ops=1, wait_s=recv_wait, num_bytes=400))
        groups: dict[int, list[GroupStat]] = {r: [] for r in range(WORLD)}
        waits = {r: 0.0 for r in range(WORLD)}
        for pair in TP + DP:
            arrive = max(compute[r] for r in pair)
            xfer = 0.002 * (1 + rng.uniform(0, 0.5))
            if slow_group is not None and pair == slow_group:
                xfer += 0.03
            for r in pair:
                w = arrive - compute[r] + xfer
                waits[r] += w
                groups[r].append(
                    GroupStat(
                        group=GROUP_NAMES[pair],
                        ranks=pair,
                        num_ops=1,
                        wait_s=w,
                        num_bytes=1000,
                        last_seq=step + 1,
                    )
                )
        for r in range(WORLD):
            out[r].append(
                StepSummary(
                    rank=r,
                    step=step,
                    time_s=1000.0 + step,
                    step_time_s=step_time,
                    wait_s=waits[r],
                    num_ops=4,
                    groups=tuple(groups[r]),
                    peers=tuple(sorted(peers[r], key=lambda p: p.peer)),
                )
            )
    return out


def _beats(**overrides: ObservedHeartbeat) -> dict[int, ObservedHeartbeat]:
    beats = {
        r: ObservedHeartbeat(
            heartbeat=Heartbeat(rank=r, pid=100 + r, host="h", beat=5, time_s=1.0, step=7),
            silent_s=0.1,
        )
        for r in range(WORLD)
    }
    beats.update({int(k[1:]): v for k, v in overrides.items()})
    return beats


def _types(events: list[AnomalyEvent]) -> list[tuple[str, tuple[int, ...]]]:
    return sorted((e.type, e.ranks) for e in events)


@pytest.mark.parametrize("seed", range(20))
def test_clean_windows_raise_nothing(seed: int) -> None:
    events = detect(_window(8, seed=seed), _beats(), world_size=WORLD, now_s=0.0)
    assert events == []


@pytest.mark.parametrize("rank", range(WORLD))
def test_slow_rank_is_the_one_with_the_shortest_wait(rank: int) -> None:
    events = detect(_window(6, slow_rank=rank, seed=rank), _beats(), world_size=WORLD, now_s=0.0)
    assert _types(events) == [("slow_rank", (rank,))]
    assert events[0].evidence["hits"] >= 4
    assert events[0].confidence > 0.5


def test_slow_rank_needs_a_full_window() -> None:
    events = detect(_window(3, slow_rank=2), _beats(), world_size=WORLD, now_s=0.0)
    assert events == []


def test_slow_p2p_link_names_both_ends_not_a_rank() -> None:
    events = detect(_window(6, slow_pair=(1, 2)), _beats(), world_size=WORLD, now_s=0.0)
    assert _types(events) == [("slow_link", (1, 2))]
    assert events[0].evidence["source"] == "p2p"


def test_slow_group_link_from_collective_floors() -> None:
    events = detect(_window(6, slow_group=(0, 2)), _beats(), world_size=WORLD, now_s=0.0)
    assert _types(events) == [("slow_link", (0, 2))]
    assert events[0].group == "1"


def _in_flight(
    rank: int,
    group_ranks: tuple[int, ...],
    seq: int,
    age_s: float,
    step: int,
    entered: int,
    group: str = "0",
) -> ObservedHeartbeat:
    hb = Heartbeat(
        rank=rank,
        pid=100 + rank,
        host="h",
        beat=9,
        time_s=1.0,
        step=step,
        in_flight=(
            InFlightOp(
                op="allreduce", group=group, ranks=group_ranks, peer=-1, seq=seq, age_s=age_s
            ),
        ),
        entered=((group, entered),),
    )
    return ObservedHeartbeat(heartbeat=hb, silent_s=0.05)


def test_hang_names_the_rank_that_never_entered() -> None:
    world = (0, 1, 2, 3)
    beats = {r: _in_flight(r, world, seq=12, age_s=2.0, step=6, entered=12) for r in (0, 1, 3)}
    beats[2] = ObservedHeartbeat(
        heartbeat=Heartbeat(
            rank=2, pid=102, host="h", beat=9, time_s=1.0, step=6, entered=(("0", 11),)
        ),
        silent_s=0.05,
    )
    events = detect(_window(6), beats, world_size=WORLD, now_s=0.0)
    assert _types(events) == [("hang", (2,))]
    e = events[0]
    assert (e.op, e.group, e.seq) == ("allreduce", "0", 12)
    assert e.evidence["waiting_ranks"] == [0, 1, 3]
    assert e.evidence["last_entered"] == {"2": 11}
    assert e.evidence["group_ranks"] == [0, 1, 2, 3]


def test_hang_below_the_bound_is_not_reported() -> None:
    world = (0, 1, 2, 3)
    beats = {r: _in_flight(r, world, seq=12, age_s=0.2, step=6, entered=12) for r in (0, 1, 3)}
    beats[2] = ObservedHeartbeat(
        heartbeat=Heartbeat(
            rank=2, pid=102, host="h", beat=9, time_s=1.0, step=6, entered=(("0", 11),)
        ),
        silent_s=0.05,
    )
    assert detect(_window(6), beats, world_size=WORLD, now_s=0.0) == []


def test_hang_follows_waiters_to_the_root() -> None:
    # rank 3 is stuck outside any collective; rank 1 waits for it in dp group (1, 3);
    # rank 0 waits for rank 1 in tp group (0, 1); rank 2 waits for 3 in tp group (2, 3).
    beats = {
        1: _in_flight(1, (1, 3), seq=5, age_s=3.0, step=6, entered=5, group="2"),
        0: _in_flight(0, (0, 1), seq=5, age_s=2.5, step=6, entered=5, group="3"),
        2: _in_flight(2, (2, 3), seq=5, age_s=2.9, step=6, entered=5, group="4"),
        3: ObservedHeartbeat(
            heartbeat=Heartbeat(
                rank=3, pid=103, host="h", beat=3, time_s=1.0, step=6, entered=(("2", 4), ("4", 4))
            ),
            silent_s=0.05,
        ),
    }
    events = detect(_window(6), beats, world_size=WORLD, now_s=0.0)
    assert _types(events) == [("hang", (3,))]
    assert events[0].evidence["waiting_ranks"] == [0, 1, 2]


def test_crash_from_exit_and_from_silence_but_not_after_clean_close() -> None:
    hb = Heartbeat(rank=1, pid=101, host="h", beat=3, time_s=1.0, step=4)
    beats = _beats(
        r1=ObservedHeartbeat(heartbeat=hb, silent_s=0.2, exited=True),
        r3=ObservedHeartbeat(
            heartbeat=Heartbeat(rank=3, pid=103, host="h", beat=3, time_s=1.0, step=4), silent_s=5.0
        ),
        r2=ObservedHeartbeat(
            heartbeat=Heartbeat(
                rank=2, pid=102, host="h", beat=3, time_s=1.0, step=9, state="closed"
            ),
            silent_s=50.0,
            exited=True,
        ),
    )
    events = detect({}, beats, world_size=WORLD, now_s=0.0)
    assert _types(events) == [("crash", (1,)), ("crash", (3,))]
    assert events[0].evidence["process_exited"] is True


def test_crashed_rank_is_not_also_a_hang() -> None:
    world = (0, 1, 2, 3)
    beats = {r: _in_flight(r, world, seq=12, age_s=2.0, step=6, entered=12) for r in (0, 1, 3)}
    beats[2] = ObservedHeartbeat(
        heartbeat=Heartbeat(
            rank=2, pid=102, host="h", beat=9, time_s=1.0, step=6, entered=(("0", 11),)
        ),
        silent_s=0.1,
        exited=True,
    )
    assert _types(detect(_window(6), beats, world_size=WORLD, now_s=0.0)) == [("crash", (2,))]


def test_event_json_round_trip_and_fields() -> None:
    e = AnomalyEvent(
        type="hang",
        ranks=(2,),
        step=3,
        time_s=5.0,
        op="allreduce",
        group="0",
        seq=9,
        evidence={"waiting_ranks": [0, 1]},
        confidence=0.9,
    )
    d = e.to_dict()
    for field in ("type", "ranks", "step", "time", "op", "evidence", "confidence"):
        assert field in d
    assert AnomalyEvent.from_json(e.to_json()) == e
    with pytest.raises(ValueError, match="'type'"):
        AnomalyEvent(type="meteor", ranks=(), step=0, time_s=0.0)


def test_summary_and_heartbeat_round_trip() -> None:
    s = _window(1)[2][0]
    assert StepSummary.from_json(s.to_json()) == s
    hb = _in_flight(1, (0, 1), seq=3, age_s=1.5, step=2, entered=3).heartbeat
    assert Heartbeat.from_json(hb.to_json()) == hb
    with pytest.raises(ValueError, match="'wait_s'"):
        StepSummary.from_json(
            '{"rank": 0, "step": 1, "time_s": 0, "step_time_s": 1, "num_ops": 0,'
            ' "num_errors": 0, "groups": [], "peers": []}'
        )


def test_config_validation_names_the_field() -> None:
    with pytest.raises(ValueError, match="min_hits"):
        DetectorConfig(window_steps=3, min_hits=4)


def test_no_hang_blamed_on_a_rank_that_closed_or_while_one_crashed() -> None:
    world = (0, 1, 2, 3)
    beats = {r: _in_flight(r, world, seq=12, age_s=2.0, step=6, entered=12) for r in (0, 1, 3)}
    beats[2] = ObservedHeartbeat(
        heartbeat=Heartbeat(
            rank=2,
            pid=102,
            host="h",
            beat=9,
            time_s=1.0,
            step=6,
            state="closed",
            entered=(("0", 11),),
        ),
        silent_s=3.0,
    )
    assert detect(_window(6), beats, world_size=WORLD, now_s=0.0) == []
    beats[2] = ObservedHeartbeat(
        heartbeat=Heartbeat(
            rank=2, pid=102, host="h", beat=9, time_s=1.0, step=6, entered=(("0", 11),)
        ),
        silent_s=0.05,
    )
    beats[1] = ObservedHeartbeat(heartbeat=beats[1].heartbeat, silent_s=0.1, exited=True)
    assert _types(detect(_window(6), beats, world_size=WORLD, now_s=0.0)) == [("crash", (1,))]
