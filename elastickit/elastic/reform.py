"""Leaving a generation in the same process: torch's process-group state, the old
Checkpointer, and telling a broken collective from a bug."""

from __future__ import annotations

import logging
import threading
from typing import Any

from .membership import Superseded

log = logging.getLogger("elastickit.elastic")

__all__ = ["close_async", "forget_process_groups", "looks_like_comm_failure", "wait_quietly"]


def forget_process_groups() -> None:
    """Destroy every process group of this process and what torch remembers about them, so
    that the next generation starts clean in the same process. Never raises.

    Besides destroying the groups: c10d's group counter must restart at 0 on every rank (a
    group that failed to form counted itself, and gloo's store keys carry the count), and
    DTensor's sharding-propagation caches must go: they are keyed by DeviceMesh *equality*
    (same ranks, shape and names), so a new mesh of a world size seen before would be handed
    results holding the old mesh object, with the old rank's coordinate and the destroyed
    groups (seen here: FSDP2 shards of the new rank checked against the old rank's offsets).
    """
    import torch.distributed as dist

    try:
        if dist.is_initialized():
            dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - the groups are gone either way
        pass
    dist.distributed_c10d._world.group_count = 0
    try:
        from torch.distributed.tensor.debug import _clear_sharding_prop_cache

        _clear_sharding_prop_cache()
    except ImportError:  # an older torch: its Python cache is the only one
        from torch.distributed.tensor._api import DTensor

        DTensor._op_dispatcher.sharding_propagator.propagate_op_sharding.cache_clear()


def looks_like_comm_failure(e: BaseException) -> bool:
    if isinstance(e, Superseded):
        return True
    text = f"{type(e).__name__}: {e}"
    return any(
        s in text
        for s in ("Connection closed", "Connection reset", "Broken pipe", "pair.cc", "Timed out",
                  "DistNetworkError", "DistStoreError", "did not reach checkpoint phase", "Socket", "recv")
    )


def wait_quietly(ck: Any, what: str) -> None:
    """`ck.wait()`; a tier that failed is in the event log and the warning, not a crash: the
    next restore takes the freshest checkpoint that did commit."""
    from elastickit.checkpoint.errors import ElastickitError

    try:
        ck.wait()
    except ElastickitError as e:
        log.warning("elastickit: %s is not durable on every tier: %s", what, e)


def close_async(ck: Any) -> threading.Event:
    """Close a Checkpointer whose peers may be gone, on a thread; the event is set when done."""
    done = threading.Event()

    def close() -> None:
        try:
            ck.close()
        except BaseException:  # noqa: BLE001 - a generation's checkpoint failing is reported by its events
            pass
        finally:
            done.set()

    threading.Thread(target=close, name="elastickit-close", daemon=True).start()
    return done
