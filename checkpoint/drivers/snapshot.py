"""Lazy snapshots: copy live tensors into reusable host buffers in the background.

`save()` hands the live tensors to a `Snapshotter`, which copies them into a `Slot` (one flat host
buffer, pinned on CUDA, reused across checkpoints) on a background thread while training goes
on. torch releases the GIL inside `copy_`, so on CPU the copy overlaps the next forward and
backward; on CUDA the copy runs on a side stream into pinned memory. The training thread waits
only at the fence (`Snapshot.staged.result()`), which the Checkpointer calls from an optimizer
step pre-hook: the moment the tensors are about to change.
"""

from __future__ import annotations

import operator
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch

from ..format.items import SaveItem

#: A tier may write a tensor once its batch is copied: batches big enough to cost little Python
#: time per byte, small enough that the write overlaps the copy.
_BATCH_BYTES = 8 << 20


def _align(n: int, a: int = 64) -> int:
    return (n + a - 1) // a * a


@dataclass(eq=False)
class Slot:
    """One reusable host buffer that holds one snapshot at a time.

    Attributes:
        index: the slot's id, identical on every rank (slots are allocated by agreed decisions).
        buffer: the flat uint8 host buffer.
        refs: who still needs the slot's content (tier names, "memory").
    """

    index: int
    buffer: torch.Tensor
    refs: set[str] = field(default_factory=set)
    # The items the host views below were cut for (compared by identity): the next snapshot of
    # the same items reuses the views instead of slicing the buffer again.
    layout: list[Any] = field(default_factory=list)
    views: list[torch.Tensor] = field(default_factory=list)
    used: int = 0  # bytes the views take
    # (eager keys, host items, indices copied lazily, key -> lazy position) for that layout
    cut: tuple[frozenset[str], list[SaveItem], list[int], dict[str, int]] | None = None

    @property
    def nbytes(self) -> int:
        return self.buffer.numel()


class SlotPool:
    """At most `max_slots` host buffers; a slot is free when nothing refers to it.

    All decisions (which slot a snapshot uses) are made by the caller from information gathered
    on every rank, so slot indices mean the same on every rank.
    """

    def __init__(self, max_slots: int, *, pin: bool) -> None:
        if max_slots < 1:
            raise ValueError(f"max_slots must be >= 1, got {max_slots}")
        self.max_slots = max_slots
        self.pin = pin
        self.slots: list[Slot] = []
        self._lock = threading.Lock()

    def count(self) -> int:
        with self._lock:
            return len(self.slots)

    def acquire(self, index: int, nbytes: int, refs: set[str]) -> Slot:
        """Take slot `index` (allocating it, or growing it if too small) for a new snapshot."""
        with self._lock:
            assert index <= len(self.slots), f"slot {index} skips over unallocated slots"
            if index == len(self.slots):
                self.slots.append(Slot(index=index, buffer=self._alloc(nbytes)))
            slot = self.slots[index]
            assert not slot.refs, f"slot {index} is still in use by {slot.refs}"
            if slot.nbytes < nbytes:
                slot.buffer = self._alloc(nbytes)
                slot.layout, slot.views, slot.cut = [], [], None
            slot.refs = set(refs)
            return slot

    def release(self, slot: Slot, ref: str) -> None:
        with self._lock:
            slot.refs.discard(ref)

    def total_bytes(self) -> int:
        with self._lock:
            return sum(s.nbytes for s in self.slots)

    def _alloc(self, nbytes: int) -> torch.Tensor:
        # 25% headroom so that a slightly larger state later does not reallocate.
        n = _align(int(nbytes * 1.25) + 64)
        return torch.empty(n, dtype=torch.uint8, pin_memory=self.pin)


@dataclass(eq=False)
class Snapshot:
    """The state at one step, being copied (or copied) into a slot.

    Attributes:
        step: the training step.
        slot: the host buffer it lives in.
        items: SaveItems whose tensors are host views into the slot (valid once staged).
        objects: the JSON state shared by all ranks.
        rank_source: this rank's own JSON state (RNG), or a function that makes it (called
            once, when a tier or a restore first needs it: not on the training thread).
        staged: done when every tensor is copied.
        nbytes: bytes of tensor data.
        started_s / staged_s: monotonic times of the copy's start and end.
    """

    step: int
    slot: Slot
    items: list[SaveItem]
    objects: dict[str, Any]
    rank_source: dict[str, Any] | Callable[[], dict[str, Any]]
    staged: Future[None]
    nbytes: int
    started_s: float = 0.0
    staged_s: float = 0.0
    # Progress of the background copy, so that a tier can write item i while item i+1 is being
    # copied: keys copied in the background -> their position in copy order.
    lazy_order: dict[str, int] = field(default_factory=dict)
    copied: int = 0
    progress: threading.Condition = field(default_factory=threading.Condition)

    @property
    def rank_object(self) -> dict[str, Any]:
        """This rank's own JSON state."""
        if callable(self.rank_source):
            self.rank_source = self.rank_source()
        return self.rank_source

    def wait_item(self, key: str) -> None:
        """Block until item `key` is copied (at once for items copied in `save`)."""
        idx = self.lazy_order.get(key)
        if idx is None:
            return
        with self.progress:
            self.progress.wait_for(lambda: self.copied > idx or self.staged.done())
        if self.copied <= idx:
            self.staged.result()  # the copy failed: raise its error


