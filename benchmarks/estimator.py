"""qscale estimator benchmark: exact expectation values and circuit cutting through qscale's
``EstimatorV2``, side by side with qiskit-aer's ``EstimatorV2`` in this process.

What is measured
----------------
Wall-clock seconds, end to end, to get the exact expectation values (``evs``) of a workload:

* E1  ``efficient_su2(16, reps=2)`` (96 parameters), 400 random parameter rows x 50 random
      16-qubit Pauli observables in ONE pub: observables shaped (50, 1), rows (400, 96), so
      ``evs`` is (50, 400);
* E2  the workload of qiskit-aer issue 2438: a small circuit (``efficient_su2(6, reps=2)``, 36
      parameters) with many parameter rows x 15 random 6-qubit Paulis, one pub; run at 25,000,
      50,000 and 100,000 rows (the first N rows of one fixed array) to show that the time is
      linear in the rows (seconds per 10,000 rows are printed for each);
* C1  a 24-qubit circuit on nodes capped at 16 qubits: two 12-qubit halves (ry/rz layers and a
      CX ladder each, ``efficient_su2``-like, parameters bound to fixed random values) joined by
      2 CX between them after the first layer; 5 observables (4 Paulis near and across the join,
      1 weighted sum of Paulis). qscale cuts it (qiskit-addon-cutting, ``qscale.cutting``);
* C2  the same shape with two 20-qubit halves (40 qubits) on nodes capped at 24 qubits.

through these configurations:

* ``aer-1thread``    ``qiskit_aer.primitives.EstimatorV2(options={"backend_options":
                     {"max_parallel_threads": 1}})`` at precision 0 (exact), in this process;
* ``aer-mps``        the same with ``"method": "matrix_product_state"`` (C1, C2): Aer's exact
                     expectation values on a matrix product state of the WHOLE circuit, without
                     truncation (Aer's defaults: no bond-dimension cap, truncation threshold
                     1e-16). The circuit is shallow and the halves meet in 2 CX only, so the
                     bond dimension stays small and this is both exact and fast. C2's reference (a 40-qubit
                     statevector, 16 TiB, is out of reach); for C1 it is a cross-check of the
                     statevector reference;
* ``qscale-1node``   ``LocalCluster(nodes=1, cores_per_node=1)`` (E1, E2);
* ``qscale-2nodes``  ``LocalCluster(nodes=2, cores_per_node=1)``, with
                     ``max_qubits_per_node=16`` for C1 and ``24`` for C2 (``--c2-cap``), so
                     ``EstimatorV2`` cuts those circuits into subexperiments that fit.

For qscale the timed region is ``qscale.EstimatorV2(client).run(pubs).result()``: the client's
planning (and, for C1/C2, finding the cuts and building the subexperiments), QPY encoding, gRPC,
the coordinator's planning, the simulation on the nodes, fetching the values and building the
``PubResult``s (the cut reconstruction included). For Aer: ``EstimatorV2.run(pubs).result()``.

Fairness
--------
* Every configuration gets the very same circuit, observables and parameter arrays (fixed seeds),
  generated before anything is timed.
* A cluster is started once per (nodes, qubit cap), warmed up with a tiny estimator job that
  reaches every node, and kept for all its workloads and repetitions; its start-up is not timed.
  Only one cluster is alive at a time, and none while Aer is timed (Aer runs first). Aer's
  estimator is built and warmed up (a tiny pub) before timing; ``qscale.cutting`` (and
  qiskit-addon-cutting) is imported and exercised on a tiny circuit before timing.
* qscale's nodes use one core each, like ``aer-1thread``: qscale-1node vs aer-1thread is the
  overhead of going through the cluster; qscale-2nodes vs qscale-1node is the scaling. The
  coordinator and this client run in this process and share the machine's cores with the nodes.

Checks
------
Every result is checked against the workload's reference configuration (E1, E2, C1:
``aer-1thread``; C2: ``aer-mps``): same shape, max abs difference at most 1e-9 for the exact
workloads, 1e-6 for the cut ones. The max abs difference, and whether the values are the same
bits, are printed. Every qscale repetition must give the same bits (qscale promises that
however the job is split), and qscale-1node and qscale-2nodes must agree bit for bit.
A failed check is an error, reported loudly; the script then exits with status 1.

Per qscale run the script also records, untimed, where the time went: ``run()`` returning
(client planning + QPY + submit), the coordinator's job wall time (created to finished), each
node's busy seconds, and the rest (client-side: fetching and
decoding the values, building the results, reconstructing cuts). A node is handed its next shard
before the current one ends, so its attempts overlap: its busy time is the union of their
intervals. ``--profile`` adds a cProfile of this process's main thread (the client; not the
embedded coordinator's threads) over each qscale run.

Repetitions: the median of ``--repeat`` runs; by default 3 for E1 and C1, 1 for the long E2 and
C2 (and 1 for everything with ``--quick``). The load average, and the machine's CPU busy % (all
processes, over the run) and hypervisor steal %, are printed with each run: expect ~50% busy
for a one-core configuration on 2 cores and ~100% for two nodes; more means another process
competed, and steal means the VM lost CPU time. Check them before trusting a figure.

Usage::

    python benchmarks/estimator.py --quick              # smoke run, small sizes (~20 s on 2 cores)
    python benchmarks/estimator.py --only E1            # E1, 3 repetitions (~2.5 minutes)
    python benchmarks/estimator.py --only C1,C2 --c2-cap 22
    python benchmarks/estimator.py --output /tmp/estimator.json   # everything (~13 minutes)

The whole run is long mostly because of E2's ``aer-1thread`` reference: Aer's own execution
time grows faster than linearly with the parameter rows of one call (~5 minutes for 100,000
rows on a 2-core Xeon), which is the point of E2.

Nothing is written unless ``--output PATH`` is given (JSON: machine, versions, every run, the
breakdowns, the cutting figures, the checks).

bench.py runs these workloads too (``python benchmarks/bench.py --only E1,E2,C1,C2``), through this
module's :func:`run`, :func:`print_report` and :func:`report`; there its ``--output`` decides where
the JSON goes (``estimator-results.json`` in that directory).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import math
import os
import pstats
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

try:
    import bench  # run as a script: benchmarks/ is on the path
except ImportError:  # imported as benchmarks.estimator
    from benchmarks import bench

if TYPE_CHECKING:
    from qiskit import QuantumCircuit

REPO_ROOT = Path(__file__).resolve().parent.parent

CONFIGS: tuple[str, ...] = ("aer-1thread", "aer-mps", "qscale-1node", "qscale-2nodes")
WORKLOADS: tuple[str, ...] = ("E1", "E2", "C1", "C2")
EXACT_TOLERANCE = 1e-9
CUT_TOLERANCE = 1e-6
SEEDS = {"rows": 1_001, "paulis": 2_002, "bound": 3_003, "extra_pauli": 4_004}
# Seconds per repetition of each (workload, configuration) at full size on a 2-core Xeon
# (estimator-results.json): for the duration estimate only.
REFERENCE_SECONDS: dict[tuple[str, str], float] = {
    ("E1", "aer-1thread"): 20.9, ("E1", "qscale-1node"): 18.8, ("E1", "qscale-2nodes"): 9.1,
    ("E2-25k", "aer-1thread"): 29.1, ("E2-25k", "qscale-1node"): 7.5, ("E2-25k", "qscale-2nodes"): 3.7,
    ("E2-50k", "aer-1thread"): 95.2, ("E2-50k", "qscale-1node"): 14.3, ("E2-50k", "qscale-2nodes"): 7.1,
    ("E2-100k", "aer-1thread"): 332.6, ("E2-100k", "qscale-1node"): 26.8, ("E2-100k", "qscale-2nodes"): 15.0,
    ("C1", "aer-1thread"): 5.7, ("C1", "aer-mps"): 0.01, ("C1", "qscale-2nodes"): 1.3,
    ("C2", "aer-mps"): 0.01, ("C2", "qscale-2nodes"): 13.0,
}


class BenchmarkError(RuntimeError):
    """A run whose result is wrong."""


# --------------------------------------------------------------------------------------------
# Workloads
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Spec:
    """One row of the table."""

    key: str  # "E1", "E2-100k", "C1" ...
    group: str  # what --only selects: E1, E2, C1, C2
    kind: str  # "su2": parameterised efficient_su2 with rows; "halves": two bound halves joined by CX
    num_qubits: int
    reps: int
    rows: int  # parameter rows (su2); 0 for the bound "halves" circuits
    num_observables: int
    configs: tuple[str, ...]
    reference: str
    tolerance: float
    repeat: int  # default repetitions
    cap: int = 0  # max_qubits_per_node of the qscale clusters (0: no cap)
    joins: int = 0  # CX between the halves

    @property
    def title(self) -> str:
        if self.kind == "su2":
            return (f"efficient_su2({self.num_qubits}, reps={self.reps}), {self.rows:,} rows x "
                    f"{self.num_observables} Paulis")
        return (f"{self.num_qubits}q = 2 x {self.num_qubits // 2}q halves + {self.joins} CX, "
                f"{self.num_observables} observables, nodes <= {self.cap}q")

    @property
    def short(self) -> str:
        if self.kind == "su2":
            return f"su2 {self.num_qubits}q {_k(self.rows)} rows x{self.num_observables}"
        return f"{self.num_qubits}q cut, nodes<={self.cap}q"


def _k(n: int) -> str:
    return f"{n // 1000}k" if n >= 1000 and n % 1000 == 0 else f"{n:,}"


def workload_specs(quick: bool, c2_cap: int | None = None) -> list[Spec]:
    e1 = ("aer-1thread", "qscale-1node", "qscale-2nodes")
    e2 = ("aer-1thread", "qscale-1node", "qscale-2nodes")
    c1 = ("aer-1thread", "aer-mps", "qscale-2nodes")
    c2 = ("aer-mps", "qscale-2nodes")
    if quick:
        e2_rows = (1_000, 2_000, 4_000)
        return [
            Spec("E1", "E1", "su2", 12, 2, 200, 20, e1, "aer-1thread", EXACT_TOLERANCE, 1),
            *(Spec(f"E2-{_k(r)}", "E2", "su2", 6, 2, r, 15, e2, "aer-1thread", EXACT_TOLERANCE, 1)
              for r in e2_rows),
            Spec("C1", "C1", "halves", 12, 2, 0, 5, c1, "aer-1thread", CUT_TOLERANCE, 1, cap=8, joins=2),
            Spec("C2", "C2", "halves", 16, 2, 0, 5, c2, "aer-mps", CUT_TOLERANCE, 1, cap=c2_cap or 10, joins=2),
        ]
    return [
        Spec("E1", "E1", "su2", 16, 2, 400, 50, e1, "aer-1thread", EXACT_TOLERANCE, 3),
        *(Spec(f"E2-{_k(r)}", "E2", "su2", 6, 2, r, 15, e2, "aer-1thread", EXACT_TOLERANCE, 1)
          for r in (25_000, 50_000, 100_000)),
        Spec("C1", "C1", "halves", 24, 2, 0, 5, c1, "aer-1thread", CUT_TOLERANCE, 3, cap=16, joins=2),
        Spec("C2", "C2", "halves", 40, 2, 0, 5, c2, "aer-mps", CUT_TOLERANCE, 1, cap=c2_cap or 24, joins=2),
    ]


@dataclass
class Workload:
    spec: Spec
    circuit: QuantumCircuit
    observables: Any  # what goes in the pub
    rows: np.ndarray | None
    observable_text: list[str]

    @property
    def pubs(self) -> list[tuple[Any, ...]]:
        if self.rows is None:
            return [(self.circuit, self.observables)]
        return [(self.circuit, self.observables, self.rows)]

    def describe(self) -> dict[str, Any]:
        s = self.spec
        return {
            "title": s.title, "group": s.group, "num_qubits": s.num_qubits, "reps": s.reps,
            "parameters": self.circuit.num_parameters, "rows": s.rows or None,
            "num_observables": s.num_observables, "observables": self.observable_text,
            "gates": {k: int(v) for k, v in self.circuit.count_ops().items()},
            "qscale_max_qubits_per_node": s.cap or None, "reference": s.reference,
            "tolerance": s.tolerance, "seeds": SEEDS,
        }


_SU2_CACHE: dict[tuple[int, int, int, int], tuple[Any, np.ndarray, list[str]]] = {}


def _su2_parts(num_qubits: int, reps: int, max_rows: int, num_observables: int
               ) -> tuple[Any, np.ndarray, list[str]]:
    """One circuit, one row array and one Pauli list per shape: E2's sizes share them (a size
    takes the first N rows)."""
    key = (num_qubits, reps, max_rows, num_observables)
    if key not in _SU2_CACHE:
        from qiskit.circuit.library import efficient_su2
        from qiskit.quantum_info import random_pauli_list

        circuit = efficient_su2(num_qubits, reps=reps)
        rng = np.random.default_rng(SEEDS["rows"])
        rows = rng.uniform(-np.pi, np.pi, size=(max_rows, circuit.num_parameters))
        labels = [p.to_label() for p in random_pauli_list(num_qubits, num_observables, seed=SEEDS["paulis"],
                                                           phase=False)]
        _SU2_CACHE[key] = (circuit, rows, labels)
    return _SU2_CACHE[key]


def halves_circuit(half: int, reps: int, joins: int, seed: int) -> QuantumCircuit:
    """Two ``half``-qubit ``efficient_su2``-like blocks (ry + rz on every qubit, then a CX ladder
    in each half, ``reps`` times, then a last ry + rz layer), joined by ``joins`` CX between the
    halves after the first ladder, parameters bound to uniform random angles."""
    from qiskit import QuantumCircuit

    n = 2 * half
    rng = np.random.default_rng(seed)
    qc = QuantumCircuit(n, name=f"halves_{n}")

    def rotations() -> None:
        for q in range(n):
            qc.ry(float(rng.uniform(-np.pi, np.pi)), q)
            qc.rz(float(rng.uniform(-np.pi, np.pi)), q)

    for rep in range(reps):
        rotations()
        for base in (0, half):
            for q in range(base, base + half - 1):
                qc.cx(q, q + 1)
        if rep == 0:
            for j in range(joins):
                qc.cx(half - 1 - j, half + j)
    rotations()
    return qc


def halves_observables(half: int, num_observables: int) -> tuple[list[Any], list[str]]:
    """Paulis near and across the join (their values are far from 0) and one weighted sum."""
    from qiskit.quantum_info import SparsePauliOp

    n = 2 * half
    rng = np.random.default_rng(SEEDS["extra_pauli"])
    # A weight-4 Pauli, two letters on each side.
    qubits = [int(q) for q in rng.choice(half, 2, replace=False)] + \
             [int(q) + half for q in rng.choice(half, 2, replace=False)]
    letters = "".join(str(x) for x in rng.choice(list("XYZ"), len(qubits)))
    terms = [
        ("ZZ", [half - 1, half], 1.0),
        ("XX", [half - 1, half], 1.0),
        ("Z", [0], 1.0),
        ("ZY", [half - 2, half + 1], 1.0),
        (letters, qubits, 1.0),
    ]
    observables: list[Any] = [SparsePauliOp.from_sparse_list([t], num_qubits=n) for t in terms[:4]]
    observables.append(SparsePauliOp.from_sparse_list(
        [(terms[0][0], terms[0][1], 0.5), (terms[1][0], terms[1][1], 0.25), (terms[2][0], terms[2][1], -0.3),
         (terms[4][0], terms[4][1], 0.2)], num_qubits=n))
    observables = observables[:num_observables]
    text = [" + ".join(f"{c.real:g}*{label}" for label, c in o.to_list()) for o in observables]
    return observables, text


def build_workload(spec: Spec, all_specs: Sequence[Spec]) -> Workload:
    if spec.kind == "su2":
        max_rows = max(s.rows for s in all_specs if s.kind == "su2" and s.num_qubits == spec.num_qubits
                       and s.reps == spec.reps and s.num_observables == spec.num_observables)
        circuit, rows, labels = _su2_parts(spec.num_qubits, spec.reps, max_rows, spec.num_observables)
        observables = [[label] for label in labels]  # shape (M, 1): broadcasts against rows (N, P)
        return Workload(spec, circuit, observables, rows[: spec.rows], labels)
    half = spec.num_qubits // 2
    circuit = halves_circuit(half, spec.reps, spec.joins, SEEDS["bound"])
    observables, text = halves_observables(half, spec.num_observables)
    return Workload(spec, circuit, observables, None, text)


# --------------------------------------------------------------------------------------------
# Cells
# --------------------------------------------------------------------------------------------


@dataclass
class Cell:
    workload: str
    config: str
    times: list[float] = field(default_factory=list)
    evs: np.ndarray | None = None  # the first repetition's values
    reps_identical: bool | None = None  # every repetition the same bits as the first
    max_abs_diff: float | None = None  # vs the workload's reference
    same_bits_as_reference: bool | None = None
    error: str | None = None
    notes: list[str] = field(default_factory=list)
    runs: list[dict[str, Any]] = field(default_factory=list)
    cutting: dict[str, Any] | None = None

    @property
    def median(self) -> float | None:
        return statistics.median(self.times) if self.times and not self.error else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "workload": self.workload, "config": self.config,
            "status": "error" if self.error else "ok" if self.times else "not run",
            "times_s": [round(t, 6) for t in self.times],
            "median_s": bench._round(self.median),
            "min_s": bench._round(min(self.times)) if self.times else None,
            "max_s": bench._round(max(self.times)) if self.times else None,
            "evs_shape": list(self.evs.shape) if self.evs is not None else None,
            "repetitions_same_bits": self.reps_identical,
            "max_abs_diff_vs_reference": self.max_abs_diff,
            "same_bits_as_reference": self.same_bits_as_reference,
            "cutting": self.cutting,
            "error": self.error, "notes": self.notes, "runs": self.runs or None,
        }


def _loadavg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def _cpu_times() -> tuple[int, int, int] | None:
    """(busy, steal, total) jiffies of the whole machine from /proc/stat; None elsewhere."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError, IndexError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    steal = fields[7] if len(fields) > 7 else 0
    total = sum(fields[:8])
    return total - idle - steal, steal, total


