"""Which node runs which source: by each node's measured capacity (windows/s).

Pure logic, no Ray: the coordinator (:mod:`streamdet.distributed.backend`) keeps the state and
asks :func:`spread` where sources waiting for a node should go.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence


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
