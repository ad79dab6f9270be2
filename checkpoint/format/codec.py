"""The one codec for state trees: nested containers of JSON values and tensors.

A checkpoint stores tensors in its rank files and everything else as JSON: the manifest's
`objects` (DESIGN.md section 2) and any tree an integration keeps beside its tensors. In such a
tree a tensor is a tag naming the logical tensor that holds it:

    {"__tensor__": "optim/state/layers.0.w/exp_avg"}

Every reader and writer of trees goes through this module; nothing else spells the tag.

Two encodings of the containers, one set of tags (`values`):

- plain (`encode(value, path, tensors)`): the manifest's JSON (`values`: tuples, bytes and
  BytesIO tagged, format 1.1). Dicts keep string keys (int keys become strings), a dtype becomes
  its name. A restore gives the keys back their types from the live state it loads into.
- exact (`exact=True`): every Python type survives a round trip without the live state, for
  trees that are handed back as they were saved (DeepSpeed's state dicts): `{"__tuple__": [..]}`,
  `{"__dict__": [[key, value], ...]}` (any key type, insertion order), `{"__size__": [..]}`,
  `{"__dtype__": "float32"}`, and objects whose class is on the caller's allowlist:
  `{"__obj__": "module.Class", "state": vars}` or `{"__enum__": "module.Class", "value": int}`.
  Nothing else is stored: elastickit never pickles.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Collection, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from ..errors import DataError, RequestError
from .values import TENSOR_TAG, TUPLE_TAG, check_key, encode_scalar, tag_of
from .values import decode as decode_values

if TYPE_CHECKING:
    import torch

_EXACT_TAGS = (TUPLE_TAG, "__dict__", "__size__", "__dtype__", "__obj__", "__enum__")


def tensor_ref(name: str) -> dict[str, str]:
    """The tag that stands for logical tensor `name` in a tree."""
    return {TENSOR_TAG: name}


def tensor_name(node: Any) -> str | None:
    """The logical tensor `node` stands for, or None when it is not a tag."""
    return node[TENSOR_TAG] if tag_of(node) == TENSOR_TAG else None


def encode(
    value: Any,
    path: str,
    tensors: dict[str, torch.Tensor],
    *,
    exact: bool = False,
    allow: Collection[str] = (),
) -> Any:
    """The tree of `value` with each tensor replaced by a tag; the tensors are collected into
    `tensors` under their logical names (`path/key/...`).

    `allow` (exact only): class names (`module.Qualname`) whose objects are stored by their
    attributes (or, for int enums, their value). Anything that is neither a tensor, JSON, nor
    allowed raises RequestError naming its path.
    """
    if exact:
        return _exact(value, path, tensors, frozenset(allow))
    return _plain(value, path, tensors)


def _torch() -> Any:
    """torch when it is loaded, else None: a value cannot be a tensor or a dtype unless torch is
    imported, and the torch-free paths (the CLI's DeepSpeed -> universal conversion) stay so."""
    return sys.modules.get("torch")


def _plain(value: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    torch = _torch()
    if torch is not None and isinstance(value, torch.Tensor):
        tensors[path] = value
        return {TENSOR_TAG: path}
    if isinstance(value, Mapping):
        return {check_key(k, value, path): _plain(v, f"{path}/{k}", tensors) for k, v in value.items()}
    if isinstance(value, list):
        if all(type(v) is str for v in value):  # a param group's FQNs: no tensor, no recursion
            return list(value)
        return [_plain(v, f"{path}/{i}", tensors) for i, v in enumerate(value)]
    if isinstance(value, tuple):
        return {TUPLE_TAG: [_plain(v, f"{path}/{i}", tensors) for i, v in enumerate(value)]}
    return encode_scalar(value, path)


def _exact(value: Any, path: str, tensors: dict[str, torch.Tensor], allow: frozenset[str]) -> Any:
    torch = _torch()
    if torch is not None and isinstance(value, torch.Tensor):
        tensors[path] = value.detach()
        return {TENSOR_TAG: path}
    if value is None or isinstance(value, bool | str) or type(value) in (int, float):
        return value
    if torch is not None and isinstance(value, torch.Size):
        return {"__size__": list(value)}
    if torch is not None and isinstance(value, torch.dtype):
        return {"__dtype__": str(value).removeprefix("torch.")}
    cls_name = f"{type(value).__module__}.{type(value).__qualname__}"
    if cls_name in allow:
        if isinstance(value, int):  # an int enum
            return {"__enum__": cls_name, "value": int(value)}
        return {"__obj__": cls_name, "state": _exact(vars(value), f"{path}/__obj__", tensors, allow)}
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value):
            return {"__dict__": [[k, _exact(v, f"{path}/{k}", tensors, allow)] for k, v in value.items()]}
        return {"__dict__": [[_exact(k, f"{path}/#k{i}", tensors, allow), _exact(v, f"{path}/{i}", tensors, allow)]
                             for i, (k, v) in enumerate(value.items())]}
    if isinstance(value, list | tuple):
        items = [_exact(v, f"{path}/{i}", tensors, allow) for i, v in enumerate(value)]
        return {TUPLE_TAG: items} if isinstance(value, tuple) else items
    if isinstance(value, int | float):  # numpy scalars and the like
        return value.item() if hasattr(value, "item") else float(value)
    raise RequestError(
        f"state at {path!r} holds a {cls_name}, which elastickit cannot store without pickle"
    )


def decode(
    tree: Any,
    tensors: Mapping[str, torch.Tensor],
    *,
    exact: bool = False,
    classes: Callable[[str], type] | None = None,
) -> Any:
    """The inverse of `encode`: tags become `tensors[name]`.

    `classes` (exact only) turns an allowed class name into the class; a tree naming a class it
    refuses (it raises DataError) is refused, so a checkpoint cannot make us build arbitrary
    objects.
    """
    if exact:
        return _undo_exact(tree, tensors, classes)
    return _undo_plain(tree, tensors)


def _undo_plain(tree: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    return decode_values(tree, tensors)


def _undo_exact(node: Any, tensors: Mapping[str, torch.Tensor], classes: Callable[[str], type] | None) -> Any:
    if isinstance(node, list):
        return [_undo_exact(v, tensors, classes) for v in node]
    if not isinstance(node, dict):
        return node
    name = tensor_name(node)
    if name is not None:
        return tensors[name]
    if "__size__" in node or "__dtype__" in node:
        import torch
    if "__size__" in node:
        return torch.Size(node["__size__"])
    if "__dtype__" in node:
        return getattr(torch, node["__dtype__"])
    if TUPLE_TAG in node:
        return tuple(_undo_exact(v, tensors, classes) for v in node[TUPLE_TAG])
    if "__dict__" in node:
        return {_undo_exact(k, tensors, classes): _undo_exact(v, tensors, classes) for k, v in node["__dict__"]}
    if "__enum__" in node or "__obj__" in node:
        if classes is None:
            raise DataError(f"the tree names class {node.get('__enum__') or node['__obj__']}, and no class is allowed here")
        cls = classes(node.get("__enum__") or node["__obj__"])
        if "__enum__" in node:
            return cls(node["value"])
        obj = cls.__new__(cls)
        obj.__dict__.update(_undo_exact(node["state"], tensors, classes))
        return obj
    raise DataError(f"unknown node in a state tree: {sorted(node)}")


def tensor_names(tree: Any) -> Iterator[str]:
    """Every logical tensor a tree tags, depth first."""
    if isinstance(tree, dict):
        name = tensor_name(tree)
        if name is not None:
            yield name
            return
        for v in tree.values():
            yield from tensor_names(v)
    elif isinstance(tree, list):
        for v in tree:
            yield from tensor_names(v)


def only_tags(tree: Any) -> bool:
    """Whether a non-empty dict tree holds tensor tags and nothing else."""
    if isinstance(tree, dict):
        if tensor_name(tree) is not None:
            return True
        return bool(tree) and all(only_tags(v) for v in tree.values())
    return False


def place_tensors(objects: Mapping[str, Any], names: list[str]) -> dict[str, Any]:
    """A copy of `objects` (nested, or keyed `a/b` as DCP keys them) with a tag at the path of
    every name in `names`, where flattening a live state would put it; lists stay lists.

    Raises RequestError naming the tensor when its path runs into a value that is not a
    container.
    """
    import copy

    root: dict[str, Any] = {}
    for key, value in objects.items():
        *parents, last = key.split("/")
        node = root
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise RequestError(f"state {key!r} collides with another entry at {p!r}; the checkpoint cannot be nested")
        node[last] = copy.deepcopy(value)
    for name in names:
        *parents, last = name.split("/")
        node: Any = root
        for p in parents:
            if isinstance(node, list) and p.isdigit() and int(p) < len(node):
                node = node[int(p)]
            elif isinstance(node, dict):
                nxt = node.setdefault(p, {})
                if not isinstance(nxt, dict | list) or tensor_name(nxt) is not None:
                    raise RequestError(f"tensor {name!r} collides with another entry at {p!r}; the checkpoint cannot be nested")
                node = nxt
            else:
                raise RequestError(f"tensor {name!r} collides with another entry at {p!r}; the checkpoint cannot be nested")
        if isinstance(node, list) and last.isdigit() and int(last) < len(node):
            node[int(last)] = tensor_ref(name)
        elif isinstance(node, dict):
            node[last] = tensor_ref(name)
        else:
            raise RequestError(f"tensor {name!r} collides with another entry; the checkpoint cannot be nested")
    return root