def _cpu_share(before: tuple[int, int, int] | None, after: tuple[int, int, int] | None) -> dict[str, float]:
    """The machine's CPU use between two readings, in % of all its cores: busy (any process,
    this one included) and steal (taken by the hypervisor)."""
    if before is None or after is None or after[2] <= before[2]:
        return {}
    total = after[2] - before[2]
    return {"busy_pct": round(100 * (after[0] - before[0]) / total, 1),
            "steal_pct": round(100 * (after[1] - before[1]) / total, 1)}


def _record_evs(cell: Cell, evs: np.ndarray) -> None:
    evs = np.asarray(evs, dtype=float)
    if not np.all(np.isfinite(evs)):
        raise BenchmarkError(f"{cell.config}: non-finite expectation values")
    if cell.evs is None:
        cell.evs = evs.copy()
        cell.reps_identical = True
    elif evs.shape != cell.evs.shape or not np.array_equal(evs, cell.evs):
        cell.reps_identical = False
        diff = float(np.max(np.abs(evs - cell.evs))) if evs.shape == cell.evs.shape else math.inf
        cell.notes.append(f"repetition {len(cell.times) + 1} differs from the first (max {diff:.3g})")


# --------------------------------------------------------------------------------------------
# Runners
# --------------------------------------------------------------------------------------------


