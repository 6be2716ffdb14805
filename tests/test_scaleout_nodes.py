"""Timing steps on a local two-node Ray cluster: no two overlap on one node, while other steps may.

Each node has 2 CPUs and one unit of the timing resource; the steps ask for 1 CPU each, so without the
resource two timing steps would fit on one node at once. Its own module: a Cluster needs its own Ray.
"""

from __future__ import annotations

import threading
from collections import defaultdict

import pytest

from tests.requirements import require

ray = require("ray")

TIMED = "tests.worker_targets:timed_window"
STEP_S = 5.0  # long against the seconds a spawned worker takes to start, so unrestricted steps would overlap


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    from workbench.running.scaleout import TIMING_RESOURCE

    if ray.is_initialized():  # another module's instance; a cluster needs a fresh driver connection
        ray.shutdown()
    nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "resources": {TIMING_RESOURCE: 1}})
    nodes.add_node(num_cpus=2, resources={TIMING_RESOURCE: 1})
    nodes.wait_for_nodes()
    ray.init(address=nodes.address, log_to_driver=False, logging_level="warning")
    yield nodes
    ray.shutdown()
    nodes.shutdown()


def _run_steps(executor, target: str, count: int, tmp_path) -> list:
    outcomes: list = [None] * count

    def one(i: int) -> None:
        outcomes[i] = executor(target, STEP_S, tmp_path / "logs" / f"{target.rsplit(':', 1)[1]}-{i}.log")

    threads = [threading.Thread(target=one, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return outcomes


def test_no_two_timing_steps_share_a_node(cluster, tmp_path) -> None:
    from workbench.running.scaleout import RayExecutor

    executor = RayExecutor(num_cpus=1, timing_targets=(TIMED,))
    events: list[str] = []
    outcome = executor(TIMED, 0.1, tmp_path / "logs" / "first.log", on_event=events.append)
    assert outcome.ok, outcome.error
    assert "node-exclusive" in events[0] and not any(e.startswith("warning") for e in events)

    outcomes = _run_steps(executor, TIMED, 4, tmp_path)
    executor.close()
    assert all(o.ok for o in outcomes), [o.error for o in outcomes]
    by_node: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for o in outcomes:
        assert o.result["runtime"]["node_exclusive"] is True
        by_node[o.result["runtime"]["node"]["ray_node_id"]].append(tuple(o.result["window"]))
    assert len(by_node) == 2, "both nodes should take timing steps while the other one is busy"
    for node, windows in by_node.items():
        windows.sort()
        for (_, end), (start, _) in zip(windows, windows[1:]):
            assert start >= end, f"two timing steps overlapped on node {node}: {windows}"


def test_other_steps_do_not_take_the_timing_resource(cluster, tmp_path) -> None:
    """The same step, not named a timing target: no resource asked, no node_exclusive in its record."""
    from workbench.running.scaleout import RayExecutor

    executor = RayExecutor(num_cpus=1, timing_targets=())
    events: list[str] = []
    outcome = executor(TIMED, 0.1, tmp_path / "logs" / "quality.log", on_event=events.append)
    executor.close()
    assert outcome.ok, outcome.error
    assert "node_exclusive" not in outcome.result["runtime"] and "node-exclusive" not in events[0]
