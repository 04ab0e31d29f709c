"""What a result says besides its counts: each circuit's name and the simulation method that
ran, and why the job has as many shards as it has; a job's own cap on shots per shard.
Real local clusters on loopback."""

from __future__ import annotations

from pathlib import Path

import pytest
from qiskit import QuantumCircuit, qpy

from conftest import bell, fast_config
from qscale.errors import InvalidArgumentError
from qscale.local import LocalCluster


def _tee() -> QuantumCircuit:
    """Not Clifford: runs on the statevector method under ``automatic``."""
    qc = QuantumCircuit(2, name="tee")
    qc.h(0)
    qc.t(0)
    qc.cx(0, 1)
    qc.measure_all()
    return qc


def _files(tmp_path: Path) -> list[Path]:
    """A QPY file holding a circuit named ``bell``; one holding ``tee`` and a circuit with
    Qiskit's default name; an OpenQASM file (no name of its own)."""
    one = tmp_path / "circuits.qpy"
    with one.open("wb") as fh:
        qpy.dump(bell(), fh)
    unnamed = QuantumCircuit(1, 1)  # named circuit-N by Qiskit
    unnamed.x(0)
    unnamed.measure(0, 0)
    pair = tmp_path / "pair.qpy"
    with pair.open("wb") as fh:
        qpy.dump([_tee(), unnamed], fh)
    rot = tmp_path / "rot.qasm"
    rot.write_text('OPENQASM 2.0;\ninclude "qelib1.inc";\nqreg q[2];\ncreg c[2];\nh q[0];\nrz(0.3) q[0];\n'
                   "cx q[0], q[1];\nmeasure q -> c;\n")
    return [one, pair, rot]


NAMES = ["bell", "tee", "pair[1]", "rot"]
METHODS = ["stabilizer", "statevector", "stabilizer", "statevector"]


def test_names_methods_and_the_plan_come_back_and_survive_a_restart(tmp_path: Path) -> None:
    config = fast_config(state_dir=str(tmp_path / "state"))
    files = _files(tmp_path)
    with LocalCluster(1, cores_per_node=1, config=config) as cluster:
        job = cluster.client.submit_files(files, shots=200, seed=3)
        result = job.result(timeout=120)
        assert [r.name for r in result.results] == NAMES
        assert [r.method for r in result.results] == METHODS
        plan = result.status.plan
        assert plan is not None and plan.shards == result.status.shards_total
        assert plan.limit == "min_shard_cost" and plan.explanation.startswith(f"{plan.shards} shard")
        assert plan.estimated_cost_s > 0
        data = result.to_dict()
        assert [r["name"] for r in data["results"]] == NAMES
        assert [r["method"] for r in data["results"]] == METHODS
        assert data["metadata"]["method"] == "stabilizer, statevector"
        assert data["metadata"]["method_requested"] == "automatic"
        assert data["metadata"]["plan"]["explanation"] == plan.explanation
        # A circuit submitted as such keeps its name too.
        direct = cluster.client.submit(bell(), shots=100, seed=1).result(timeout=120)
        assert direct.results[0].name == "bell" and direct.results[0].method == "stabilizer"

        # An OpenQASM syntax error names the file (and the line).
        broken = tmp_path / "broken.qasm"
        broken.write_text('OPENQASM 2.0;\ninclude "qelib1.inc";\nqreg q[2];\ncreg c[2];\nh q[0]\n'
                          "cx q[0], q[1];\n")
        with pytest.raises(InvalidArgumentError) as caught:
            cluster.client.submit_files([files[0], broken], shots=10)
        assert str(caught.value).startswith(f"{broken}: ") and "line 6" in str(caught.value)

    # The coordinator restarts on the same state directory: the result reads the same.
    with LocalCluster(0, config=config) as cluster:
        again = cluster.client.job(job.job_id).result(timeout=60)
        assert [r.name for r in again.results] == NAMES
        assert [r.method for r in again.results] == METHODS
        assert again.status.plan == plan
        assert again.counts == result.counts


def test_a_job_caps_its_own_shots_per_shard(make_cluster) -> None:
    cluster = make_cluster(2)  # the coordinator's own cap is 1,000 shots (fast_config)
    client = cluster.client
    finer = client.submit(bell(), shots=3000, seed=5, shots_per_shard=500).result(timeout=120)
    assert finer.status.shards_total == 6 and finer.status.plan.shots_per_shard == 500
    assert finer.status.plan.limit == "shots_per_shard"
    assert finer.status.plan.explanation.startswith("6 shards: at most 500 shots per shard")
    coarser = client.submit(bell(), shots=3000, seed=5, shots_per_shard=5000).result(timeout=120)
    assert coarser.status.shards_total == 3 and coarser.status.plan.shots_per_shard == 1000  # the smaller wins
    # Seeded: the same plan gives the same counts, run again.
    again = client.submit(bell(), shots=3000, seed=5, shots_per_shard=500).result(timeout=120)
    assert again.counts == finer.counts
    with pytest.raises(InvalidArgumentError, match="shots_per_shard"):
        client.submit(bell(), shots=10, shots_per_shard=0)
    with pytest.raises(InvalidArgumentError, match="10,000 shards"):
        client.submit(bell(), shots=1_000_000, shots_per_shard=10)