def aer_estimator(config: str) -> Any:
    from qiskit_aer.primitives import EstimatorV2

    backend_options: dict[str, Any] = {"max_parallel_threads": 1}
    if config == "aer-mps":
        backend_options["method"] = "matrix_product_state"
    return EstimatorV2(options={"backend_options": backend_options})


def _tiny_pub(rows: int) -> tuple[Any, ...]:
    from qiskit import QuantumCircuit
    from qiskit.circuit import Parameter

    theta = Parameter("t")
    qc = QuantumCircuit(2, name="warmup")
    qc.ry(theta, 0)
    qc.cx(0, 1)
    return (qc, [["ZZ"], ["XI"]], np.linspace(0.1, 1.0, rows).reshape(rows, 1))


def run_aer_once(estimator: Any, workload: Workload, cell: Cell, log: Callable[[str], None]) -> float:
    load = _loadavg()
    start = time.perf_counter()
    result = estimator.run(workload.pubs).result()
    elapsed = time.perf_counter() - start
    _record_evs(cell, result[0].data.evs)
    cell.runs.append({"wall_s": round(elapsed, 6), "loadavg_before": load})
    return elapsed


def _busy(intervals: list[tuple[float, float]]) -> float:
    """Seconds covered by the union of the intervals."""
    total, end = 0.0, -math.inf
    for a, b in sorted(intervals):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def _breakdown(job_result: Any, submit_s: float, total_s: float) -> dict[str, Any]:
    """Where a qscale run's time went, from the job's record (coordinator clock). A node is
    handed its next shard before the current one ends (pipelining), so attempts overlap: a
    node's busy time is the union of its attempts' intervals, not their sum."""
    per_node: dict[str, list[tuple[float, float]]] = {}
    for a in job_result.attempts:
        per_node.setdefault(a.node_id, []).append((a.started_at, a.ended_at))
    failed = [a for a in job_result.attempts if a.outcome != "done"]
    coordinator = float(job_result.wall_time_s)
    created = job_result.status.created_at
    return {
        "wall_s": round(total_s, 6),
        "run_returned_s": round(submit_s, 6),  # client planning (+ cuts), QPY, Submit RPC
        "coordinator_job_s": round(coordinator, 6),  # job created -> finished, on the coordinator
        "node_busy_s": {k: round(_busy(v), 4) for k, v in sorted(per_node.items())},
        "client_rest_s": round(max(0.0, total_s - submit_s - coordinator), 6),  # result fetch + build
        "shards": job_result.status.shards_total,
        "attempts": len(job_result.attempts),
        "failed_attempts": len(failed),
        "nodes_used": len(job_result.nodes_used),
        "method": job_result.method,
        "first_failure": f"{failed[0].outcome}: {failed[0].error}" if failed else None,
        "attempt_intervals_s": [[a.shard_index, a.node_id[:8], round(a.started_at - created, 3),
                                 round(a.ended_at - created, 3), a.outcome] for a in job_result.attempts],
    }


