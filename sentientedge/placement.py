"""Where ingresses run: every serving node gets one, the rest spread evenly. Pure.

Membership is Ray's: the controller passes in the nodes alive now (those that may serve) and
where each ingress is pinned, and gets back what to create and what to stop. Clients reach a
node's ingress through that node's address (or a load balancer in front of all of them), so a
node without an ingress serves nobody, and an ingress pinned to a node that left is gone.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class IngressPlan:
    create_on: list[str] = field(default_factory=list)  # a node id per ingress to create
    gone: list[str] = field(default_factory=list)  # ingresses whose node left
    surplus: list[str] = field(default_factory=list)  # ingresses to drain and stop

    def __bool__(self) -> bool:
        return bool(self.create_on or self.gone or self.surplus)


def name_index(name: str) -> int:
    """The number of an actor named ``kind-N`` (-1 for any other name)."""
    try:
        return int(name.rsplit("-", 1)[1])
    except (IndexError, ValueError):
        return -1


def next_index(names: list[str]) -> int:
    """The number the next actor of a kind gets: one past the highest (numbers never reused
    while their predecessor's name may still be known to Ray)."""
    return max(map(name_index, names), default=-1) + 1


def plan_ingresses(
    wanted: int, nodes: Sequence[str], placed: Mapping[str, str | None]
) -> IngressPlan:
    """``wanted`` ingresses (at least one per node in ``nodes``), given ``placed`` (ingress
    name -> the node it is pinned to, or None when not known yet)."""
    alive = sorted(set(nodes))
    if not alive:
        return IngressPlan()  # no node to serve from: change nothing until one is back
    gone = sorted(name for name, node in placed.items() if node is not None and node not in alive)
    on_node: dict[str, list[str]] = {node: [] for node in alive}
    unknown = 0
    for name, node in placed.items():
        if node is None:
            unknown += 1
        elif node in on_node:
            on_node[node].append(name)
    target = max(wanted, len(alive))
    counts = {node: len(names) for node, names in on_node.items()}
    create_on = [node for node in alive if counts[node] == 0]
    for node in create_on:
        counts[node] = 1
    while sum(counts.values()) + unknown < target:
        least = min(alive, key=lambda node: (counts[node], node))
        create_on.append(least)
        counts[least] += 1
    surplus: list[str] = []
    while sum(counts.values()) + unknown > target:
        most = max(alive, key=lambda node: (counts[node], node))
        if counts[most] <= 1:
            break  # never leave a node without its ingress
        names = sorted(on_node[most], key=name_index)
        surplus.append(names.pop())
        on_node[most] = names
        counts[most] -= 1
    return IngressPlan(create_on=create_on, gone=gone, surplus=surplus)
