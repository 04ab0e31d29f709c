"""The CLI as a user runs it: real subprocesses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from qiskit import QuantumCircuit, qpy

from qscale.local import LocalCluster

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "qscale.coordinator"]


def cli(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, QSCALE_COORDINATOR=""))


def test_run_quick_start_json() -> None:
    proc = cli("run", str(ROOT / "examples" / "hadamard24.qasm"), "--shots", "3000", "--seed", "4",
               "--local-nodes", "2", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["status"] == "done" and out["job_id"]
    (circuit,) = out["results"]
    assert circuit["shots"] == 3000 and sum(circuit["counts"].values()) == 3000
    assert all(len(k) == 24 and set(k) <= {"0", "1"} for k in circuit["counts"])


def test_client_commands_against_a_cluster(tmp_path: Path) -> None:
    bell = QuantumCircuit(2, name="bell")
    bell.h(0)
    bell.cx(0, 1)
    bell.measure_all()
    qpy_file = tmp_path / "bell.qpy"
    with qpy_file.open("wb") as fh:
        qpy.dump(bell, fh)
    qasm_file = tmp_path / "broken.qasm"
    qasm_file.write_text("OPENQASM 2.0;\nqreg q[1];\nfoo q[0];\n")
    with LocalCluster(1, cores_per_node=1) as cluster:
        addr = ["--coordinator", cluster.address]
        proc = cli("submit", str(qpy_file), "--shots", "500", "--seed", "1", "--wait", "--json", *addr)
        assert proc.returncode == 0, proc.stderr
        result = json.loads(proc.stdout)
        assert set(result["results"][0]["counts"]) <= {"00", "11"}
        job_id = result["job_id"]

        status = json.loads(cli("status", job_id, "--json", *addr).stdout)
        assert status["state"] == "done" and status["shots_done"] == 500
        again = json.loads(cli("result", job_id, "--json", *addr).stdout)
        assert again["results"] == result["results"]
        text = cli("result", job_id, *addr)
        assert text.returncode == 0 and job_id in text.stdout
        jobs = json.loads(cli("jobs", "--json", *addr).stdout)
        assert jobs[0]["job_id"] == job_id
        nodes = json.loads(cli("nodes", "--json", *addr).stdout)
        assert len(nodes) == 1 and nodes[0]["state"] == "alive"
        table = cli("nodes", *addr)
        assert "local-0" in table.stdout

        queued = cli("submit", str(qpy_file), "--shots", "100", *addr)
        assert queued.returncode == 0 and queued.stdout.strip()
        cancelled = cli("cancel", queued.stdout.strip(), "--json", *addr)
        assert cancelled.returncode == 0
        assert json.loads(cancelled.stdout)["state"] in ("cancelled", "done")

        bad = cli("submit", str(qasm_file), "--shots", "10", *addr)
        assert bad.returncode == 2 and "OpenQASM 2 error" in bad.stderr
        missing = cli("status", "nope", *addr)
        assert missing.returncode == 2 and "no job" in missing.stderr
        zero = cli("submit", str(qpy_file), "--shots", "0", *addr)
        assert zero.returncode == 2 and "shots" in zero.stderr


def test_unreachable_coordinator_is_a_clear_error() -> None:
    proc = cli("nodes", "--coordinator", "127.0.0.1:1", timeout=60)
    assert proc.returncode == 3 and "unavailable" in proc.stderr


def test_serve_health_exclusive_state_dir_and_sigterm(tmp_path: Path) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from conftest import wait_until

    addr_file = tmp_path / "address"
    state = tmp_path / "state"
    serve = [*CLI, "serve", "--listen", "127.0.0.1:0", "--state-dir", str(state)]
    with (tmp_path / "serve.log").open("wb") as log:
        proc = subprocess.Popen([*serve, "--address-file", str(addr_file)], stdout=log, stderr=log)
    try:
        wait_until(lambda: addr_file.exists() and addr_file.read_text().strip(), 60, "the coordinator to listen")
        address = addr_file.read_text().strip()
        with grpc.insecure_channel(address) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="qscale.v1.JobService"), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        second = subprocess.run(serve, capture_output=True, text=True, timeout=60)
        assert second.returncode == 2 and "another coordinator" in second.stderr
        proc.terminate()
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
