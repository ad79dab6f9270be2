"""PyTorch DCP checkpoints (`.metadata` + `__<rank>_<n>.distcp`) as a `LogicalSource`, safely.

DCP's `.metadata` is a pickle. It is read with an unpickler that allows only DCP's own metadata
classes (and torch.Size, dtypes, layouts, paths): anything else fails with a clear message
instead of running code. Each item inside a `.distcp` file is a `torch.save` blob at (offset,
length); it is read with `torch.load(weights_only=True)` from a memory-mapped slice.

Every non-tensor item is kept exactly: DCP stores each as a `torch.save` blob (an int, a float, a
tuple such as Adam's `betas`, a dataloader's pickled state as `bytes`, an `io.BytesIO`); they are
read with `torch.load(weights_only=True)` and `io.BytesIO` as the only class allowed beyond what
that allows, and handed out in the manifest's JSON encoding (`elastickit.checkpoint.format.values`:
tuples, bytes and BytesIO tagged). An item that cannot be read that way stops the conversion with
its name: nothing is dropped. Pickled bytes inside an item (torchtitan's dataloader state) stay
opaque bytes: elastickit never unpickles them.

`convert --to dcp` keeps what DCP has no place for as two plain non-tensor entries under
`elastickit`: `elastickit.step` (an int) and, when the source has rules, `elastickit.rules` (their
JSON text). DCP readers load them like any other entry (or skip them: `dcp.load` reads only the
keys its state dict asks for); this reader takes them back as the source's step and rules. A
checkpoint without them (one torchtitan wrote) gives its step from `train_state.step`, where
torchtitan keeps it.
"""

from __future__ import annotations

import io
import json
import mmap
import os
import pickle
import zipfile
from typing import Any

import torch
from elastickit.checkpoint.errors import DataError, RequestError
from elastickit.checkpoint.format.stfile import st_dtype

from .source import LogicalTensorInfo

METADATA = ".metadata"
RESERVED = "elastickit"
"""The top-level DCP entry under which `convert --to dcp` stores the step and the rules."""
STEP_ENTRY = f"{RESERVED}/step"
RULES_ENTRY = f"{RESERVED}/rules"
TRAIN_STATE_STEP = "train_state/step"
"""Where torchtitan keeps the step (its trainer's `state_dict()` under `train_state`)."""

_ALLOWED: dict[str, set[str]] = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
        "TensorProperties",
        "MetadataIndex",
        "StorageMeta",
        "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath", "Path"},
    "collections": {"OrderedDict"},
}


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, f: io.BufferedIOBase, source: str) -> None:
        super().__init__(f)
        self._source = source

    def find_class(self, module: str, name: str) -> Any:
        if name in _ALLOWED.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise DataError(
            f"{self._source} refers to {module}.{name}, which is not one of DCP's metadata classes; "
            "refusing to unpickle it (the file may not be a DCP checkpoint, or may be malicious)",
            path=self._source,
        )


