"""`--inject` faults of an elastic job (`elastickit train --nodes`): whole nodes killed or
stopped from outside by the supervisor, and a hung training loop the worker injects itself
(see `elastickit.elastic.simulate` for what each does)."""

from __future__ import annotations

import dataclasses

from elastickit.checkpoint.errors import RequestError

__all__ = ["NodeFault", "parse_node_fault"]

_USAGE = "use killnode:node=J:step=S, stopnode:node=J:step=S or hang:rank=R:step=S"
_FIELDS = {"killnode": ("node", "step"), "stopnode": ("node", "step"), "hang": ("rank", "step")}


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class NodeFault:
    """One `--inject` of a whole node."""

    kind: str
    node: int = -1
    step: int
    rank: int = -1
    """The rank (in the plan when step S comes) of a `hang`."""
    text: str = ""


def parse_node_fault(text: str, nodes: int, ranks: int | None = None) -> NodeFault:
    """Parse `killnode:node=J:step=S` (or stopnode, or `hang:rank=R:step=S` with `ranks` the
    world at the start); RequestError names the value and the fix."""
    kind, _, rest = text.strip().partition(":")
    if kind not in _FIELDS:
        raise RequestError(f"--inject {text!r}: with --nodes, faults are whole nodes or a hung loop; {_USAGE}")
    names = _FIELDS[kind]
    fields: dict[str, int] = {}
    for part in filter(None, rest.split(":")):
        key, eq, value = part.partition("=")
        if not eq or key not in names or key in fields:
            raise RequestError(f"--inject {text!r}: unexpected field {part!r}; {_USAGE}")
        if not value.isdigit():
            raise RequestError(f"--inject {text!r}: {key}={value!r} is not a whole number")
        fields[key] = int(value)
    for key in names:
        if key not in fields:
            raise RequestError(f"--inject {text!r}: field {key!r} is missing; {_USAGE}")
    if ranks is not None and fields.get("rank", -1) >= ranks:
        raise RequestError(f"--inject {text!r}: rank={fields['rank']} is outside ranks 0..{ranks - 1}")
    if fields.get("node", -1) >= nodes:
        raise RequestError(f"--inject {text!r}: node={fields['node']} is outside nodes 0..{nodes - 1}")
    if fields["step"] < 1:
        raise RequestError(f"--inject {text!r}: step must be at least 1 (the fault comes after that step)")
    return NodeFault(kind=kind, text=text, **fields)