def _fmt_breakdown(b: dict[str, Any]) -> str:
    busy = b["node_busy_s"]
    nodes = "/".join(f"{v:.2f}" for v in busy.values()) or "-"
    return (f"run() {b['run_returned_s']:.2f} s, coordinator job {b['coordinator_job_s']:.2f} s (nodes busy "
            f"{nodes} s; {b['shards']} shards, {b['attempts']} attempts), client after {b['client_rest_s']:.2f} s")


def run_qscale_once(estimator: Any, workload: Workload, cell: Cell, timeout: float, profile: bool,
                    log: Callable[[str], None]) -> float:
    load = _loadavg()
    profiler = cProfile.Profile() if profile else None
    if profiler is not None:
        profiler.enable()
    start = time.perf_counter()
    job = estimator.run(workload.pubs)
    submitted = time.perf_counter()
    result = job.result(timeout=timeout)
    elapsed = time.perf_counter() - start
    if profiler is not None:
        profiler.disable()
    _record_evs(cell, result[0].data.evs)
    # Untimed: the job's record, for the breakdown.
    detail = _breakdown(job.qscale_job.result(timeout=60), submitted - start, elapsed)
    detail["loadavg_before"] = load
    detail["job_id"] = job.job_id()
    cutting = result[0].metadata.get("cutting")
    if cutting is not None:
        detail["cutting"] = cutting
        cell.cutting = dict(cutting)
    elif workload.spec.kind == "halves":
        cell.notes.append("no cutting metadata: the circuit was not cut")
    if detail["failed_attempts"]:
        cell.notes.append(f"job {detail['job_id']}: {detail['failed_attempts']} of {detail['attempts']} shard "
                          f"attempts failed and were retried (first: {detail['first_failure']})")
    if profiler is not None:
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(25)
        detail["profile_top"] = text.getvalue()
        log(text.getvalue())
    cell.runs.append(detail)
    log(f"    {_fmt_breakdown(detail)}")
    return elapsed


