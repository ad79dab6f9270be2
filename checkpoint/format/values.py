"""Non-tensor values in a checkpoint's JSON trees: plain JSON, plus tags for what JSON lacks.

The manifest keeps a state's non-tensor values as JSON (never pickle, DESIGN.md section 8).
JSON has no tuple and no bytes, and a conversion must give back exactly what it read (an Adam
`betas` tuple, a dataloader's pickled state, a `BytesIO` of losses), so those values are tagged,
each as a one-key object:

    {"__tensor__": "model/w"}      a tensor, stored in the rank files under that logical name
    {"__tuple__": [...]}           a tuple (its items tagged the same way)
    {"__bytes__": "<base64>"}      a bytes value (opaque: elastickit never unpickles it)
    {"__bytesio__": "<base64>"}    an io.BytesIO, by its whole buffer

A dict of the state whose only key is one of these names would read back as the tagged value,
so `encode` refuses it. The tags other than `__tensor__` came with format 1.1; a 1.0 checkpoint
has none (its tuples were saved as lists, which load into a tuple's place as before).
"""

from __future__ import annotations

import base64
import io
from collections.abc import Mapping
from typing import Any

from ..errors import RequestError

TENSOR_TAG = "__tensor__"
TUPLE_TAG = "__tuple__"
BYTES_TAG = "__bytes__"
BYTESIO_TAG = "__bytesio__"
TAGS = frozenset({TENSOR_TAG, TUPLE_TAG, BYTES_TAG, BYTESIO_TAG})


def tag_of(tree: Any) -> str | None:
    """The tag of a one-key tagged object, else None."""
    if isinstance(tree, dict) and len(tree) == 1:
        (key,) = tree
        if key in TAGS:
            return key
    return None


def is_leaf_tag(tree: Any) -> bool:
    """A tagged value with no tree inside (a tensor, bytes, a BytesIO)."""
    tag = tag_of(tree)
    return tag is not None and tag != TUPLE_TAG


def encode_scalar(value: Any, path: str) -> Any:
    """The JSON form of a non-tensor, non-container value (None, bool, int, float, str, a dtype,
    bytes, a BytesIO); raise for anything else, naming `path`."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, bytes | bytearray | memoryview):
        return {BYTES_TAG: base64.b64encode(bytes(value)).decode("ascii")}
    if isinstance(value, io.BytesIO):
        return {BYTESIO_TAG: base64.b64encode(value.getvalue()).decode("ascii")}
    import torch

    if isinstance(value, torch.dtype):
        return str(value)
    raise RequestError(
        f"state {path!r} holds a value of type {type(value).__name__}, which is neither a tensor nor JSON "
        "(nor a tuple, bytes or BytesIO); convert it to plain data in state_dict() (elastickit never pickles)"
    )


def check_key(key: Any, mapping: Mapping[Any, Any], path: str) -> str:
    """A dict key as JSON text; refuse non-str/int keys and a lone reserved tag name."""
    if not isinstance(key, str | int) or isinstance(key, bool):
        raise RequestError(f"state {path!r} has a key of type {type(key).__name__}; use str keys")
    if len(mapping) == 1 and key in TAGS:
        raise RequestError(
            f"state {path!r} is a dict whose only key is {key!r}, a name elastickit reserves for its own "
            "tags; rename that key"
        )
    return str(key)


def encode(value: Any, path: str) -> Any:
    """The tagged JSON form of a tensor-free value (tuples, bytes and BytesIO tagged)."""
    if isinstance(value, tuple):
        return {TUPLE_TAG: [encode(v, f"{path}/{i}") for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [encode(v, f"{path}/{i}") for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        return {check_key(k, value, path): encode(v, f"{path}/{k}") for k, v in value.items()}
    return encode_scalar(value, path)


def decode(tree: Any, tensors: Mapping[str, Any] | None = None) -> Any:
    """The values `encode` (or state flattening) tagged, back as Python values; tensor tags
    become `tensors[name]` (left as tags when `tensors` is None)."""
    tag = tag_of(tree)
    if tag == TENSOR_TAG:
        return tree if tensors is None else tensors[tree[TENSOR_TAG]]
    if tag == TUPLE_TAG:
        return tuple(decode(v, tensors) for v in tree[TUPLE_TAG])
    if tag == BYTES_TAG:
        return base64.b64decode(tree[BYTES_TAG])
    if tag == BYTESIO_TAG:
        return io.BytesIO(base64.b64decode(tree[BYTESIO_TAG]))
    if isinstance(tree, dict):
        return {k: decode(v, tensors) for k, v in tree.items()}
    if isinstance(tree, list):
        return [decode(v, tensors) for v in tree]
    return tree