def read_metadata(path: str) -> Any:
    """DCP's `Metadata` of checkpoint directory `path`, through the restricted unpickler."""
    from torch.distributed.checkpoint.metadata import Metadata

    mpath = os.path.join(path, METADATA)
    try:
        with open(mpath, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise RequestError(
            f"{path} has no {METADATA}: not a (complete) DCP checkpoint", path=path
        ) from None
    try:
        meta = _MetadataUnpickler(io.BytesIO(raw), mpath).load()  # type: ignore[arg-type]
    except DataError:
        raise
    except Exception as e:  # a damaged pickle makes the unpickler fail in many ways (a huge
        # length: MemoryError; a wrong opcode: UnpicklingError, KeyError, ...): all mean damage
        raise DataError(
            f"{mpath} is not a readable DCP metadata file ({type(e).__name__}: {e}); it is damaged",
            path=mpath,
        ) from e
    if not isinstance(meta, Metadata):
        raise DataError(
            f"{mpath} holds a {type(meta).__name__}, not DCP's Metadata; it is damaged", path=mpath
        )
    return meta


def is_dcp_checkpoint(path: str) -> bool:
    return os.path.isfile(os.path.join(path, METADATA))


class DcpSource:
    """A DCP checkpoint directory as logical tensors, named by their state-dict path."""

    def __init__(self, path: str) -> None:
        from torch.distributed.checkpoint.metadata import (
            BytesStorageMetadata,
            TensorStorageMetadata,
        )

        self.path = path
        self.meta = read_metadata(path)
        self.step = 0
        self.rules: tuple[dict[str, Any], ...] = ()
        self._tensors: dict[str, LogicalTensorInfo] = {}
        self._bytes: list[str] = []
        try:
            self._interpret(BytesStorageMetadata, TensorStorageMetadata)
        except DataError:
            raise
        except (AttributeError, TypeError, KeyError, ValueError, IndexError) as e:
            mpath = os.path.join(path, METADATA)
            raise DataError(f"{mpath} is malformed ({type(e).__name__}: {e}); it is damaged", path=mpath) from e
        self._maps: dict[str, tuple[Any, mmap.mmap]] = {}
        self._read_reserved()

    def _interpret(self, bytes_md: type, tensor_md: type) -> None:
        """Index the metadata: logical names, tensor infos, and the stored items of each."""
        # DCP flattens nested state dicts with "."; planner_data keeps each key's path, which
        # gives elastickit's logical name ("model/layers.0.w" for ("model", "layers.0.w")).
        paths = getattr(self.meta, "planner_data", None) or {}
        self._fqn: dict[str, str] = {}
        for fqn, md in self.meta.state_dict_metadata.items():
            key_path = paths.get(fqn)
            name = (
                "/".join(str(p) for p in key_path) if isinstance(key_path, tuple | list) and key_path else fqn
            )
            self._fqn[name] = fqn
            if isinstance(md, tensor_md):
                dtype = st_dtype(md.properties.dtype, what=f"DCP tensor {fqn!r}")
                self._tensors[name] = LogicalTensorInfo(
                    name=name, dtype=dtype, shape=tuple(md.size)
                )
            elif isinstance(md, bytes_md):
                self._bytes.append(name)
        self._index: dict[str, list[tuple[Any, Any]]] = {}
        for idx, info in self.meta.storage_data.items():
            if getattr(info, "transform_descriptors", None):
                raise DataError(
                    f"{self.path}: item {idx.fqn!r} is stored with transforms {info.transform_descriptors} "
                    "(compression extensions), which this reader does not support",
                    path=self.path,
                    tensor=idx.fqn,
                )
            self._index.setdefault(idx.fqn, []).append((idx, info))

    def _read_reserved(self) -> None:
        """The step and rules `convert --to dcp` stored (see the module docstring)."""
        mine = [n for n in self._bytes if n.startswith(RESERVED + "/")]
        self._bytes = [n for n in self._bytes if n not in mine]
        values = {}
        for name in mine:
            for _, sinfo in self._index.get(self._fqn[name], []):
                values[name] = self._load(sinfo, name)
        entry = STEP_ENTRY
        if STEP_ENTRY not in values and TRAIN_STATE_STEP in self._fqn:
            entry = TRAIN_STATE_STEP  # torchtitan's checkpoint
            for _, sinfo in self._index.get(self._fqn[entry], []):
                values[entry] = self._load(sinfo, entry)
        step = values.get(entry, 0)
        if isinstance(step, torch.Tensor) and step.numel() == 1 and not step.is_floating_point():
            step = int(step.item())
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise DataError(
                f"{self.path}: entry {entry!r} holds {step!r}, not a step number", path=self.path
            )
        self.step = step
        text = values.get(RULES_ENTRY)
        if text is not None:
            try:
                rules = json.loads(text)
                if not isinstance(rules, list) or not all(isinstance(r, dict) for r in rules):
                    raise ValueError("not a list of rules")
            except (TypeError, ValueError) as e:
                raise DataError(
                    f"{self.path}: entry {RULES_ENTRY!r} is not the JSON list of rules elastickit "
                    f"writes ({e})",
                    path=self.path,
                ) from e
            self.rules = tuple(rules)

    def _blob(self, info: Any) -> bytes:
        rel = str(info.relative_path)
        if rel not in self._maps:
            fpath = os.path.join(self.path, rel)
            try:
                f = open(fpath, "rb")  # noqa: SIM115 - kept open with its mapping until close()
            except FileNotFoundError:
                raise DataError(
                    f"{fpath} is missing; the DCP checkpoint is incomplete", path=fpath
                ) from None
            self._maps[rel] = (f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ))
        m = self._maps[rel][1]
        if info.offset + info.length > len(m):
            raise DataError(
                f"{os.path.join(self.path, rel)} is truncated: item at {info.offset}+{info.length} "
                f"runs past its {len(m)} bytes",
                path=os.path.join(self.path, rel),
            )
        return m[info.offset : info.offset + info.length]

    def _load(self, info: Any, fqn: str) -> Any:
        blob = self._blob(info)
        where = os.path.join(self.path, str(info.relative_path))
        try:
            # Each item is a torch.save archive whose records carry a CRC32 that torch.load does
            # not check: check it here, or a flipped bit would load as a wrong value.
            with zipfile.ZipFile(io.BytesIO(blob)) as z:
                bad = z.testzip()
        except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError) as e:
            raise DataError(
                f"{where}: item {fqn!r} is not a readable torch archive ({e}); the file is damaged",
                path=where,
                tensor=fqn,
            ) from e
        if bad is not None:
            raise DataError(
                f"{where}: record {bad} of item {fqn!r} does not match its CRC32 checksum; the file "
                "is damaged",
                path=where,
                tensor=fqn,
            )
        try:
            # DCP stores every non-tensor value with torch.save, a BytesIO too (torchtitan keeps
            # some state that way): the one class allowed beyond weights_only's own list.
            with torch.serialization.safe_globals([io.BytesIO]):
                return torch.load(io.BytesIO(blob), weights_only=True, map_location="cpu")
        except pickle.UnpicklingError as e:
            raise DataError(
                f"{self.path}: item {fqn!r} needs more than weights_only loading allows ({e}); "
                "it cannot be read safely",
                path=self.path,
                tensor=fqn,
            ) from e
        except Exception as e:  # torch's reader raises RuntimeError, ValueError... on damage
            raise DataError(
                f"{where}: item {fqn!r} cannot be loaded ({type(e).__name__}: {e}); the file is "
                "damaged",
                path=where,
                tensor=fqn,
            ) from e

    def tensors(self) -> dict[str, LogicalTensorInfo]:
        return dict(self._tensors)

    def read(self, name: str) -> torch.Tensor:
        from elastickit.checkpoint.format.stfile import torch_dtype

        info = self._tensors[name]
        out = torch.empty(info.shape, dtype=torch_dtype(info.dtype))
        covered = 0
        for idx, sinfo in self._index.get(self._fqn[name], []):
            chunk = self._load(sinfo, name)
            if not isinstance(chunk, torch.Tensor):
                raise DataError(
                    f"{self.path}: item {name!r} holds a {type(chunk).__name__}, not a tensor",
                    tensor=name,
                )
            try:
                view = out
                for dim, (o, n) in enumerate(zip(idx.offset, chunk.shape, strict=True)):
                    view = view.narrow(dim, o, n)
                view.copy_(chunk)
            except (IndexError, RuntimeError, ValueError, TypeError) as e:
                raise DataError(
                    f"{self.path}: a chunk of {name!r} (offsets {list(idx.offset)}, shape "
                    f"{list(chunk.shape)}) does not fit its shape {list(info.shape)}; the metadata "
                    "is damaged",
                    path=self.path,
                    tensor=name,
                ) from e
            covered += chunk.numel()
        if covered != out.numel():
            raise DataError(
                f"{self.path}: the chunks of {name!r} cover {covered} of its {out.numel()} elements; "
                "the checkpoint is incomplete",
                path=self.path,
                tensor=name,
            )
        return out

    def objects(self) -> dict[str, Any]:
        """Every non-tensor item by path (`a/b/c`), in the manifest's JSON encoding (tuples,
        bytes and BytesIO tagged). Raises, naming the item, for one that cannot be kept."""
        from elastickit.checkpoint.format.values import encode

        out: dict[str, Any] = {}
        for name in self._bytes:
            for _, sinfo in self._index.get(self._fqn[name], []):
                value = self._load(sinfo, name)
                try:
                    out[name] = encode(value, name)
                except RequestError as e:
                    raise DataError(
                        f"{self.path}: item {name!r} holds a {type(value).__name__} that elastickit's "
                        f"format cannot keep ({e}); refusing to convert without it",
                        path=self.path,
                        tensor=name,
                    ) from e
        return out

    def close(self) -> None:
        for f, m in self._maps.values():
            m.close()
            f.close()
        self._maps.clear()


def open_dcp(path: str, **_: Any) -> DcpSource:
    """Open a DCP checkpoint directory."""
    return DcpSource(path)
