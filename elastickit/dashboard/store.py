"""The live view of a running job: every rank's heartbeat, read from the job's TCPStore.

The monitor's reporters publish a heartbeat per rank under `<prefix>/hb/<rank>` (the step it is
in, the operations it is inside, its host and pid). This reads them without taking anything
away: it never reads the summary keys, which the job's own collector consumes and deletes (the
per-step data comes from ranks.jsonl), and it never writes.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from elastickit.monitor.shipping import StoreLike, heartbeat_key
from elastickit.monitor.summary import Heartbeat

# Where the monitor's keys are in the job's store: the TCPStore behind PrefixStores,
# "<group>/" (an explicit store) or "default_pg/" + "<group>/" (env:// rendezvous, torchrun).
PREFIXES = ("default_pg/0//ekmon", "0//ekmon", "ekmon")
MAX_RANKS = 1 << 16


class StoreView:
    """Heartbeats of ranks 0..world_size-1 (0: as many as answer from rank 0 on)."""

    def __init__(self, store: StoreLike, *, prefix: str, world_size: int = 0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.store = store
        self.prefix = prefix
        self.world_size = world_size
        self.clock = clock
        self._beats: dict[int, tuple[Heartbeat, float]] = {}
        self._lock = threading.Lock()
        self.errors = 0

    def ranks(self) -> list[dict[str, Any]]:
        """One row per rank: step, state, seconds since its heartbeat last changed, what it
        is inside now; `reachable` False when the store did not answer."""
        with self._lock:
            now = self.clock()
            limit = self.world_size or MAX_RANKS
            rows = []
            for r in range(limit):
                key = heartbeat_key(self.prefix, r)
                try:
                    if not self.store.check([key]):
                        if self.world_size:
                            continue
                        break
                    hb = Heartbeat.from_json(self.store.get(key))
                except Exception:
                    self.errors += 1
                    old = self._beats.get(r)
                    if old is not None:
                        rows.append(_row(old[0], now - old[1], reachable=False))
                    continue
                old = self._beats.get(r)
                if old is None or old[0].beat != hb.beat or old[0].pid != hb.pid:
                    self._beats[r] = (hb, now)
                rows.append(_row(hb, now - self._beats[r][1], reachable=True))
            return rows


def _row(hb: Heartbeat, silent_s: float, *, reachable: bool) -> dict[str, Any]:
    return {
        "rank": hb.rank,
        "step": hb.step,
        "state": hb.state,
        "silent_s": round(silent_s, 3),
        "host": hb.host,
        "pid": hb.pid,
        "in_flight": [{"op": o.op, "group": o.group, "seq": o.seq, "age_s": round(o.age_s, 3)}
                      for o in hb.in_flight],
        "reachable": reachable,
    }


def connect(address: str, *, prefix: str = "auto", world_size: int = 0,
            timeout_s: float = 10.0) -> StoreView:
    """A StoreView of the job whose store listens at `address` (HOST:PORT). Raises ValueError
    with one sentence when the address is malformed, unreachable or holds no heartbeats."""
    import datetime

    import torch.distributed as dist

    host, _, port_text = address.rpartition(":")
    if not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"--store {address!r}: expected HOST:PORT, e.g. 127.0.0.1:29500")
    try:
        tcp = dist.TCPStore(host.strip("[]"), int(port_text), is_master=False,
                            timeout=datetime.timedelta(seconds=timeout_s))
    except Exception as e:
        raise ValueError(f"--store {address}: cannot connect ({e}); is the job running?") from e
    if prefix == "auto":
        prefix = next((p for p in PREFIXES if tcp.check([heartbeat_key(p, 0)])), "")
        if not prefix:
            raise ValueError(f"--store {address}: no monitor heartbeats under {list(PREFIXES)}; "
                             "is the job running with the monitor? Give --prefix if it uses another")
    return StoreView(tcp, prefix=prefix, world_size=world_size)
