"""How nodes are put in rank order: the orders of ``rank_order`` and the topology labels they use.

``sorted``: torch's order, ``(addr, pid, local_id)`` with the address compared as a string.
``natural``: the address in natural order (runs of digits compared as numbers, IP addresses by
their numeric value), then pid, then local_id. ``topology``: nodes grouped by their topology label
(``zone-a/rack-07/switch-3``), compared component by component in natural order, so that nodes
sharing any prefix of the path are contiguous; natural order within a group; unlabelled nodes after
the labelled ones, in natural order.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping

from .node import NodeDesc

RANK_ORDERS = ("sorted", "natural", "topology")
# The environment variable through which an agent declares where it sits.
TOPOLOGY_ENV = "TORCH_RDZV_TOPOLOGY"
# A label is short printable text; anything longer is a mistake, not a datacenter.
MAX_TOPOLOGY_CHARS = 256
_COMPONENT = re.compile(r"[A-Za-z0-9_.:-]+")
_RUNS = re.compile(r"(\d+)")


def check_topology(label: str) -> str:
    """Return ``label`` if it is a topology path (``a/b/c``: one or more components of letters,
    digits and ``_.:-``, at most ``MAX_TOPOLOGY_CHARS`` long).

    Raises:
        ValueError: saying what is wrong with the label.
    """
    if not isinstance(label, str) or not label or len(label) > MAX_TOPOLOGY_CHARS:
        raise ValueError(f"a topology label must be 1..{MAX_TOPOLOGY_CHARS} characters of text")
    for component in label.split("/"):
        if not _COMPONENT.fullmatch(component):
            raise ValueError(
                f"component {component!r} of the topology label {label!r} is not 1 or more letters, "
                "digits or '_.:-' (write the path as 'zone-a/rack-07/switch-3')"
            )
    return label


def natural_key(text: str) -> tuple:
    """A sort key that orders ``text`` naturally: IP addresses first, by numeric value; other text
    label by label (split at dots), each by its runs of digits as numbers and the rest
    case-insensitively; ties broken by the text itself, so distinct texts never compare equal."""
    try:
        address = ipaddress.ip_address(text)
        return (0, address.version, int(address), text)
    except ValueError:
        pass
    # Host names compare label by label, so that 'gpu.dc1' comes before 'gpu1.dc1'.
    labels = tuple(
        tuple((0, int(run), "") if run.isdigit() else (1, 0, run.casefold()) for run in _RUNS.split(label) if run)
        for label in text.split(".")
    )
    return (1, labels, text)


def node_key(node: NodeDesc) -> tuple:
    """The natural sort key of a node: its address naturally, then pid, then local_id."""
    return (natural_key(node.addr), node.pid, node.local_id)


def order_nodes(nodes: Iterable[NodeDesc], order: str, topology: Mapping[NodeDesc, str]) -> list[NodeDesc]:
    """``nodes`` in ``order`` (one of ``RANK_ORDERS``); ``topology`` maps nodes to their labels."""
    if order == "sorted":
        return sorted(nodes)
    if order == "natural":
        return sorted(nodes, key=node_key)

    def grouped(node: NodeDesc) -> tuple:
        label = topology.get(node)
        path = tuple(natural_key(c) for c in label.split("/")) if label else ()
        return (label is None, path, node_key(node))

    return sorted(nodes, key=grouped)
