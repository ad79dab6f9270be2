"""A checkpoint root on object storage (`s3://bucket/run`, `gs://...`, `az://...`) through fsspec.

The layout is the one on disk (DESIGN.md section 2): `<root>/step-<8 digits>/rank-<r>.safetensors`
and `manifest.json`. Object stores have no rename, so the commit rule is kept by order alone:
every rank's object is uploaded and confirmed (its size read back from the store) before rank 0
puts the manifest, in one PUT, which the store makes visible atomically. A step without a
manifest is invisible to every reader here, whatever objects it has. Retention deletes the
manifest first, then the step's objects, so a crash midway leaves an incomplete step, never a
manifest that names deleted objects.

Credentials and the endpoint come from the environment as the backend reads them (for S3:
`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_ENDPOINT_URL`, `~/.aws/...`) unless
`storage_options` says otherwise. Nothing here logs or prints those options; URLs are shown
without any `user:password@` part (`redact`).
"""

from __future__ import annotations

import functools
import logging
import os
import re
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from ..errors import (
    CorruptCheckpointError,
    DataError,
    ElastickitError,
    IncompleteCheckpointError,
    RequestError,
)
from ..format.directory import CheckpointInfo, Problem
from ..format.manifest import MANIFEST_NAME, STEP_DIR_RE, FileRecord, Manifest, step_dir_name
from ..format.stfile import write_stream
from .objio import RangedFile, is_s3, open_upload
from .tier import retain_order, shared_restorable

if TYPE_CHECKING:  # the CLI's torch-free paths import this module
    import torch

log = logging.getLogger("elastickit")
T = TypeVar("T")

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")
_USERINFO = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*://)[^/@]*@")
LOCAL_SCHEMES = ("file", "local")

# The package that brings each common scheme's fsspec backend (fsspec's own hint otherwise).
_BACKENDS = {
    "s3": "s3fs (pip install 'elastickit[s3]')",
    "s3a": "s3fs (pip install 'elastickit[s3]')",
    "gs": "gcsfs (pip install gcsfs)",
    "gcs": "gcsfs (pip install gcsfs)",
    "az": "adlfs (pip install adlfs)",
    "abfs": "adlfs (pip install adlfs)",
    "abfss": "adlfs (pip install adlfs)",
}


def url_scheme(text: str) -> str | None:
    """The scheme of a `scheme://...` URL (lower case), None for a plain path."""
    m = _SCHEME.match(text)
    return m.group(1).lower() if m else None


def redact(url: str) -> str:
    """`url` without a `user:password@` part: what messages and logs may show."""
    return _USERINFO.sub(r"\1", url)


def open_filesystem(url: str, storage_options: Mapping[str, Any] | None = None, *, what: str = "the URL") -> tuple[Any, str]:
    """(fsspec filesystem, path inside it) for `url`, or one RequestError sentence naming the
    package to install when the scheme's backend is missing."""
    scheme = url_scheme(url) or ""
    shown = redact(url)
    try:
        import fsspec
        from fsspec.core import url_to_fs
    except ImportError:
        raise RequestError(
            f"{what} {shown} is a {scheme}:// URL; object storage needs fsspec and the backend for "
            f"{scheme}:// ({_BACKENDS.get(scheme, 'see fsspec')}); install them, or give a local path",
            path=shown,
        ) from None
    try:
        fsspec.get_filesystem_class(scheme)
    except ValueError:
        raise RequestError(
            f"{what} {shown}: {scheme}:// is not a storage scheme fsspec knows; give s3://, gs://, "
            "az://, file:// or a local path",
            path=shown,
        ) from None
    except ImportError as e:
        need = _BACKENDS.get(scheme) or str(e).split("\n")[0]
        raise RequestError(
            f"{what} {shown} needs the fsspec backend for {scheme}://, which is not installed: {need}",
            path=shown,
        ) from None
    try:
        fs, path = url_to_fs(url, **dict(storage_options or {}))
    except (TypeError, ValueError) as e:
        # The options themselves are never echoed: they may hold a secret.
        raise RequestError(
            f"{what} {shown}: the {scheme}:// backend refused its storage_options ({type(e).__name__}); "
            "check their names against the backend's documentation",
            path=shown,
        ) from None
    return fs, path.rstrip("/")


def store_error(root: ObjectRoot, e: BaseException, doing: str) -> RequestError:
    """One sentence for a store that refused `doing` (never echoing credentials: botocore's
    messages hold none, and the options are not shown)."""
    if isinstance(e, PermissionError):
        fix = "check the credentials (AWS_ACCESS_KEY_ID or storage_options) and the bucket policy"
        why = "access denied"
    elif isinstance(e, FileNotFoundError):
        fix, why = "create the bucket first, or fix its name", "no such bucket"
    else:
        fix = "check the endpoint (AWS_ENDPOINT_URL or storage_options) and the credentials"
        why = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".rstrip(": ")
    return RequestError(f"cannot {doing} {root.url} ({why}); {fix}", path=root.url)


