"""Placement logic of the ray backend (pure: no Ray): where sources go, and which move when a
node joins (streamdet/distributed/placement.py)."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from streamdet.distributed.placement import Move, rebalance, shares, spread


def apply(assigned: dict[str, list[str]], moves: list[Move]) -> dict[str, list[str]]:
    after = {node: list(sources) for node, sources in assigned.items()}
    for m in moves:
        after[m.from_].remove(m.source)
        after[m.to].append(m.source)
    return after


def test_a_joining_node_takes_half_of_an_equal_nodes_sources():
    moves = rebalance({"old": ["a", "b", "c", "d"], "new": []}, {"old": 90.0, "new": 90.0})

    assert [(m.from_, m.to) for m in moves] == [("old", "new")] * 2


def test_sources_with_an_open_event_are_moved_last():
    """Two must move, and three of the four have an open event: the idle one goes first."""
    moves = rebalance(
        {"old": ["a", "b", "c", "d"], "new": []},
        {"old": 90.0, "new": 90.0},
        busy={"a", "b", "c"},
    )

    assert [m.source for m in moves][0] == "d"
    assert len(moves) == 2


def test_a_balanced_cluster_moves_nothing_and_never_ping_pongs():
    """Hysteresis: 3 sources on two equal nodes stay 2 and 1 (moving one only swaps which node
    is the busier), and planning again after the moves plans none."""
    assert rebalance({"a": ["x", "y"], "b": ["z"]}, {"a": 50.0, "b": 50.0}) == []
    assigned = {"a": ["s1", "s2", "s3", "s4", "s5"], "b": [], "c": ["s6"]}
    capacity = {"a": 80.0, "b": 40.0, "c": 40.0}
    after = apply(assigned, rebalance(assigned, capacity))
    assert rebalance(after, capacity) == []


def test_the_moves_come_from_the_busiest_node_and_are_as_few_as_can_be():
    assigned = {"a": ["a1", "a2", "a3", "a4"], "b": ["b1", "b2"], "c": []}
    moves = rebalance(assigned, {"a": 100.0, "b": 100.0, "c": 100.0})

    assert moves == [Move("a1", "a", "c"), Move("a2", "a", "c")]


def test_a_node_without_capacity_neither_gives_nor_takes():
    assigned = {"a": ["x", "y"], "b": [], "c": []}
    moves = rebalance(assigned, {"a": 10.0, "b": 10.0, "c": 0.0})

    assert moves == [Move("x", "a", "b")]


def test_demand_weighs_sources():
    """A source needing 3 windows/s weighs as three needing 1: it alone fills the new node."""
    demand = {"big": 3.0, "s1": 1.0, "s2": 1.0, "s3": 1.0}
    assigned = {"old": ["s1", "s2", "s3", "big"], "new": []}
    moves = rebalance(assigned, {"old": 10.0, "new": 10.0}, demand=demand)

    assert moves == [Move("big", "old", "new")]
    assert shares(apply(assigned, moves), {"old": 10.0, "new": 10.0}, demand) == {
        "new": pytest.approx(0.3),
        "old": pytest.approx(0.3),
    }


@pytest.mark.parametrize("seed", range(200))
def test_after_the_moves_each_node_runs_within_one_source_of_what_spread_gives(seed: int):
    rng = random.Random(seed)
    nodes = [f"n{i}" for i in range(rng.randint(2, 5))]
    capacity = {n: float(rng.choice([20, 40, 50, 90, 100, 200])) for n in nodes}
    sources = [f"s{i}" for i in range(rng.randint(0, 14))]
    assigned: dict[str, list[str]] = {n: [] for n in nodes}
    for s in sources:  # all on a few nodes, as before a node joined
        assigned[rng.choice(nodes[: rng.randint(1, len(nodes))])].append(s)

    after = apply(assigned, rebalance(assigned, capacity))

    ideal = Counter({n: len(v) for n, v in spread(sources, capacity).items()})
    for n in nodes:
        assert abs(len(after[n]) - ideal[n]) <= 1, (capacity, assigned, after, dict(ideal))
    assert sorted(s for v in after.values() for s in v) == sorted(sources)