def _timed_cell(spec: Spec, config: str, repeat: int, once: Callable[[Cell], float],
                log: Callable[[str], None]) -> Cell:
    cell = Cell(spec.key, config)
    try:
        for rep in range(repeat):
            before = _cpu_times()
            elapsed = once(cell)
            cpu = _cpu_share(before, _cpu_times())
            if cell.runs:
                cell.runs[-1]["machine_cpu"] = cpu
            cell.times.append(elapsed)
            log(f"  {spec.key} {config} rep {rep + 1}/{repeat}: {elapsed:.3f} s (load {_loadavg()[:1]}"
                + (f"; machine busy {cpu['busy_pct']:.0f}% of {os.cpu_count()} cores, steal {cpu['steal_pct']:.1f}%"
                   if cpu else "") + ")")
    except Exception as exc:  # recorded and reported loudly; the other cells still run
        cell.error = f"{type(exc).__name__}: {exc}"
        log(f"  [bold red]{spec.key} {config} ERROR[/]: {cell.error}")
    return cell


def _warm_cutting(log: Callable[[str], None]) -> None:
    """Import qscale.cutting (and the addon) and plan one tiny cut, outside any timed region."""
    t0 = time.perf_counter()
    try:
        from qscale.cutting import plan_cuts
    except ImportError as exc:
        log(f"  [yellow]qscale.cutting not importable ({exc}); the cut workloads will fail[/]")
        return
    plan_cuts(halves_circuit(3, 1, 1, 0), ["Z" * 6], 5)
    log(f"  qscale.cutting warmed up in {time.perf_counter() - t0:.1f} s (not timed)")


def _repeat_for(spec: Spec, args: argparse.Namespace) -> int:
    return args.repeat if args.repeat is not None else spec.repeat


def run_aer(config: str, workloads: list[Workload], args: argparse.Namespace,
            log: Callable[[str], None]) -> list[Cell]:
    estimator = aer_estimator(config)
    estimator.run([_tiny_pub(4)]).result()
    cells = []
    for wl in workloads:
        cells.append(_timed_cell(wl.spec, config, _repeat_for(wl.spec, args),
                                 lambda cell, wl=wl: run_aer_once(estimator, wl, cell, log), log))
    return cells


def run_cluster(nodes: int, cap: int, config: str, workloads: list[Workload], args: argparse.Namespace,
                log: Callable[[str], None]) -> list[Cell]:
    import qscale
    from qscale.local import LocalCluster

    cluster: LocalCluster = LocalCluster(nodes=nodes, cores_per_node=1, max_qubits_per_node=cap)
    cells: list[Cell] = []
    try:
        t0 = time.perf_counter()
        cluster.start()
        estimator = qscale.EstimatorV2(cluster.client)
        warm = estimator.run([_tiny_pub(8 * nodes)]).result()
        if warm[0].data.evs.shape != (2, 8 * nodes):
            raise BenchmarkError(f"warm-up job returned evs of shape {warm[0].data.evs.shape}")
        widest = [n.max_statevector_qubits for n in cluster.client.nodes()]
        log(f"  cluster of {nodes} node(s) (cap {cap or 'none'}; widest statevector per node {widest}) up and "
            f"warm in {time.perf_counter() - t0:.1f} s (not timed)")
        if any(wl.spec.kind == "halves" for wl in workloads):
            _warm_cutting(log)
        for wl in workloads:
            cells.append(_timed_cell(
                wl.spec, config, _repeat_for(wl.spec, args),
                lambda cell, wl=wl: run_qscale_once(estimator, wl, cell, args.job_timeout, args.profile, log), log))
    except Exception as exc:
        log(f"  [bold red]cluster of {nodes} node(s), cap {cap}: {type(exc).__name__}: {exc}[/]")
        done = {c.workload for c in cells}
        cells += [Cell(wl.spec.key, config, error=f"cluster: {type(exc).__name__}: {exc}")
                  for wl in workloads if wl.spec.key not in done]
    finally:
        cluster.stop()
    return cells