def _one_sentence(doing: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
    """Turn what the backend raises (botocore, aiohttp, OSError) into `store_error`'s sentence."""

    def wrap(fn: Callable[..., T]) -> Callable[..., T]:
        @functools.wraps(fn)
        def inner(self: ObjectRoot, *args: Any, **kwargs: Any) -> T:
            try:
                return fn(self, *args, **kwargs)
            except ElastickitError:
                raise
            except Exception as e:  # every store failure becomes one sentence
                raise store_error(self, e, doing) from e

        return inner

    return wrap


class ObjectRoot:
    """One checkpoint root under an fsspec URL: list, write, commit, read, verify, delete steps.

    Every method may be called from any rank; `commit`, `retire` and `delete_step` are rank 0's.
    It is a `storage.tier.Tier` (the persistent tier on object storage): object stores have no
    rename, so `commit` puts the manifest last, after every object is confirmed.
    """

    shares_manifest = False

    def __init__(
        self,
        url: str,
        storage_options: Mapping[str, Any] | None = None,
        *,
        what: str = "the checkpoint root",
        name: str = "persistent",
    ) -> None:
        self.name = name
        self.url = redact(url.rstrip("/"))
        self.root = self.url
        self.fs, self.path = open_filesystem(url, storage_options, what=what)
        self.s3 = is_s3(self.fs)

    # -- names -----------------------------------------------------------------------------

    def step_url(self, step: int) -> str:
        """The step's prefix as the user sees it (`s3://bucket/run/step-00000042`)."""
        return f"{self.url}/{step_dir_name(step)}"

    def _obj(self, step: int, name: str) -> str:
        return f"{self.path}/{step_dir_name(step)}/{name}"

    # -- listing ---------------------------------------------------------------------------

    @_one_sentence("list")
    def objects(self) -> dict[int, dict[str, int]]:
        """step -> {object name: size} for every `step-*` prefix under the root (one listing)."""
        self.fs.invalidate_cache(self.path)
        try:
            found = self.fs.find(self.path, withdirs=False, detail=True)
        except FileNotFoundError:
            return {}
        out: dict[int, dict[str, int]] = {}
        prefix = self.path + "/"
        for key, info in found.items():
            rel = key[len(prefix) :] if key.startswith(prefix) else ""
            parts = rel.split("/")
            m = STEP_DIR_RE.match(parts[0]) if len(parts) == 2 else None
            if m:
                out.setdefault(int(m.group(1)), {})[parts[1]] = int(info.get("size") or 0)
        return out

    def list_steps(self) -> list[CheckpointInfo]:
        """Every step under the root, oldest first; `complete` when it has a manifest."""
        return [
            CheckpointInfo(step=step, path=self.step_url(step), complete=MANIFEST_NAME in names)
            for step, names in sorted(self.objects().items())
        ]

    def committed_steps(self) -> list[int]:
        """The steps with a manifest, oldest first (what readers may load)."""
        return [c.step for c in self.list_steps() if c.complete]

    # -- writing ---------------------------------------------------------------------------

    def retire(self, step: int) -> None:
        """Before `step` is written again: delete its manifest, so that no reader ever sees a
        manifest naming objects that are being replaced (rank 0)."""
        try:
            self.fs.rm_file(self._obj(step, MANIFEST_NAME))
        except FileNotFoundError:
            pass

    def write_rank_file(
        self,
        step: int,
        name: str,
        items: Sequence[tuple[str, torch.Tensor]],
        *,
        rank: int,
        zstd_level: int | None = None,
        zstd_threads: int = 0,
        before_item: Callable[[str], None] | None = None,
        fsync: bool = True,
    ) -> FileRecord:
        """Upload one rank file (`fsync` is moot: the object exists durably once the upload
        completes), streamed from the tensors: uncompressed, the parts are sent from the
        tensors' own memory (they stay alive and unchanged until this returns); zstd frames go
        through bounded part buffers. The bytes and checksums are those of `stfile.write_file`.
        The object exists on return."""
        upload = open_upload(self.fs, self._obj(step, name), borrow=zstd_level is None)
        try:
            record = write_stream(
                upload,
                items,
                name=name,
                rank=rank,
                zstd_level=zstd_level,
                zstd_threads=zstd_threads,
                before_item=before_item,
            )
            upload.close()
        except BaseException:
            upload.abort()
            raise
        return record

    def confirm(self, step: int, files: Mapping[str, FileRecord]) -> None:
        """Check that every object of `files` is in the store at its recorded size (before the
        manifest goes up); raises DataError naming the first that is not."""
        for name, rec in sorted(files.items()):
            obj = self._obj(step, name)
            self.fs.invalidate_cache(obj)
            try:
                size = int(self.fs.info(obj)["size"])
            except FileNotFoundError:
                raise DataError(f"{self.step_url(step)}/{name} is not in the store after its upload; not committing", path=self.step_url(step)) from None
            if size != rec.size_bytes:
                raise DataError(
                    f"{self.step_url(step)}/{name} is {size} bytes in the store but {rec.size_bytes} were uploaded; not committing",
                    path=self.step_url(step),
                )

    def commit(self, step: int, manifest: Manifest, *, fsync: bool = True) -> None:
        """Put the manifest (one PUT, atomic in the store): the step becomes visible."""
        self.confirm(step, manifest.files)
        self.fs.pipe_file(self._obj(step, MANIFEST_NAME), manifest.dumps().encode("utf-8"))

    # -- as a tier (storage.tier.Tier) -----------------------------------------------------

    def step_where(self, step: int) -> str:
        return self.step_url(step)

    def committed(self) -> list[int]:
        return self.committed_steps()

    def prepare(self, step: int, *, leader: bool) -> None:
        """No directories to make; the leader retires an existing manifest of `step`."""
        if leader:
            self.retire(step)

    def after_commit(self, manifest: Manifest) -> dict[str, Any]:
        return {}

    def discard_partial(self, step: int) -> None:
        pass  # failed uploads are aborted, and no manifest makes the step's objects a checkpoint

    def retains(self, rank: int) -> bool:
        return rank == 0

    def retain(self, keeps: Callable[[int, int], bool]) -> None:
        done = self.committed_steps()
        for step in retain_order(done, keeps):
            self.delete_step(step)  # the manifest first, then the objects
        if done:
            self.remove_incomplete(keep_newer_than=done[-1])

    def restore_manifest(self, coord: Any, step: int) -> Manifest:
        return self.read_manifest(step)

    def bring_files(self, coord: Any, group: Any, manifest: Manifest, files: set[str]) -> list[str]:
        return []

    def inventory(self, rank: int) -> list[int]:
        return self.committed_steps() if rank == 0 else []

    def restorable(self, gathered: Sequence[Any]) -> list[int]:
        return shared_restorable(gathered)

    def unservable(self, gathered: Sequence[Any]) -> dict[int, str]:
        return {}  # a damaged step is found when it is opened (and the restore falls back)

    # -- deleting --------------------------------------------------------------------------

    @_one_sentence("delete from")
    def delete_step(self, step: int) -> None:
        """Delete a whole step: the manifest first, then its objects."""
        self.retire(step)
        prefix = f"{self.path}/{step_dir_name(step)}"
        try:
            self.fs.rm(prefix, recursive=True)
        except FileNotFoundError:
            pass
        self.abort_uploads(prefix)
        self.fs.invalidate_cache(self.path)

    def remove_incomplete(self, *, keep_newer_than: int | None = None) -> list[str]:
        """Delete the steps without a manifest (older than `keep_newer_than`: a newer one may be
        an upload in flight); returns their URLs."""
        removed = []
        for c in self.list_steps():
            if c.complete or (keep_newer_than is not None and c.step > keep_newer_than):
                continue
            self.delete_step(c.step)
            removed.append(c.path)
        return removed

    def abort_uploads(self, prefix: str = "") -> int:
        """Abort the multipart uploads in flight under `prefix` (default: the root) on S3: those
        of a killed writer hold billed parts although no object ever appeared. Call only when no
        live writer uploads there (the lease holder, or under a step being deleted). Returns how
        many were aborted."""
        if not self.s3:
            return 0
        bucket, key, _ = self.fs.split_path(prefix or self.path)
        aborted = 0
        try:
            got = self.fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=key + "/")
            for up in got.get("Uploads", []):
                self.fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=up["Key"], UploadId=up["UploadId"])
                aborted += 1
        except Exception as e:  # noqa: BLE001 - housekeeping; a bucket lifecycle rule also does it
            log.info("elastickit: could not abort multipart uploads under %s (%s)", self.url, type(e).__name__)
        return aborted

    # -- reading ---------------------------------------------------------------------------

    @_one_sentence("read from")
    def read_manifest(self, step: int) -> Manifest:
        """The committed manifest of `step`; IncompleteCheckpointError when it has none."""
        obj = self._obj(step, MANIFEST_NAME)
        try:
            text = self.fs.cat_file(obj).decode("utf-8")
        except FileNotFoundError:
            raise IncompleteCheckpointError(
                f"{self.step_url(step)} has no {MANIFEST_NAME}: the save never committed, so it cannot "
                "be loaded; restore an earlier checkpoint",
                path=self.step_url(step),
            ) from None
        except UnicodeDecodeError as e:
            raise CorruptCheckpointError(f"{self.step_url(step)}/{MANIFEST_NAME} is not text ({e})", path=self.step_url(step)) from e
        return Manifest.loads(text, source=f"{self.step_url(step)}/{MANIFEST_NAME}")

    def open_file(self, step: int, name: str, record: FileRecord | None, *, verify: bool = True) -> RangedFile:
        """A rank file of `step`, read by ranged GETs and verified (see `objio.RangedFile`)."""
        return RangedFile(self.fs, self._obj(step, name), record, label=f"{self.step_url(step)}/{name}", verify=verify)

    def open_step(self, step: int, manifest: Manifest | None = None) -> ObjectStep:
        """Committed `step` as readers take it (the executor's `StepSource`, as a step directory's
        `StepDir` is): its manifest (read now unless given) and its files by ranged reads."""
        return ObjectStep(self, step, manifest if manifest is not None else self.read_manifest(step))

    def verify_step(self, step: int) -> list[Problem]:
        """Check every byte of every object of `step` against its manifest (sorted problems)."""
        manifest = self.read_manifest(step)
        problems: list[Problem] = []
        for name, rec in sorted(manifest.files.items()):
            label = f"{self.step_url(step)}/{name}"
            held = tuple(manifest.tensors_in_file(name))
            try:
                with self.open_file(step, name, rec) as f:
                    bad = f.verify_all()
            except CorruptCheckpointError as e:
                problems.append(Problem(file=label, tensors=held, reason=str(e)))
                continue
            if bad:
                hit = tuple(sorted(t.name for t in manifest.tensors.values() if any(s.file == name and s.key in bad for s in t.shards)))
                problems.append(Problem(file=label, tensors=hit, reason=f"{label}: {len(bad)} stored tensor(s) do not match their checksums"))
        return problems

    # -- whole trees (the CLI's conversions stage through a local directory) ---------------

    @_one_sentence("list")
    def is_empty(self) -> bool:
        """Whether nothing is stored under the root."""
        self.fs.invalidate_cache(self.path)
        try:
            return not self.fs.find(self.path, withdirs=False, maxdepth=None)
        except FileNotFoundError:
            return True

    @_one_sentence("download from")
    def download_step(self, step: int, local_dir: str) -> str:
        """Copy `step` (manifest last) into `local_dir/step-<8 digits>/`; returns that directory."""
        manifest = self.read_manifest(step)
        out = os.path.join(local_dir, step_dir_name(step))
        os.makedirs(out, exist_ok=True)
        for name in sorted(manifest.files):
            self.fs.get_file(self._obj(step, name), os.path.join(out, name))
        with open(os.path.join(out, MANIFEST_NAME), "w", encoding="utf-8") as f:
            f.write(manifest.dumps())
        return out

    @_one_sentence("download from")
    def download_tree(self, local_dir: str) -> str:
        """Copy everything under the root into `local_dir` (a foreign format's folder)."""
        self.fs.get(self.path + "/", local_dir.rstrip("/") + "/", recursive=True)
        return local_dir

    @_one_sentence("upload to")
    def upload_tree(self, local_dir: str, *, last: Sequence[str] = (MANIFEST_NAME, ".metadata", "latest")) -> int:
        """Upload every file under `local_dir` to the root; files named in `last` (commit
        markers: a manifest, DCP's .metadata, DeepSpeed's latest) go after all others, so a
        reader never sees a marker before the data it names. Returns the bytes uploaded."""
        files = []
        for dirpath, _dirs, names in os.walk(local_dir):
            for name in names:
                full = os.path.join(dirpath, name)
                files.append((name in last, os.path.relpath(full, local_dir), full))
        total = 0
        for _late, rel, full in sorted(files):
            self.fs.put_file(full, f"{self.path}/{rel.replace(os.sep, '/')}")
            total += os.path.getsize(full)
        return total


class ObjectStep:
    """One committed step of an object root, as readers take it (see `format.directory.StepDir`).

    Attributes:
        manifest: the step's manifest.
        where: the step's URL (what messages call it).
    """

    def __init__(self, root: ObjectRoot, step: int, manifest: Manifest) -> None:
        self._root, self._step = root, step
        self.manifest = manifest
        self.where = root.step_url(step)

    def open(self, name: str, record: FileRecord, *, verify: bool = True) -> RangedFile:
        """File `name` of this step, by ranged GETs, each tensor verified on first access."""
        return self._root.open_file(self._step, name, record, verify=verify)
