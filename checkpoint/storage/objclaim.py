"""Claiming a checkpoint root on object storage: writable, not a checkpoint, one writer, its run.

The file root's writer lock is a kernel record lock (`lock.py`); an object store has none. On S3
(and S3-compatible servers that honour conditional writes) the writer holds a *lease*: the
object `<root>/.elastickit.lock`, created with `If-None-Match: *` (only one creator wins), saying
who holds it, and rewritten every `lease_s / 4` seconds with `If-Match` on its last ETag. A
second writer is refused with one sentence naming the holder and how long ago it renewed. A
holder that died stops renewing; once its lease is `lease_s` old by the store's own clock (the
LastModified of our probe object, so no two machines' clocks are compared) the next writer
takes it over with `If-Match` on the stale ETag, so two newcomers cannot both win. A holder
whose renewal finds its ETag changed has lost the lease (it stalled past `lease_s`) and says so
loudly. A worker of an earlier incarnation of the same elastic job (the same
`TORCHELASTIC_RUN_ID`) does not block the restart, as with the file lock.

Holding the lease, the writer aborts the multipart uploads left under the root by writers that
died mid-upload (their parts are billed storage, though no object ever appeared).

Other fsspec backends offer no conditional write through fsspec: the writer goes on unlocked
and says so once, naming the root (run one job per root there).

The run id lives in `<root>/.elastickit-run` as on a file root, so node-local tiers are keyed
by run (`runs.py`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

from ..errors import RequestError
from ..format.directory import RUN_FILE
from ..format.manifest import MANIFEST_NAME, STEP_DIR_RE
from ..lock import LOCK_NAME
from .objstore import ObjectRoot, store_error

log = logging.getLogger("elastickit")

LEASE_S = 60.0


def _precondition_failed(e: BaseException) -> bool:
    text = str(e).lower()
    return isinstance(e, FileExistsError) or "pre-condition" in text or "precondition" in text or "conditionalrequestconflict" in text


def refuse_checkpoint_prefix(root: ObjectRoot) -> None:
    """Raise RequestError if the URL is one checkpoint (a step prefix) rather than a root."""
    name = root.url.rstrip("/").rsplit("/", 1)[-1]
    if root.fs.exists(f"{root.path}/{MANIFEST_NAME}") or STEP_DIR_RE.match(name):
        parent = root.url.rstrip("/").rsplit("/", 1)[0]
        raise RequestError(
            f"{root.url} is one checkpoint, not a checkpoint root that holds step-* prefixes; give "
            f"its root {parent} (and restore(step=...) to resume from that step)",
            path=root.url,
        )


def probe(root: ObjectRoot) -> float:
    """Prove the root writable (put and delete a probe object); returns the store's clock (the
    probe's LastModified, Unix seconds)."""
    obj = f"{root.path}/.ek-probe-{os.urandom(6).hex()}"
    try:
        root.fs.pipe_file(obj, b"")
        info = root.fs.info(obj)
        root.fs.rm_file(obj)
    except Exception as e:  # noqa: BLE001 - every refusal becomes one sentence
        raise store_error(root, e, "write to") from None
    modified = info.get("LastModified") or info.get("mtime") or info.get("updated")
    return modified.timestamp() if hasattr(modified, "timestamp") else time.time()


