"""``qscale-node --max-qubits N``: the widest statevector a node simulates.

The configuration (flag, ``$QSCALE_NODE_MAX_QUBITS``, validation), the capabilities the node
reports, the one width rule (:func:`statevector_width`) that the coordinator's placement
(``Node.can_hold``) and the node's own refusal both apply, and a real local cluster whose node
is capped.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable

import pytest
from qiskit import QuantumCircuit, qpy

from qscale.circuits import METHODS, dump_qpy
from qscale.coordinator.nodes import Node
from qscale.coordinator.planner import ShardPlan
from qscale.errors import InvalidArgumentError
from qscale.local import LocalCluster
from qscale.node import cli
from qscale.node.capabilities import QPY_HEADER_VERSIONS, build_capabilities, qpy_num_qubits, statevector_width
from qscale.node.config import NodeConfig
from qscale.node.daemon import NodeDaemon
from qscale.node.worker import WorkerInfo
from qscale.proto.v1 import node_pb2

from conftest import ghz

# ---- the width rule -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "width"),
    [
        ("statevector", 7),
        ("automatic", 7),
        ("", 7),
        ("density_matrix", 14),
        ("unitary", 14),
        ("superop", 28),
        ("stabilizer", None),
        ("extended_stabilizer", None),
        ("matrix_product_state", None),
    ],
)
def test_statevector_width_per_method(method: str, width: int | None) -> None:
    assert statevector_width(method, 7) == width


def test_every_job_method_has_a_width_rule() -> None:
    unbounded = {"stabilizer", "extended_stabilizer", "matrix_product_state"}
    assert {m for m in METHODS if statevector_width(m, 3) is None} == unbounded
    assert statevector_width("some_future_method", 9) == 9  # unknown: counted as a statevector
    assert statevector_width("statevector", 0) == 0


def _node(max_statevector_qubits: int, memory: int = 1 << 30) -> Node:
    caps = node_pb2.NodeCapabilities(
        name="n", hostname="h", cores=1, slots=1, memory_budget_bytes=memory, methods=list(METHODS),
        max_statevector_qubits=max_statevector_qubits, qpy_version=qpy.QPY_VERSION,
    )
    return Node(node_id="n-00000000", caps=caps, registered_at=0.0, last_heard=0.0)


def _shard(method: str, num_qubits: int) -> ShardPlan:
    return ShardPlan(index=0, chunks=(), memory_bytes=1 << 20, num_qubits=num_qubits,
                     qpy_version=qpy.QPY_VERSION, method=method)


@pytest.mark.parametrize(
    ("method", "widest_held"),
    [
        ("statevector", 5),
        ("automatic", 5),
        ("density_matrix", 2),  # 2n <= 5
        ("stabilizer", 100),
        ("extended_stabilizer", 100),
        ("matrix_product_state", 100),
    ],
)
def test_can_hold_bounds_statevector_like_methods(method: str, widest_held: int) -> None:
    node = _node(5)
    for n in range(1, 101):
        assert node.can_hold(_shard(method, n)) == (n <= widest_held), (method, n)
        assert node.can_hold(_shard(method, n)) == ((statevector_width(method, n) or 0) <= 5)


@pytest.mark.parametrize("widest", [0, -1])
def test_can_hold_without_a_width_bound(widest: int) -> None:
    node = _node(widest)  # 0: not reported; negative: a malformed report; neither bounds
    for method in ("statevector", "density_matrix", "stabilizer"):
        assert node.can_hold(_shard(method, 40))


def test_can_hold_still_checks_memory() -> None:
    node = _node(30, memory=1 << 20)
    shard = ShardPlan(index=0, chunks=(), memory_bytes=2 << 20, num_qubits=3, method="statevector")
    assert not node.can_hold(shard)


# ---- configuration --------------------------------------------------------------------------------


def test_max_qubits_default_env_and_override() -> None:
    assert NodeConfig.from_env({}).max_qubits == 0
    assert NodeConfig.from_env({"QSCALE_NODE_MAX_QUBITS": "16"}).max_qubits == 16
    assert NodeConfig.from_env({"QSCALE_NODE_MAX_QUBITS": " 0 "}).max_qubits == 0
    assert NodeConfig.from_env({"QSCALE_NODE_MAX_QUBITS": ""}).max_qubits == 0  # empty: ignored
    assert NodeConfig.from_env({"QSCALE_NODE_MAX_QUBITS": "16"}, max_qubits=20).max_qubits == 20
    assert NodeConfig.from_env({"QSCALE_NODE_MAX_QUBITS": "16"}, max_qubits=0).max_qubits == 0
    assert NodeConfig(max_qubits=3).to_dict()["max_qubits"] == 3


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        ("many", r"QSCALE_NODE_MAX_QUBITS='many': not an integer"),
        ("1.5", r"QSCALE_NODE_MAX_QUBITS='1.5': not an integer"),
        ("-1", r"QSCALE_NODE_MAX_QUBITS='-1': max qubits must be >= 0, got -1"),
    ],
)
def test_max_qubits_bad_env(raw: str, match: str) -> None:
    with pytest.raises(InvalidArgumentError, match=match):
        NodeConfig.from_env({"QSCALE_NODE_MAX_QUBITS": raw})


@pytest.mark.parametrize("value", [-3, 2.5, "8", True, None])
def test_max_qubits_bad_values(value: object) -> None:
    with pytest.raises(InvalidArgumentError, match="max qubits must be"):
        NodeConfig(max_qubits=value)  # type: ignore[arg-type]


def test_cli_max_qubits(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QSCALE_NODE_MAX_QUBITS", "9")
    assert cli.main(["--print-config"]) == 0
    assert json.loads(capsys.readouterr().out)["max_qubits"] == 9
    assert cli.main(["--max-qubits", "12", "--print-config"]) == 0
    assert json.loads(capsys.readouterr().out)["max_qubits"] == 12
    assert cli.main(["--max-qubits", "-2", "--print-config"]) == 2
    assert "max qubits must be >= 0" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        cli.main(["--max-qubits", "wide"])
    assert exc.value.code == 2
    assert "--max-qubits" in capsys.readouterr().err


def test_cli_help_names_variable_and_default() -> None:
    text = " ".join(cli.build_parser().format_help().split())
    assert "--max-qubits N" in text and "$QSCALE_NODE_MAX_QUBITS" in text and "default 0" in text


def test_local_cluster_rejects_bad_max_qubits() -> None:
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="max_qubits_per_node"):
            LocalCluster(1, max_qubits_per_node=bad)  # type: ignore[arg-type]
    cluster = LocalCluster(1, max_qubits_per_node=6)
    try:
        command = cluster.node_command("n", "127.0.0.1:1")
        assert command[command.index("--max-qubits") + 1] == "6"
        assert "--max-qubits" in LocalCluster(1, log_dir=cluster.log_dir).node_command("n", "127.0.0.1:1")
    finally:
        cluster.stop()


# ---- capabilities ---------------------------------------------------------------------------------


def _info(widest: int) -> WorkerInfo:
    return WorkerInfo(pid=1, methods=("automatic", "statevector"), qpy_version=17, qiskit_version="2.6.2",
                      aer_version="0.18.2", max_statevector_qubits=widest, warmup_s=0.1)


@pytest.mark.parametrize(
    ("memory_widest", "max_qubits", "reported"),
    [(26, 0, 26), (26, 16, 16), (26, 26, 26), (20, 30, 20), (0, 12, 12)],
)
def test_capabilities_cap_the_widest_statevector(memory_widest: int, max_qubits: int, reported: int) -> None:
    cfg = NodeConfig(name="n", slots=1, cores=1, memory_budget=1 << 30, max_qubits=max_qubits)
    assert build_capabilities(cfg, _info(memory_widest)).max_statevector_qubits == reported


# ---- the node's own check -------------------------------------------------------------------------


def _qpy(num_qubits: int, version: int | None = None) -> bytes:
    qc = QuantumCircuit(num_qubits, name="c" * 50)
    qc.rx(0.3, 0)
    qc.measure_all()
    qc.metadata = {"why": "x" * 200}
    if version is None:
        return dump_qpy(qc)
    buf = io.BytesIO()
    qpy.dump(qc, buf, version=version)
    return buf.getvalue()


def test_qpy_num_qubits_reads_every_version_this_qiskit_writes() -> None:
    assert qpy.QPY_VERSION in QPY_HEADER_VERSIONS, "a new QPY version: check qpy_num_qubits' header layout"
    for version in range(qpy.QPY_COMPATIBILITY_VERSION, qpy.QPY_VERSION + 1):
        for n in (1, 7, 40):
            assert qpy_num_qubits(_qpy(n, version)) == n, (version, n)


@pytest.mark.parametrize("data", [b"", b"QISKIT", b"NOTQPY" + bytes(40), _qpy(3)[:25], b"QISKIT\x63" + bytes(40)])
def test_qpy_num_qubits_unknown_payloads(data: bytes) -> None:
    assert qpy_num_qubits(data) is None


def _assignment(method: str, *circuits: tuple[int, bytes | None], job: str = "j1") -> node_pb2.ShardAssignment:
    payloads = [node_pb2.CircuitPayload(circuit_index=i, qpy=data or b"", cached=data is None) for i, data in circuits]
    return node_pb2.ShardAssignment(job_id=job, shard_index=0, attempt_token="t", method=method, circuits=payloads)


def test_node_refuses_what_can_hold_refuses() -> None:
    daemon = NodeDaemon(NodeConfig(name="n", slots=1, cores=1, memory_budget=1 << 30, max_qubits=5))
    daemon._methods = frozenset(METHODS)
    assert daemon._refusal(_assignment("statevector", (0, _qpy(5)))) is None
    assert daemon._refusal(_assignment("statevector", (0, _qpy(2)), (1, _qpy(7)))) == (
        "circuit needs a 7-qubit statevector; this node accepts at most 5 (--max-qubits)"
    )
    assert daemon._refusal(_assignment("density_matrix", (0, _qpy(2)))) is None
    assert "needs a 6-qubit statevector" in (daemon._refusal(_assignment("density_matrix", (0, _qpy(3)))) or "")
    for method in ("stabilizer", "extended_stabilizer", "matrix_product_state"):
        assert daemon._refusal(_assignment(method, (0, _qpy(30)))) is None
    # A circuit sent with an earlier shard of the job is read from the node's cache.
    first = _assignment("matrix_product_state", (0, _qpy(9)), (1, _qpy(4)))
    assert daemon._refusal(first) is None and daemon._fill_from_cache(first) is None
    assert "needs a 9-qubit statevector" in (daemon._refusal(_assignment("statevector", (0, None))) or "")
    assert daemon._refusal(_assignment("statevector", (1, None))) is None
    for n in range(1, 12):  # the node and the coordinator agree, method by method
        for method in ("statevector", "density_matrix", "stabilizer", "matrix_product_state"):
            refused = daemon._refusal(_assignment(method, (0, _qpy(n)), job="j2")) is not None
            assert refused == (not _node(5).can_hold(_shard(method, n))), (method, n)


def test_uncapped_node_does_not_read_widths() -> None:
    daemon = NodeDaemon(NodeConfig(name="n", slots=1, cores=1, memory_budget=1 << 30))
    daemon._methods = frozenset(METHODS)
    assert daemon._refusal(_assignment("statevector", (0, _qpy(25)))) is None


# ---- a real cluster ----------------------------------------------------------------------------


def test_capped_local_cluster(make_cluster: Callable[..., LocalCluster]) -> None:
    cluster = make_cluster(1, max_qubits_per_node=5, startup_timeout=60)
    client = cluster.client
    [node] = client.nodes()
    assert node.max_statevector_qubits == 5

    narrow = QuantumCircuit(4, name="narrow")
    narrow.h(range(4))
    narrow.rx(0.4, 0)
    narrow.t(1)
    narrow.measure_all()
    result = client.submit(narrow, shots=500, seed=3).result(timeout=60)
    assert sum(result.counts[0].values()) == 500

    wide_clifford = ghz(7)  # h + cx + measure_all: the stabilizer method, not capped
    result = client.submit(wide_clifford, shots=400, seed=4).result(timeout=60)
    assert set(result.counts[0]) <= {"0" * 7, "1" * 7} and sum(result.counts[0].values()) == 400

    small_dm = QuantumCircuit(2, name="dm")
    small_dm.h(0)
    small_dm.cx(0, 1)
    small_dm.ry(0.2, 1)
    small_dm.measure_all()  # a 2-qubit density matrix counts as a 4-qubit statevector
    result = client.submit(small_dm, shots=300, seed=5, method="density_matrix").result(timeout=60)
    assert sum(result.counts[0].values()) == 300
