"""No silent stall: the worker through broker faults on the three-broker cluster.

Each case runs the real worker (tests/cluster_faults.py) while a fault happens and reads
the output with read_committed consumers: nothing lost, no duplicates for a fresh reader,
the worker alive and predicting again within a stated bound, and a clean exit on SIGTERM.
The bound (docs/operations.md, "No silent stall"): the fault's own length (how long the
cluster cannot take writes) plus --transaction-wait-s (20 s) plus a rebalance, within
:data:`RECOVERY_S`. The full matrix, with figures, is ``python tests/cluster_faults.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from cluster_faults import run_fault
from kafka_cluster import Cluster

pytestmark = [
    pytest.mark.integration,
    # kafka-python 3.0.12 leaks the socket of a refused connection (to a killed broker).
    pytest.mark.filterwarnings("ignore:unclosed <socket:ResourceWarning"),
]

#: Beyond the fault's own length: --transaction-wait-s, a rebalance, a slow 2-core machine.
RECOVERY_S = 90.0
#: How long each fault keeps the cluster from taking writes, at most (kill + restart).
FAULT_S = {"leader-kill": 25.0, "coordinator-kill": 25.0, "rolling-restart": 20.0, "two-down": 60.0}


@pytest.mark.parametrize(
    ("fault", "guarantee"),
    [
        ("leader-kill", "exactly-once"),
        ("coordinator-kill", "exactly-once"),
        ("coordinator-kill", "at-least-once"),
        ("rolling-restart", "exactly-once"),
        ("two-down", "exactly-once"),
    ],
)
def test_the_worker_comes_through_a_broker_fault(
    kafka_cluster: Cluster,
    tiny_model_dir: Path,
    tmp_path: Path,
    fault: str,
    guarantee: str,
    kafka_client: str,
) -> None:
    res = run_fault(
        kafka_cluster,
        tiny_model_dir,
        tmp_path,
        fault,
        guarantee,
        events=400,
        rate=40.0,
        worker_args=("--kafka-client", kafka_client),
    )
    print(res.row())
    log = "\n".join(res.notable_log[-20:])
    where = "\n".join(res.diagnosis)
    assert res.lost == 0, f"{res.lost} of {res.events} events lost\n{where}\n{log}"
    if guarantee == "exactly-once":  # at-least-once may repeat what was in flight
        assert res.duplicates == 0, f"{res.duplicates} duplicates\n{log}"
    assert res.worker_alive, f"the worker exited ({res.worker_exit})\n{log}"
    assert res.stall_s <= FAULT_S[fault] + RECOVERY_S, f"stalled {res.stall_s:.0f} s\n{log}"
    assert res.worker_exit_after_sigterm == 0