# --------------------------------------------------------------------------------------------
# Checks, targets, report
# --------------------------------------------------------------------------------------------


def verify(cells: dict[tuple[str, str], Cell], workloads: dict[str, Workload]) -> None:
    """Every cell against its workload's reference; qscale on 1 and on 2 nodes bit for bit."""
    for key, wl in workloads.items():
        ref = cells.get((key, wl.spec.reference))
        for config in wl.spec.configs:
            cell = cells.get((key, config))
            if cell is None or cell.error or cell.evs is None:
                continue
            if cell.reps_identical is False and config.startswith("qscale"):
                cell.error = "repetitions gave different bits (qscale promises the same bits)"
                continue
            if config == wl.spec.reference:
                continue
            if ref is None or ref.evs is None:
                cell.error = f"unverified: the reference {wl.spec.reference} " + \
                    (f"failed ({ref.error})" if ref is not None and ref.error else "was not run")
                continue
            if cell.evs.shape != ref.evs.shape:
                cell.error = f"evs shape {cell.evs.shape}, reference {ref.evs.shape}"
                continue
            cell.max_abs_diff = float(np.max(np.abs(cell.evs - ref.evs))) if cell.evs.size else 0.0
            cell.same_bits_as_reference = bool(np.array_equal(cell.evs, ref.evs))
            if cell.max_abs_diff > wl.spec.tolerance:
                cell.error = (f"evs differ from {wl.spec.reference} by up to {cell.max_abs_diff:.3g} "
                              f"(tolerance {wl.spec.tolerance:g})")
        one, two = cells.get((key, "qscale-1node")), cells.get((key, "qscale-2nodes"))
        if one is not None and two is not None and one.evs is not None and two.evs is not None \
                and not np.array_equal(one.evs, two.evs):
            two.error = two.error or "qscale-2nodes values are not the same bits as qscale-1node's"


@dataclass(frozen=True)
class Target:
    name: str
    workload: str
    expression: str
    op: str
    target: float
    value: Callable[[dict[tuple[str, str], Cell]], float | None]


def _median(cells: dict[tuple[str, str], Cell], key: str, config: str) -> float | None:
    cell = cells.get((key, config))
    return cell.median if cell is not None else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b <= 0 else a / b


def targets(workloads: dict[str, Workload]) -> list[Target]:
    out = [
        Target("overhead", "E1", "qscale-1node / aer-1thread", "<=", 1.10,
               lambda c: _ratio(_median(c, "E1", "qscale-1node"), _median(c, "E1", "aer-1thread"))),
        Target("scaling", "E1", "qscale-1node / qscale-2nodes", ">=", 1.85,
               lambda c: _ratio(_median(c, "E1", "qscale-1node"), _median(c, "E1", "qscale-2nodes"))),
    ]
    e2 = sorted((wl.spec for wl in workloads.values() if wl.spec.group == "E2"), key=lambda s: s.rows)
    if e2:
        big, small = e2[-1], e2[0]
        out.append(Target("time", big.key, "qscale-2nodes seconds", "<", 60.0,
                          lambda c, k=big.key: _median(c, k, "qscale-2nodes")))
        if len(e2) > 1:
            out.append(Target("linear in rows", "E2", f"s/row at {_k(big.rows)} / s/row at {_k(small.rows)} "
                              "(qscale-2nodes)", "<=", 1.10,
                              lambda c, b=big, s=small: _ratio(_ratio(_median(c, b.key, "qscale-2nodes"), b.rows),
                                                               _ratio(_median(c, s.key, "qscale-2nodes"), s.rows))))
        out.append(Target("vs aer", big.key, "aer-1thread / qscale-2nodes", ">=", 1.0,
                          lambda c, k=big.key: _ratio(_median(c, k, "aer-1thread"), _median(c, k, "qscale-2nodes"))))
    out.append(Target("time", "C2", "qscale-2nodes seconds", "<", 35.0, lambda c: _median(c, "C2", "qscale-2nodes")))
    return [t for t in out if t.workload in workloads or any(k.startswith(t.workload) for k in workloads)]


def evaluate(targets_: list[Target], cells: dict[tuple[str, str], Cell]) -> list[dict[str, Any]]:
    out = []
    for t in targets_:
        value = t.value(cells)
        status = "n/a" if value is None else \
            "PASS" if (value <= t.target if t.op == "<=" else value >= t.target if t.op == ">=" else value < t.target) \
            else "MISS"
        out.append({"name": t.name, "workload": t.workload, "expression": t.expression,
                    "target": f"{t.op} {t.target:g}", "value": bench._round(value, 4), "status": status})
    return out


def machine_info() -> dict[str, Any]:
    """bench.py's description of the machine and versions, plus the addon and the load."""
    info = bench.machine_info()
    try:
        info["qiskit_addon_cutting"] = metadata.version("qiskit-addon-cutting")
    except metadata.PackageNotFoundError:
        info["qiskit_addon_cutting"] = None
    info["loadavg_at_start"] = _loadavg()
    return info

def cell_text(cell: Cell | None) -> str:
    if cell is None:
        return "-"
    if cell.error:
        return "ERROR"
    if cell.median is None:
        return "-"
    text = bench._fmt_seconds(cell.median)
    if len(cell.times) > 1:
        text += f" ({bench._fmt_seconds(min(cell.times))}-{bench._fmt_seconds(max(cell.times))})"
    return text


