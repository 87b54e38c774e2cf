"""Which node runs which source: by each node's measured capacity (windows/s).

Pure logic, no Ray: the coordinator (:mod:`streamdet.distributed.backend`) keeps the state and
asks :func:`spread` where sources waiting for a node should go, and :func:`rebalance` which
running sources should move when a node joins.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass


def spread(
    sources: Sequence[str],
    capacity: Mapping[str, float],
    load: Mapping[str, int] | None = None,
) -> dict[str, list[str]]:
    """Shares ``sources`` out among nodes in proportion to their capacity.

    Each source in turn goes to the node whose share would be lowest after taking it:
    ``(sources it runs + 1) / capacity``. Ties go to the node named first (in sorted order), so
    the same cluster gets the same placement.

    Args:
        sources: sources waiting for a node, in the order they should be placed.
        capacity: windows/s each node measured; nodes with none (<= 0) take nothing.
        load: sources each node runs already (default none).

    Returns:
        node -> the sources it takes (every node in ``capacity`` with something to take).

    Raises:
        ValueError: sources to place but no node with capacity.

    Example:
        >>> spread(["a", "b", "c"], {"fast": 200.0, "slow": 100.0})
        {'fast': ['a', 'b'], 'slow': ['c']}
    """
    nodes = sorted(n for n, c in capacity.items() if c > 0)
    if sources and not nodes:
        raise ValueError(f"no node with capacity to run {len(sources)} source(s): {capacity}")
    count = {n: (load or {}).get(n, 0) for n in nodes}
    taken: dict[str, list[str]] = {}
    for source in sources:
        node = min(nodes, key=lambda n: ((count[n] + 1) / capacity[n], nodes.index(n)))
        count[node] += 1
        taken.setdefault(node, []).append(source)
    return taken


@dataclass(frozen=True)
class Move:
    """Run ``source`` on ``to`` instead of ``from_``."""

    source: str
    from_: str
    to: str


def shares(
    assigned: Mapping[str, Sequence[str]],
    capacity: Mapping[str, float],
    demand: Mapping[str, float] | None = None,
) -> dict[str, float]:
    """Each node's load: its sources' demand over its capacity (a source's demand defaults to
    1: equal sources, as :func:`spread` counts them).

    Example:
        >>> shares({"a": ["x", "y"], "b": ["z"]}, {"a": 100.0, "b": 50.0})
        {'a': 0.02, 'b': 0.02}
    """
    return {
        node: sum((demand or {}).get(s, 1.0) for s in assigned.get(node, ())) / capacity[node]
        for node in sorted(n for n, c in capacity.items() if c > 0)
    }


def rebalance(
    assigned: Mapping[str, Sequence[str]],
    capacity: Mapping[str, float],
    *,
    demand: Mapping[str, float] | None = None,
    busy: Collection[str] = (),
) -> list[Move]:
    """Moves that even out the running sources after a node joined (or an engine came back).

    Greedy: while some move lowers the higher of the two loads it touches (``(sum of demand) /
    capacity``, see :func:`shares`), make one from the busiest node that can give, of a source
    not ``busy`` if it can, to the node where it lowers that load most. A move that would only
    swap which node is the busier one is not made, so the same cluster never ping-pongs a source
    between two nodes. With equal demands the counts end within one source of what
    :func:`spread` gives for the same capacities.

    Args:
        assigned: node -> the sources it runs (a node ready but running nothing: an empty list).
        capacity: windows/s each node measured; nodes with none (<= 0) neither give nor take.
        demand: windows/s each source needs (default 1 each: sources counted).
        busy: sources that should rather stay (an open event): moved only when no other source
            of their node makes a move.

    Returns:
        The moves, in the order to make them; none when the spread is as even as moves make it.

    Example:
        >>> rebalance({"old": ["a", "b", "c", "d"], "new": []}, {"old": 100.0, "new": 100.0})
        [Move(source='a', from_='old', to='new'), Move(source='b', from_='old', to='new')]
    """
    nodes = sorted(n for n, c in capacity.items() if c > 0)
    where = {s: n for n in nodes for s in assigned.get(n, ())}
    need = {s: (demand or {}).get(s, 1.0) for s in where}
    load = shares(assigned, capacity, need)
    moves: list[Move] = []
    for _ in range(len(where)):  # each move lowers the highest load: it ends well before this
        best: tuple[tuple[float, bool, float, float, int, str], Move] | None = None
        for source, node in where.items():
            for to in nodes:
                if to == node:
                    continue
                taker = load[to] + need[source] / capacity[to]
                after = max(load[node] - need[source] / capacity[node], taker)
                if after >= max(load[node], load[to]) - 1e-9:
                    continue  # no better, or only swaps which node is the busier
                key = (-load[node], source in busy, after, taker, nodes.index(to), source)
                if best is None or key < best[0]:
                    best = (key, Move(source, node, to))
        if best is None:
            return moves
        move = best[1]
        load[move.from_] -= need[move.source] / capacity[move.from_]
        load[move.to] += need[move.source] / capacity[move.to]
        where[move.source] = move.to
        moves.append(move)
    return moves