def snapshot_bytes(items: Sequence[SaveItem]) -> int:
    """Host bytes a snapshot of `items` takes (aligned)."""
    return sum(_align(it.tensor.numel() * it.tensor.element_size()) for it in items)


class Snapshotter:
    """Copies live tensors into slots on one background thread, in submission order."""

    def __init__(self) -> None:
        self._q: queue.Queue[tuple[Snapshot, list[tuple[torch.Tensor, torch.Tensor]], Any] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="elastickit-snapshot", daemon=True)
        self._thread.start()
        self._stream: Any = None

    def submit(
        self,
        step: int,
        slot: Slot,
        items: Sequence[SaveItem],
        objects: dict[str, Any],
        rank_object: dict[str, Any] | Callable[[], dict[str, Any]],
        eager: frozenset[str] = frozenset(),
    ) -> Snapshot:
        """Start copying `items` into `slot`; returns at once with the Snapshot.

        Items whose key is in `eager` are copied before returning: tensors that may change
        before the fence (module buffers updated in forward, anything no optimizer owns).
        """
        reuse = len(slot.layout) == len(items) and all(map(operator.is_, slot.layout, items))
        if not reuse:
            slot.layout, slot.views, slot.cut = list(items), [], None
            offset = 0
            for it in items:
                src = it.tensor
                n = src.numel() * src.element_size()
                view = slot.buffer[offset : offset + n].view(src.dtype).view(src.shape) if n else torch.empty(
                    src.shape, dtype=src.dtype
                )
                slot.views.append(view)
                offset += _align(n)
            slot.used = offset
        if slot.cut is None or slot.cut[0] != eager:
            host_items = [
                SaveItem(key=it.key, tensor=v, pieces=it.pieces, specs=it.specs)
                for it, v in zip(items, slot.views, strict=True)
            ]
            lazy = [i for i, it in enumerate(items) if it.key not in eager]
            order = {items[i].key: n for n, i in enumerate(lazy)}
            slot.cut = (eager, host_items, lazy, order)
        _, host_items, lazy, order = slot.cut
        if eager:
            with torch.no_grad():
                for view, it in zip(slot.views, items, strict=True):
                    if it.key in eager:
                        view.copy_(it.tensor.detach())
        sources = [items[i].tensor for i in lazy]
        snap = Snapshot(
            step=step,
            slot=slot,
            items=host_items,
            objects=objects,
            rank_source=rank_object,
            staged=Future(),
            nbytes=slot.used,
        )
        event = None
        if any(src.is_cuda for src in sources):  # sources: the lazily copied live tensors
            # Marks "now" on the training stream: the copy starts after the work queued so far.
            event = torch.cuda.Event()
            event.record()
        snap.lazy_order = order
        self._q.put((snap, list(zip([slot.views[i] for i in lazy], sources, strict=True)), event))
        return snap

    def _run(self) -> None:
        # Normal priority: the fence before the next optimizer step may wait for this copy.
        while True:
            job = self._q.get()
            if job is None:
                return
            snap, sources, event = job
            snap.started_s = time.monotonic()
            try:
                self._copy(snap, sources, event)
            except BaseException as e:  # noqa: BLE001 - handed to whoever waits on the fence
                snap.staged.set_exception(e)
                with snap.progress:
                    snap.progress.notify_all()
                continue
            finally:
                sources.clear()  # drop the references to live tensors
            snap.staged_s = time.monotonic()
            snap.staged.set_result(None)

    def _copy(self, snap: Snapshot, sources: list[tuple[torch.Tensor, torch.Tensor]], event: Any) -> None:
        if event is not None:
            # A side stream, ordered after the work queued when save() ran, so the copy sees
            # the values at save() time without serializing with the training stream.
            if self._stream is None:
                self._stream = torch.cuda.Stream()
            self._stream.wait_event(event)
            with torch.cuda.stream(self._stream):
                for dst, src in sources:
                    dst.copy_(src.detach(), non_blocking=True)
            self._stream.synchronize()
            with snap.progress:
                snap.copied = len(sources)
                snap.progress.notify_all()
        else:
            # Batches of about _BATCH_BYTES in one foreach copy (one call, GIL released), and
            # one progress notification per batch: many small tensors cost little Python time.
            start, size = 0, 0
            with torch.no_grad():
                for i, (dst, _src) in enumerate(sources):
                    size += dst.numel() * dst.element_size()
                    if size < _BATCH_BYTES and i + 1 < len(sources):
                        continue
                    batch = sources[start : i + 1]
                    torch._foreach_copy_([d for d, _ in batch], [x for _, x in batch])
                    start, size = i + 1, 0
                    with snap.progress:
                        snap.copied = i + 1
                        snap.progress.notify_all()

    def close(self) -> None:
        self._q.put(None)
        self._thread.join(timeout=60)