class Lease:
    """The writer lease on an object root (see the module docstring); `release()` gives it back."""

    def __init__(self, root: ObjectRoot, etag: str | None, lease_s: float) -> None:
        self.root = root
        self.locked = etag is not None
        self._etag = etag
        self._lease_s = lease_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if etag is not None:
            self._thread = threading.Thread(target=self._renew_loop, name="elastickit-lease", daemon=True)
            self._thread.start()

    @property
    def _key(self) -> tuple[str, str]:
        bucket, key, _ = self.root.fs.split_path(f"{self.root.path}/{LOCK_NAME}")
        return bucket, key

    def _renew_loop(self) -> None:
        while not self._stop.wait(self._lease_s / 4):
            bucket, key = self._key
            try:
                out = self.root.fs.call_s3("put_object", Bucket=bucket, Key=key, Body=_holder(self._lease_s), IfMatch=self._etag)
                self._etag = out["ETag"]
            except Exception as e:  # noqa: BLE001 - a renewal failure is reported, never raised
                if _precondition_failed(e):
                    log.error(
                        "elastickit: the writer lease on %s was taken over by another writer (this one "
                        "did not renew it within %.0f s); two jobs may now write this root",
                        self.root.url,
                        self._lease_s,
                    )
                    return
                log.warning("elastickit: cannot renew the writer lease on %s (%s); retrying", self.root.url, type(e).__name__)

    def release(self) -> None:
        """Stop renewing and delete the lease (only if it is still ours)."""
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join(timeout=30)
        self._thread = None
        bucket, key = self._key
        try:
            self.root.fs.call_s3("delete_object", Bucket=bucket, Key=key, IfMatch=self._etag)
        except Exception:  # noqa: BLE001 - not ours any more, or the store refuses conditional deletes
            with contextlib.suppress(Exception):  # else it lapses by itself
                if json.loads(self.root.fs.cat_file(f"{bucket}/{key}")).get("pid") == os.getpid():
                    self.root.fs.rm_file(f"{bucket}/{key}")


def _holder(lease_s: float) -> bytes:
    return json.dumps(
        {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "since": time.time(),
            "job": os.environ.get("TORCHELASTIC_RUN_ID", ""),
            "lease_s": lease_s,
        }
    ).encode()


def acquire_lease(root: ObjectRoot, *, now_s: float, lease_s: float = LEASE_S) -> Lease:
    """Take the writer lease of `root` or raise RequestError naming its holder. `now_s` is the
    store's clock (from `probe`)."""
    if not root.s3:
        log.warning(
            "elastickit: no writer lock on %s: fsspec's %s backend has no conditional write; make sure "
            "only one job writes this root at a time",
            root.url,
            type(root.fs).__name__,
        )
        return Lease(root, None, lease_s)
    bucket, key, _ = root.fs.split_path(f"{root.path}/{LOCK_NAME}")
    try:
        out = root.fs.call_s3("put_object", Bucket=bucket, Key=key, Body=_holder(lease_s), IfNoneMatch="*")
        return Lease(root, out["ETag"], lease_s)
    except Exception as e:  # noqa: BLE001
        if not _precondition_failed(e):
            raise store_error(root, e, "take the writer lease of") from None
    try:
        info = root.fs.call_s3("head_object", Bucket=bucket, Key=key)
        holder: dict[str, Any] = json.loads(root.fs.cat_file(f"{bucket}/{key}") or b"{}")
    except Exception:  # noqa: BLE001 - released meanwhile: try once more from the start
        return acquire_lease(root, now_s=now_s, lease_s=lease_s)
    age = now_s - info["LastModified"].timestamp()
    held_for = float(holder.get("lease_s") or lease_s)
    dead = holder.get("host") == socket.gethostname() and not _alive(holder.get("pid"))
    if age > held_for or dead:
        try:
            out = root.fs.call_s3("put_object", Bucket=bucket, Key=key, Body=_holder(lease_s), IfMatch=info["ETag"])
        except Exception as e:  # noqa: BLE001
            if _precondition_failed(e):
                raise RequestError(
                    f"the checkpoint root {root.url} was just claimed by another writer; stop it, or give this job another root",
                    path=root.url,
                ) from None
            raise store_error(root, e, "take the writer lease of") from None
        log.warning(
            "elastickit: took over the writer lease of %s from %s, %s",
            root.url,
            _describe(holder),
            "a process of this host that is gone" if dead else f"which had not renewed it for {age:.0f} s",
        )
        return Lease(root, out["ETag"], lease_s)
    job = os.environ.get("TORCHELASTIC_RUN_ID", "")
    if job not in ("", "none") and holder.get("job") == job:
        log.warning(
            "elastickit: the checkpoint root %s is still leased by %s, a worker of an earlier incarnation "
            "of this job (TORCHELASTIC_RUN_ID=%s); going on without the lease",
            root.url,
            _describe(holder),
            job,
        )
        return Lease(root, None, lease_s)
    raise RequestError(
        f"the checkpoint root {root.url} is in use by {_describe(holder)} (its writer lease was renewed "
        f"{max(age, 0):.0f} s ago and lapses {held_for:.0f} s after the last renewal): two writers on one "
        "root interleave their checkpoints; stop that writer, or give this job another root",
        path=root.url,
    )