def _fmt_diff(cell: Cell | None, reference: str) -> str:
    if cell is None or cell.config == reference:
        return ""
    if cell.same_bits_as_reference:
        return "same bits"
    return "-" if cell.max_abs_diff is None else f"{cell.max_abs_diff:.1e}"


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Benchmark qscale's EstimatorV2 (exact values, circuit cutting) against in-process qiskit-aer.")
    parser.add_argument("--only", type=bench._csv_choice(WORKLOADS), default=list(WORKLOADS),
                        help="workloads to run, e.g. E1,C2 (default: all)")
    parser.add_argument("--repeat", type=int, default=None,
                        help="repetitions per (workload, configuration); default 3 for E1 and C1, 1 for E2 and "
                             "C2, 1 for everything with --quick")
    parser.add_argument("--quick", action="store_true", help="smoke mode: small sizes, 1 repetition")
    parser.add_argument("--job-timeout", type=float, default=1800.0,
                        help="seconds to wait for one qscale job (default 1800)")
    parser.add_argument("--c2-cap", type=int, default=None,
                        help="max_qubits_per_node of C2's cluster (default 24; 10 with --quick)")
    parser.add_argument("--profile", action="store_true",
                        help="cProfile this process (client + embedded coordinator) over each qscale run")
    parser.add_argument("--output", type=Path, default=None, help="write every figure as JSON to this file")
    args = parser.parse_args(argv)
    if args.quick and args.repeat is None:
        args.repeat = 1
    if args.repeat is not None and args.repeat < 1:
        parser.error("--repeat must be >= 1")
    return args


@dataclass
class Run:
    """What :func:`run` measured: the workloads, their cells (checked), the targets evaluated."""

    workloads: dict[str, Workload]
    cells: dict[tuple[str, str], Cell]
    targets: list[dict[str, Any]]
    errors: list[str]
    wall_s: float


def run(args: argparse.Namespace, log: Callable[[str], None]) -> Run:
    """Generate the workloads of ``args.only``, time them (Aer first, then one cluster at a time),
    check every value and evaluate the targets. bench.py calls this too."""
    started = time.perf_counter()
    all_specs = workload_specs(args.quick, args.c2_cap)
    specs = [s for s in all_specs if s.group in args.only]
    t0 = time.perf_counter()
    workloads = {s.key: build_workload(s, all_specs) for s in specs}
    for key, wl in workloads.items():
        log(f"  {key}: {wl.spec.title} ({wl.circuit.num_parameters} parameters, {wl.circuit.size()} gates)")
    log(f"workloads generated in {time.perf_counter() - t0:.1f} s (not timed)")

    cells: dict[tuple[str, str], Cell] = {}
    # Aer first (no cluster alive), then one cluster at a time.
    for config in ("aer-1thread", "aer-mps"):
        chosen = [wl for wl in workloads.values() if config in wl.spec.configs]
        if chosen:
            log(f"[bold cyan]{config}[/]")
            for cell in run_aer(config, chosen, args, log):
                cells[(cell.workload, cell.config)] = cell
    for (nodes, cap), keys in sorted(_clusters(specs).items()):
        config = "qscale-1node" if nodes == 1 else "qscale-2nodes"
        log(f"[bold cyan]{config}[/]" + (f" (max_qubits_per_node={cap})" if cap else ""))
        for cell in run_cluster(nodes, cap, config, [workloads[k] for k in keys], args, log):
            cells[(cell.workload, cell.config)] = cell

    verify(cells, workloads)
    results = evaluate(targets(workloads), cells)
    errors = [f"{c.workload} {c.config}: {c.error}" for c in cells.values() if c.error]
    return Run(workloads, cells, results, errors, time.perf_counter() - started)


def _clusters(specs: Iterable[Spec]) -> dict[tuple[int, int], list[str]]:
    """The clusters the workloads need: (nodes, qubit cap) -> the keys of the workloads run on it."""
    clusters: dict[tuple[int, int], list[str]] = {}
    for spec in specs:
        for config in spec.configs:
            if config.startswith("qscale"):
                clusters.setdefault((1 if config == "qscale-1node" else 2, spec.cap), []).append(spec.key)
    return clusters


def estimate_seconds(args: argparse.Namespace) -> tuple[float, list[str]]:
    """Roughly how long :func:`run` takes with ``args`` on the reference machine (full sizes), and
    the cells it has no figure for."""
    specs = [s for s in workload_specs(args.quick, args.c2_cap) if s.group in args.only]
    seconds, unknown = bench.estimate_seconds(
        REFERENCE_SECONDS, [(s.key, c, _repeat_for(s, args)) for s in specs for c in s.configs])
    return seconds + bench.CLUSTER_START_S * len(_clusters(specs)), unknown


