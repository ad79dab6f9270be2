"""Probes on every collective and point-to-point operation, through a wrapping backend.

Wrapping `torch.distributed.all_reduce` & co. misses most traffic: DTensor issues functional
collectives and FSDP2 calls `ProcessGroup.all_gather_single` / `reduce_scatter_single`
directly. All of them end in a `ProcessGroup` method, so the monitor registers its own
backend (`torch.distributed.Backend.register_backend`) whose process group is a Python
subclass of `ProcessGroup` that records each call and delegates it to an inner, full
`ProcessGroup` carrying the real backend (gloo on CPU, NCCL on CUDA where available).

    name = register_backend()                 # "ekmon_gloo"
    dist.init_process_group(name, ...)        # every group of the job is probed

Each operation appends a record (op, group, its global ranks, bytes, sequence number, enter
time) to the process-wide ring buffer and completes it (exit time) from the Work's future.
Bookkeeping never raises into training: a failure there is counted and ignored.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from .records import P2P_OPS, RingBuffer

# Every ProcessGroup method that moves data or synchronises. Anything not listed falls
# through to the (empty) outer ProcessGroup, so the list errs on the side of completeness.
COLLECTIVE_METHODS = (
    "allreduce",
    "allreduce_coalesced",
    "reduce",
    "allgather",
    "_allgather_base",
    "all_gather_single",
    "allgather_coalesced",
    "allgather_into_tensor_coalesced",
    "all_gather_single_coalesced",
    "reduce_scatter",
    "_reduce_scatter_base",
    "reduce_scatter_single",
    "reduce_scatter_tensor_coalesced",
    "reduce_scatter_single_coalesced",
    "broadcast",
    "gather",
    "scatter",
    "alltoall",
    "alltoall_base",
    "all_to_all_single",
    "barrier",
    "monitored_barrier",
)
P2P_METHODS = ("send", "recv", "recv_anysource")

_INNER_FALLBACK_METHODS = (
    "_start_coalescing",
    "_end_coalescing",
    "_get_sequence_number_for_group",
    "_set_sequence_number_for_group",
    "abort",
    "shutdown",
    "set_timeout",
    "_wait_for_pending_works",
    "get_group_store",
)


class OpInterceptor(Protocol):
    """Hook for fault injection (`elastickit.faults`); runs inside the probe, on the caller's
    thread. `before_issue` may sleep (the delay counts in the operation's wait); `after_issue`
    may wait on the Work and sleep (the delay shows in the exit time)."""

    def before_issue(self, op: str, group_ranks: tuple[int, ...], peer: int) -> None: ...

    def after_issue(self, op: str, group_ranks: tuple[int, ...], peer: int, work: Any) -> None: ...


class _ProbeState:
    """Process-wide: the ring buffer every probed group writes, and the optional interceptor."""

    def __init__(self) -> None:
        self.buffer = RingBuffer()
        self.interceptor: OpInterceptor | None = None
        self.enabled = True
        self.errors = 0  # bookkeeping failures swallowed (never raised into training)
        self.groups: dict[str, tuple[int, ...]] = {}


PROBE = _ProbeState()


def set_interceptor(interceptor: OpInterceptor | None) -> None:
    """Install (or remove, with None) the fault-injection hook used by every probed group."""
    PROBE.interceptor = interceptor


def _tensor_bytes(obj: Any, depth: int = 0) -> int:
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if depth < 2 and isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(o, depth + 1) for o in obj)
    return 0


def _make_probed_class() -> type:
    import torch.distributed as dist

    class ProbedProcessGroup(dist.ProcessGroup):
        """A ProcessGroup that records every operation and delegates it to `inner`."""

        def __init__(
            self,
            inner: dist.ProcessGroup,
            rank: int,
            size: int,
            group_name: str,
            global_ranks: tuple[int, ...],
            backend_name: str,
        ) -> None:
            super().__init__(rank, size)
            self._inner = inner
            # DeviceMesh resolves groups by name: keep the name given to _set_group_name.
            self._ek_name = group_name
            self._ek_ranks = global_ranks
            self._ek_backend = backend_name
            self._ek_seq = 0
            self._ek_p2p_seq: dict[tuple[str, int], int] = {}
            self._ek_lock = threading.Lock()
            PROBE.groups[group_name] = global_ranks

        def _set_group_name(self, name: str) -> None:
            PROBE.groups.pop(self._ek_name, None)
            self._ek_name = name
            PROBE.groups[name] = self._ek_ranks
            try:
                self._inner._set_group_name(name)
            except Exception:  # noqa: BLE001 - the name is ours to keep regardless
                pass

        @property
        def group_name(self) -> str:
            return self._ek_name

        @property
        def inner(self) -> dist.ProcessGroup:
            """The wrapped ProcessGroup (for callers that need the real backend)."""
            return self._inner

        def _get_backend(self, device: Any) -> Any:
            return self._inner._get_backend(device)

        def _probe_call(self, op: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            method = getattr(self._inner, op)
            if not PROBE.enabled:
                return method(*args, **kwargs)
            rec = None
            peer = -1
            try:
                ranks = self._ek_ranks
                if op in P2P_OPS:
                    local_peer = args[1] if op != "recv_anysource" and len(args) > 1 else -1
                    peer = ranks[local_peer] if 0 <= local_peer < len(ranks) else -2
                    with self._ek_lock:
                        key = (op, peer)
                        seq = self._ek_p2p_seq.get(key, 0) + 1
                        self._ek_p2p_seq[key] = seq
                else:
                    with self._ek_lock:
                        self._ek_seq += 1
                        seq = self._ek_seq
                nbytes = _tensor_bytes(args[0]) if args else 0
                rec = PROBE.buffer.enter(op, self._ek_name, ranks, peer, nbytes, seq, time.time())
            except Exception:  # noqa: BLE001 - the probe never raises into training
                PROBE.errors += 1
            interceptor = PROBE.interceptor
            if interceptor is not None:
                try:
                    interceptor.before_issue(op, self._ek_ranks, peer)
                except Exception:  # noqa: BLE001
                    PROBE.errors += 1
            try:
                work = method(*args, **kwargs)
            except BaseException:
                if rec is not None:
                    PROBE.buffer.complete(rec, time.time(), False)
                raise
            if interceptor is not None:
                try:
                    interceptor.after_issue(op, self._ek_ranks, peer, work)
                except Exception:  # noqa: BLE001
                    PROBE.errors += 1
            if rec is not None:
                return _complete_on_future(rec, work, op)
            return work

    def _make(op: str) -> Callable[..., Any]:
        def probed(self: Any, *args: Any, **kwargs: Any) -> Any:
            return self._probe_call(op, args, kwargs)

        probed.__name__ = op
        probed.__doc__ = f"Probed `ProcessGroup.{op}`: records the call, then delegates."
        return probed

    def _delegate(op: str) -> Callable[..., Any]:
        def delegated(self: Any, *args: Any, **kwargs: Any) -> Any:
            return getattr(self._inner, op)(*args, **kwargs)

        delegated.__name__ = op
        return delegated

    for name in COLLECTIVE_METHODS + P2P_METHODS:
        if hasattr(dist.ProcessGroup, name):
            setattr(ProbedProcessGroup, name, _make(name))
    for name in _INNER_FALLBACK_METHODS:
        if hasattr(dist.ProcessGroup, name):
            setattr(ProbedProcessGroup, name, _delegate(name))
    return ProbedProcessGroup


# Ops whose Works have no future on this backend (gloo send/recv). Remembered because asking
# costs a C++ exception with a captured backtrace (~100 us) every time.
_NO_FUTURE: set[str] = set()


def _complete_on_future(rec: Any, work: Any, op: str) -> Any:
    """Record the exit time when the Work completes; return the Work to hand back.

    Collectives' Works carry a future that completes on the backend's thread. gloo's
    send/recv Works have none ("getFuture not implemented"): those are wrapped in a Work
    that records the exit when the caller's `wait()` returns (or `is_completed()` says so).
    """
    try:
        if op in _NO_FUTURE:
            raise LookupError(op)
        fut = work.get_future()
    except Exception:  # noqa: BLE001 - no future: complete on wait()
        _NO_FUTURE.add(op)
        try:
            return _work_class()(work, rec)
        except Exception:  # noqa: BLE001
            PROBE.buffer.complete(rec, time.time(), True)
            return work

    def done(f: Any) -> None:
        ok = True
        try:
            f.value()
        except Exception:  # noqa: BLE001 - an error completes the op, marked not ok
            ok = False
        try:
            PROBE.buffer.complete(rec, time.time(), ok)
        except Exception:  # noqa: BLE001
            PROBE.errors += 1

    try:
        fut.add_done_callback(done)
    except Exception:  # noqa: BLE001
        PROBE.buffer.complete(rec, time.time(), True)
    return work


_WORK_CLASS: list[type] = []


def _work_class() -> type:
    if _WORK_CLASS:
        return _WORK_CLASS[0]
    import torch.distributed as dist

    class ProbedWork(dist.Work):
        """A Work without a future (gloo p2p): completes the record when waited on."""

        def __init__(self, inner: Any, rec: Any) -> None:
            super().__init__()
            self._inner = inner
            self._rec = rec

        def _done(self, ok: bool) -> None:
            if self._rec is not None:
                rec, self._rec = self._rec, None
                PROBE.buffer.complete(rec, time.time(), ok)

        def wait(self, timeout: Any = None) -> bool:
            try:
                result = self._inner.wait() if timeout is None else self._inner.wait(timeout)
            except BaseException:
                self._done(False)
                raise
            self._done(True)
            return bool(result) if result is not None else True

        def is_completed(self) -> bool:
            done = self._inner.is_completed()
            if done:
                self._done(True)
            return done

        def is_success(self) -> bool:
            return self._inner.is_success()

        def exception(self) -> Any:
            return self._inner.exception()

        def source_rank(self) -> int:
            return self._inner.source_rank()

        def result(self) -> Any:
            return self._inner.result()

        def synchronize(self) -> None:
            self._inner.synchronize()

        def get_future(self) -> Any:
            return self._inner.get_future()

    _WORK_CLASS.append(ProbedWork)
    return ProbedWork


_REGISTERED: dict[str, str] = {}
_CLASS: list[type] = []


def _probed_class() -> type:
    if not _CLASS:
        _CLASS.append(_make_probed_class())
    return _CLASS[0]


def register_backend(inner: str = "gloo") -> str:
    """Register the probing backend wrapping `inner` (idempotent); return its name.

    Pass the name to `torch.distributed.init_process_group(backend=name)`. On a machine with
    CUDA and NCCL, the same backend also serves CUDA tensors through an inner NCCL backend.
    """
    import torch
    import torch.distributed as dist

    if inner != "gloo":
        raise ValueError(f"inner backend {inner!r} is not supported; use 'gloo'")
    name = f"ekmon_{inner}"
    if name in _REGISTERED:
        return name
    use_nccl = torch.cuda.is_available() and dist.is_nccl_available()
    cls = _probed_class()

    def creator(opts: Any, backend_options: Any) -> Any:
        store, rank, size, timeout = opts.store, opts.group_rank, opts.group_size, opts.timeout
        pg = dist.ProcessGroup(store, rank, size)
        gloo = dist.ProcessGroupGloo(store, rank, size, timeout)
        pg._set_default_backend(dist.ProcessGroup.BackendType.GLOO)
        pg._register_backend(torch.device("cpu"), dist.ProcessGroup.BackendType.GLOO, gloo)
        if use_nccl:
            nccl_opts = dist.ProcessGroupNCCL.Options()
            nccl_opts._timeout = timeout
            nccl = dist.ProcessGroupNCCL(dist.PrefixStore("nccl/", store), rank, size, nccl_opts)
            pg._register_backend(torch.device("cuda"), dist.ProcessGroup.BackendType.NCCL, nccl)
            pg._set_default_backend(dist.ProcessGroup.BackendType.NCCL)
        ranks = tuple(int(r) for r in opts.global_ranks_in_group) or tuple(range(size))
        return cls(pg, rank, size, str(opts.group_id), ranks, name)

    devices = ["cpu", "cuda"] if use_nccl else ["cpu"]
    if name.upper() not in dist.Backend._plugins:
        dist.Backend.register_backend(name, creator, extended_api=True, devices=devices)
    _REGISTERED[name] = name
    return name