_guard = threading.Lock()
_holds: dict[str, list[Any]] = {}  # root URL -> [Lease, holders in this process]


def _forget_in_child() -> None:
    """A forked child holds none of its parent's leases (their renewal threads stay behind)."""
    global _guard
    _guard = threading.Lock()
    _holds.clear()


os.register_at_fork(after_in_child=_forget_in_child)


class Hold:
    """One Checkpointer's share of this process's lease on a root: several Checkpointers of one
    process may share a root (an elastic job's old and new generation overlap), as on a file
    root; the lease is against other processes. The last `release` gives the lease back."""

    def __init__(self, url: str, lease: Lease, *, fresh: bool) -> None:
        self.url = url
        self.lease = lease
        self.locked = lease.locked
        self.fresh = fresh and lease.locked  # this hold took the lease: no writer of ours was there
        self._held = True

    def release(self) -> None:
        with _guard:
            if not self._held:
                return
            self._held = False
            entry = _holds.get(self.url)
            if entry is not None and entry[0] is self.lease:
                entry[1] -= 1
                if entry[1] > 0:
                    return
                del _holds[self.url]
        self.lease.release()


def hold_lease(root: ObjectRoot, *, now_s: float, lease_s: float = LEASE_S) -> Hold:
    """This process's hold on the writer lease of `root` (taken if it has none yet)."""
    with _guard:
        entry = _holds.get(root.url)
        if entry is not None:
            entry[1] += 1
            return Hold(root.url, entry[0], fresh=False)
    lease = acquire_lease(root, now_s=now_s, lease_s=lease_s)
    with _guard:
        if lease.locked:
            _holds[root.url] = [lease, 1]
    return Hold(root.url, lease, fresh=True)


def _alive(pid: Any) -> bool:
    """Whether process `pid` of this host exists (a holder killed here frees its lease at once)."""
    if not isinstance(pid, int) or pid <= 0:
        return True  # unknown: let the lease lapse by time
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _describe(holder: dict[str, Any]) -> str:
    pid, host, since = holder.get("pid"), holder.get("host"), holder.get("since")
    if pid is None:
        return "another writer"
    when = f", since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(since))}" if isinstance(since, int | float) else ""
    return f"pid {pid} on host {host}{when}"


def run_key(root: ObjectRoot) -> str:
    """The key of the run whose checkpoints `root` holds (its run id created if new)."""
    obj = f"{root.path}/{RUN_FILE}"
    try:
        run_id = str(json.loads(root.fs.cat_file(obj))["run_id"])
    except FileNotFoundError:
        run_id = os.urandom(8).hex()
        root.fs.pipe_file(obj, (json.dumps({"run_id": run_id, "created_s": time.time()}) + "\n").encode())
    except (ValueError, KeyError, TypeError) as e:
        raise RequestError(
            f"{root.url}/{RUN_FILE} is unreadable ({type(e).__name__}); it names this root's run: restore it, "
            "or remove it to start a new run",
            path=root.url,
        ) from e
    return hashlib.sha256(f"{run_id}\0{root.url}".encode()).hexdigest()[:16]


@dataclass(slots=True)
class ObjectClaim:
    """A claimed object root: its run key and lease."""

    key: str
    lease: Hold


def claim_object_root(root: ObjectRoot, *, lease_s: float = LEASE_S) -> ObjectClaim:
    """Rank 0, at construction: refuse a checkpoint prefix, prove the root writable, take the
    writer lease and read (or create) the run id."""
    now_s = probe(root)  # first: an unreachable store or bad credentials are one sentence
    refuse_checkpoint_prefix(root)
    lease = hold_lease(root, now_s=now_s, lease_s=lease_s)
    try:
        if lease.fresh:  # no other writer, here or elsewhere: uploads in flight are orphans
            root.abort_uploads()
        key = run_key(root)
    except BaseException:
        lease.release()
        raise
    return ObjectClaim(key=key, lease=lease)