def print_report(console: Any, result: Run, quick: bool) -> None:
    """The tables (times, E2 per rows, cutting), notes, breakdowns and targets on ``console``."""
    from rich.table import Table

    log = console.print
    workloads, cells = result.workloads, result.cells
    table = Table(title="Wall seconds, median (min-max) of the repetitions; max |evs - reference|"
                        + (" [quick mode]" if quick else ""))
    table.add_column("Workload", no_wrap=True)
    for config in CONFIGS:
        table.add_column(config, justify="right", no_wrap=True)
    table.add_column("reference", justify="left", no_wrap=True)
    table.add_column("max |diff| (qscale)", justify="right", no_wrap=True)
    for key, wl in workloads.items():
        row = []
        for config in CONFIGS:
            cell = cells.get((key, config))
            text = cell_text(cell) if config in wl.spec.configs else "n/a"
            row.append(f"[bold red]{text}[/]" if cell is not None and cell.error else text)
        diffs = [_fmt_diff(cells.get((key, c)), wl.spec.reference) for c in wl.spec.configs if c.startswith("qscale")]
        table.add_row(f"{key} {wl.spec.short}", *row, wl.spec.reference, " / ".join(d for d in diffs if d))
    console.print(table)

    e2 = [wl for wl in workloads.values() if wl.spec.group == "E2"]
    if e2:
        et = Table(title="E2: seconds per 10,000 parameter rows")
        et.add_column("rows", justify="right")
        for config in e2[0].spec.configs:
            et.add_column(config, justify="right")
        for wl in e2:
            values = []
            for config in wl.spec.configs:
                m = _median(cells, wl.spec.key, config)
                values.append("-" if m is None else f"{m * 10_000 / wl.spec.rows:.2f}")
            et.add_row(f"{wl.spec.rows:,}", *values)
        console.print(et)

    cut_cells = [(key, c) for key, wl in workloads.items() for c in [cells.get((key, "qscale-2nodes"))]
                 if wl.spec.kind == "halves" and c is not None]
    if cut_cells:
        ct = Table(title="Circuit cutting (qscale-2nodes, from result[0].metadata['cutting'])")
        for name in ("Workload", "qubits", "node cap", "cuts (gate+wire)", "subexperiments (generated)",
                     "QPD terms", "sampling overhead", "widths", "seconds", "max |diff|", "reference"):
            ct.add_column(name, justify="left" if name in ("Workload", "reference", "widths") else "right")
        for key, cell in cut_cells:
            wl = workloads[key]
            m = dict(cell.cutting or {})
            for new_key, old_key in (("cuts", "num_cuts"), ("subexperiments", "num_subexperiments"),
                                     ("terms", "num_terms")):
                m.setdefault(new_key, m.get(old_key, "-"))
            ct.add_row(key, str(wl.spec.num_qubits), str(wl.spec.cap),
                       f"{m['cuts']} ({m.get('gate_cuts', '-')}+{m.get('wire_cuts', '-')})",
                       f"{m['subexperiments']} ({m.get('generated_subexperiments', '-')})",
                       str(m["terms"]), f"{m.get('sampling_overhead', float('nan')):g}",
                       str(m.get("subcircuit_widths", "-")), cell_text(cell),
                       "-" if cell.max_abs_diff is None else f"{cell.max_abs_diff:.1e}", wl.spec.reference)
        console.print(ct)

    for (key, config), cell in cells.items():
        if config.startswith("aer") and config != workloads[key].spec.reference and cell.max_abs_diff is not None:
            log(f"  {key}: {config} vs {workloads[key].spec.reference} (cross-check of the reference): max |diff| "
                f"{cell.max_abs_diff:.1e}")
    for cell in cells.values():
        for note in cell.notes:
            log(f"  ~ {cell.workload} {cell.config}: {note}")
        if cell.runs and cell.config.startswith("qscale"):
            b = cell.runs[len(cell.runs) // 2]
            log(f"  breakdown {cell.workload} {cell.config} (run {len(cell.runs) // 2 + 1}): {_fmt_breakdown(b)}")

    if result.targets:
        rt = Table(title="Estimator targets" + (" (quick mode: small sizes, figures not meaningful)" if quick else ""))
        for name in ("Target", "Workload", "Expression", "Value", "Goal", "Result"):
            rt.add_column(name, justify="right" if name == "Value" else "left")
        for r in result.targets:
            colour = {"PASS": "green", "MISS": "red"}.get(r["status"], "yellow")
            value = "n/a" if r["value"] is None else f"{r['value']:.3f}"
            rt.add_row(r["name"], r["workload"], r["expression"], value, r["target"], f"[{colour}]{r['status']}[/]")
        console.print(rt)


def report(result: Run, args: argparse.Namespace, machine: dict[str, Any]) -> dict[str, Any]:
    """Everything as a JSON-ready dict (what ``--output`` writes)."""
    return {
        "benchmark": "qscale-estimator", "quick": args.quick, "repeat": args.repeat,
        "machine": machine, "loadavg_at_end": _loadavg(),
        "workloads": {k: wl.describe() for k, wl in result.workloads.items()},
        "cells": [c.to_dict() for c in result.cells.values()],
        "targets": result.targets, "errors": result.errors,
        "total_wall_s": round(result.wall_s, 3),
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from rich.console import Console

    console = Console(width=None if sys.stdout.isatty() else 180)
    log = console.print
    machine = machine_info()
    log(f"[bold]qscale estimator benchmark[/] ({'quick smoke mode' if args.quick else 'full'}; repeat "
        f"{args.repeat if args.repeat is not None else 'E1/C1 3, E2/C2 1'})")
    log(f"{machine['cpu_model']}, {machine['cores']} cores, {machine['memory_gib']} GiB; Python {machine['python']}, "
        f"qiskit {machine['qiskit']}, qiskit-aer {machine['qiskit_aer']}, qiskit-addon-cutting "
        f"{machine['qiskit_addon_cutting']}, qscale {machine['qscale']} ({machine['git_commit']}); load average "
        f"{machine['loadavg_at_start']}")
    result = run(args, log)
    print_report(console, result, args.quick)
    log(f"load average at the end: {_loadavg()} (at the start: {machine['loadavg_at_start']}); "
        f"{result.wall_s:.1f} s in all")
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(report(result, args, machine), indent=2) + "\n", encoding="utf-8")
        log(f"results: {args.output}")
    if result.errors:
        console.print("[bold red]ERRORS[/] (a wrong or failed run):")
        for e in result.errors:
            console.print(f"  [red]{e}[/]")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
