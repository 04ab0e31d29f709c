"""qscale benchmark: the project's workloads through qscale, in-process qiskit-aer and a
multiprocessing pool of Qiskit BasicSimulator processes; and, delegated to estimator.py, the
estimator workloads.

What is measured
----------------
Wall-clock seconds, end to end, to get the counts of a whole workload (every circuit, every shot):

* W1  ``examples/hadamard24.qasm`` (24 qubits, H on each, all measured), 10 copies x 1,000 shots;
* W2  200 random 12-qubit depth-10 circuits x 1,000 shots;
* W3  one random 20-qubit depth-20 circuit x 100,000 shots;
* W4  one random 12-qubit depth-10 circuit with a depolarising noise model, 20,000 shots;
* W5  8 random 22-qubit depth-20 circuits x 1,000 shots;
* W6  10,000 one-qubit circuits (``rx(theta_i)`` + measure) x 10 shots (pure overhead);
* W7  one 20-qubit circuit, H on every qubit, all measured, 1,000,000 shots: ~645,000 distinct
      outcomes (2^20 equally likely), so the cost is the counts (building, shipping, merging them).

``--quick`` shrinks them (W7: 16 qubits x 100,000 shots, ~51,000 outcomes) for a smoke run.

``--only E1,E2,C1,C2`` (or ``all``) also runs benchmarks/estimator.py's workloads (EstimatorV2 exact
expectation values, E1/E2, and circuit cutting, C1/C2; see its docstring for what each measures)
through estimator.py's own code, configurations, checks and targets (``estimator.run``,
``print_report``, ``report``): their tables and target ratios are printed after the W ones.
``--repeat``, ``--quick``, ``--job-timeout``, ``--c2-cap`` and ``--profile`` are passed on;
``--configs`` applies to the W workloads only.

Configurations
--------------
* ``qscale-1node``       ``LocalCluster(nodes=1, cores_per_node=1)``; the timed region is
                         ``cluster.client.submit(circuits, ...).result().counts`` (QPY encoding,
                         gRPC, planning, simulation on the node, merging, fetching the outcomes,
                         formatting them as bitstrings);
* ``qscale-2nodes``      the same with ``LocalCluster(nodes=2, cores_per_node=1)``;
* ``qscale-1node-all``   the same with ``LocalCluster(nodes=1, slots_per_node=1, cores_per_node=<all
                         the cores this process may use>)``: one node whose single slot (one
                         simulation at a time) runs Aer with all the cores, to compare with
                         ``aer-default``;
* ``qscale-2nodes-raw``  as ``qscale-2nodes``, but submitting the circuits AS BUILT (untranspiled,
                         with the gates Aer lacks): the nodes transpile what Aer needs (their
                         worker: ``optimization_level=0``, only circuits with a gate Aer does not
                         know), inside the timed region;
* ``aer-1thread``        ``AerSimulator().run(circuits, max_parallel_threads=1).result()
                         .get_counts()`` in this process;
* ``aer-default``        ``AerSimulator().run(circuits).result().get_counts()`` in this process,
                         Aer's defaults (all cores);
* ``aer-default-transpile``  ``transpile(circuits as built, simulator, seed_transpiler=0)`` then
                         ``simulator.run(...).result().get_counts()``, both timed, in this process,
                         Aer's and Qiskit's defaults (``optimization_level`` 2, Qiskit's default;
                         ``--aer-transpile-level 0`` does the same transpiling work as the nodes);
                         the transpile / run split is printed and in the JSON;
* ``pool-basic``         ``multiprocessing.Pool(os.cpu_count())`` of Qiskit ``BasicSimulator``
                         processes: each worker runs ``BasicSimulator().run(circuit, shots=...)`` on
                         one circuit at a time (``pool.map`` over the circuits).

Each workload runs its own list of configurations unless ``--configs`` names some (then those run
on every chosen W workload): ``qscale-1node``, ``qscale-2nodes``, ``aer-1thread`` and
``aer-default`` everywhere; ``qscale-1node-all`` on W1, W2, W3, W6 and W7 (on W4 and W5 it would add
~3 minutes that no target needs); ``pool-basic`` on W1 only (on W5 alone it takes ~8 minutes);
``qscale-2nodes-raw`` and ``aer-default-transpile`` on W2 only.

Fairness
--------
* Every configuration gets the very same circuit objects, shots and simulator seeds. Circuits are
  generated (``random_circuit(..., measure=True, seed=...)`` with fixed seeds) before anything is
  timed. ``random_circuit`` emits gates Aer does not know (``iswap``, ``xx_plus_yy``, ``rccx`` ...);
  those circuits are transpiled ONCE, up front, to ``AerSimulator``'s target with
  ``optimization_level=0``, and every configuration receives the transpiled circuits, except the
  two "as built" ones (``qscale-2nodes-raw``, ``aer-default-transpile``), which receive the
  circuits as generated and include, each, the transpiling its side needs in the timed region.
* Every timed region ends with the counts of every circuit as ``{bitstring: count}`` dicts:
  qscale's ``result().counts`` (its result holds the outcomes packed and formats the bitstrings
  on first use: that is timed), Aer's ``result.get_counts()``, the pool workers' ``get_counts()``.
  With W7's ~645,000 outcomes this formatting takes seconds on either side.
* A cluster is started once per cluster configuration, warmed up with a tiny job, and kept running
  for all its workloads and repetitions; its start-up is not timed. Only one cluster is alive at a
  time, and none while Aer or the pool is timed (the configurations run one after the other).
* Aer runs in this process (no subprocess, no serialisation); its simulator is built and warmed up
  (and, for ``aer-default-transpile``, the transpiler too, on a tiny circuit) before timing. The
  pool is created (``spawn`` context: this process has run gRPC threads) and warmed up before
  timing, and closed afterwards.
* Every result is checked: the counts of every circuit must add up to its shots. A qscale result
  whose totals are off is reported as an error and the script exits with status 1.

BasicSimulator is slow, holds at most 24 qubits (statevector) and has no noise models (W4: n/a).
With ``--pool-budget`` seconds per timed pool run, it runs only the first k circuits (a multiple of
the pool's size, chosen after timing one circuit) and scales the time linearly to the whole
workload; such figures are marked as extrapolated (``~`` in the tables, ``"extrapolated": true`` in
the JSON). A one-circuit workload always runs whole (its cost is the statevector, not the shots).

Targets
-------
Ratios of medians (``--repeat``, default 3; a ratio from fewer than 3 runs on a side is flagged
as indicative only), each printed with its target and PASS/MISS:

* overhead, all cores:  W3 and W7 ``qscale-1node-all / aer-default`` <= 1.10 and <= 1.25;
* overhead, one thread: W2 ``qscale-1node / aer-1thread`` <= 1.10, W3 <= 1.05;
* scaling:              W2 and W5 ``qscale-1node / qscale-2nodes`` >= 1.85;
* vs Aer, each transpiling: W2 ``qscale-2nodes-raw / aer-default-transpile`` <= 0.70 (two
  one-thread nodes, the nodes transpiling, vs Aer with all cores after ``transpile()``);
* throughput:           W6 circuits / ``qscale-2nodes`` seconds >= 5,000 circuits/s;
* vs the BasicSimulator pool: W1 ``pool-basic / qscale-2nodes`` >= 100.

Usage::

    python benchmarks/bench.py                      # W1-W7, 3 repetitions (~25 minutes on 2 cores)
    python benchmarks/bench.py --only E1,E2,C1,C2   # the estimator workloads (~12 minutes on 2 cores)
    python benchmarks/bench.py --quick              # smoke mode: small workloads, 1 repetition
    python benchmarks/bench.py --only W2,W5 --configs qscale-1node,aer-1thread --repeat 5
    python benchmarks/bench.py --only W4,W5 --configs qscale-1node-all,aer-default

A full run prints an estimated duration first (from the figures of a 2-core Xeon, in
``REFERENCE_SECONDS``; not in quick mode) and the time it took at the end.

Results: a table of medians and the target ratios on the console; everything (machine, versions,
every repetition) as JSON plus the Markdown table, in ``--output``: a directory (``results.json``,
``results.md`` and, with estimator workloads, ``estimator-results.json`` in it, so ``--output
benchmarks`` updates the tracked files) or a ``.json`` file (the others beside it). Without
``--output`` they go to a new directory under the system's temporary directory (printed at the
end): a run writes nothing inside the checkout unless told to.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib
import json
import math
import multiprocessing
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from multiprocessing.pool import Pool

    from qiskit import QuantumCircuit
    from qiskit_aer.noise import NoiseModel

    from qscale.local import LocalCluster

REPO_ROOT = Path(__file__).resolve().parent.parent
HADAMARD_QASM = REPO_ROOT / "examples" / "hadamard24.qasm"

CONFIGS: tuple[str, ...] = ("qscale-1node", "qscale-2nodes", "qscale-1node-all", "qscale-2nodes-raw",
                            "aer-1thread", "aer-default", "aer-default-transpile", "pool-basic")
WORKLOADS: tuple[str, ...] = ("W1", "W2", "W3", "W4", "W5", "W6", "W7")
# The configurations a workload runs unless --configs names others (so that a full run fits in
# ~30 minutes on 2 cores): pool-basic takes minutes beyond W1; qscale-1node-all would add ~3
# minutes on W4 and W5, where no target needs it; the two "as built" configurations are W2's
# comparison of the whole user path.
BASE_CONFIGS: tuple[str, ...] = ("qscale-1node", "qscale-2nodes", "aer-1thread", "aer-default")
EXTRA_CONFIGS: dict[str, tuple[str, ...]] = {
    "W1": ("qscale-1node-all", "pool-basic"),
    "W2": ("qscale-1node-all", "qscale-2nodes-raw", "aer-default-transpile"),
    "W3": ("qscale-1node-all",),
    "W6": ("qscale-1node-all",),
    "W7": ("qscale-1node-all",),
}
# Configurations that take the circuits as built (untranspiled): qscale's nodes transpile what Aer
# needs; aer-default-transpile runs ``transpile(circuits, simulator)`` inside its timed region.
AS_BUILT = frozenset({"qscale-2nodes-raw", "aer-default-transpile"})

BASIC_MAX_QUBITS = 24  # BasicSimulator.MAX_QUBITS_STATEVECTOR (qiskit 2.x)
NOISE_1Q = 0.001
NOISE_2Q = 0.01
NOISE_MULTI = 0.01  # 3-qubit gates random_circuit emits (ccx, ccz, cswap): same rate as 2-qubit gates
CIRCUIT_SEED_BASE = {"W2": 20_000, "W3": 30_000, "W4": 40_000, "W5": 50_000}
SIM_SEED = {"W1": 101, "W2": 102, "W3": 103, "W4": 104, "W5": 105, "W6": 106, "W7": 107}
_NON_GATES = frozenset({"measure", "barrier", "reset", "delay"})


class BenchmarkError(RuntimeError):
    """A run whose result is wrong (shots missing, a circuit lost)."""


# --------------------------------------------------------------------------------------------
# Workloads
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkloadSpec:
    """The shape of one workload."""

    key: str
    kind: str  # "hadamard", "random", "oneq"
    num_qubits: int
    depth: int
    num_circuits: int
    shots: int
    noisy: bool = False

    @property
    def configs(self) -> tuple[str, ...]:
        """The configurations this workload runs by default, in the order of ``CONFIGS``."""
        mine = set(BASE_CONFIGS + EXTRA_CONFIGS.get(self.key, ()))
        return tuple(c for c in CONFIGS if c in mine)

    @property
    def title(self) -> str:
        noise = ", depolarising noise" if self.noisy else ""
        if self.kind == "hadamard":
            shape = f"{self.num_qubits}q all-H"
        elif self.kind == "oneq":
            shape = "1q rx+measure"
        else:
            shape = f"random {self.num_qubits}q d{self.depth}"
        return f"{self.num_circuits:,} x {shape} x {self.shots:,} shots{noise}"

    @property
    def short(self) -> str:
        """A compact label for the console table."""
        shape = {"hadamard": f"{self.num_qubits}q all-H", "oneq": "1q"}.get(
            self.kind, f"{self.num_qubits}q d{self.depth}")
        shots = f"{self.shots // 1000}k" if self.shots >= 1000 and self.shots % 1000 == 0 else str(self.shots)
        return f"{self.num_circuits:,}x {shape} x{shots}" + (" noisy" if self.noisy else "")


def workload_specs(quick: bool) -> dict[str, WorkloadSpec]:
    """The workloads; ``quick`` shrinks them for a smoke run."""
    if quick:
        specs = [
            WorkloadSpec("W1", "hadamard", 16, 1, 10, 1_000),
            WorkloadSpec("W2", "random", 12, 10, 20, 1_000),
            WorkloadSpec("W3", "random", 14, 20, 1, 10_000),
            WorkloadSpec("W4", "random", 8, 10, 1, 2_000, noisy=True),
            WorkloadSpec("W5", "random", 14, 20, 2, 1_000),
            WorkloadSpec("W6", "oneq", 1, 1, 500, 10),
            WorkloadSpec("W7", "hadamard", 16, 1, 1, 100_000),  # ~51,000 distinct outcomes
        ]
    else:
        specs = [
            WorkloadSpec("W1", "hadamard", 24, 1, 10, 1_000),
            WorkloadSpec("W2", "random", 12, 10, 200, 1_000),
            WorkloadSpec("W3", "random", 20, 20, 1, 100_000),
            WorkloadSpec("W4", "random", 12, 10, 1, 20_000, noisy=True),
            WorkloadSpec("W5", "random", 22, 20, 8, 1_000),
            WorkloadSpec("W6", "oneq", 1, 1, 10_000, 10),
            WorkloadSpec("W7", "hadamard", 20, 1, 1, 1_000_000),  # ~645,000 distinct outcomes
        ]
    return {s.key: s for s in specs}


@dataclass
class Workload:
    """Generated circuits (identical for every configuration) and how to run them."""

    spec: WorkloadSpec
    circuits: list[QuantumCircuit]  # transpiled up front where Aer rejects a gate
    raw_circuits: list[QuantumCircuit]  # as built (the AS_BUILT configurations)
    seed: int
    noise_model: NoiseModel | None = None
    noise_info: dict[str, Any] | None = None
    rejected_gates: list[str] = field(default_factory=list)
    transpiled: int = 0

    @property
    def shots(self) -> int:
        return self.spec.shots

    @property
    def total_shots(self) -> int:
        return self.spec.shots * len(self.circuits)

    @property
    def max_qubits(self) -> int:
        return max(c.num_qubits for c in self.circuits)

    def describe(self) -> dict[str, Any]:
        return {
            "title": self.spec.title,
            "kind": self.spec.kind,
            "num_circuits": len(self.circuits),
            "num_qubits": self.spec.num_qubits,
            "depth": self.spec.depth if self.spec.kind == "random" else None,
            "shots_per_circuit": self.shots,
            "total_shots": self.total_shots,
            "simulator_seed": self.seed,
            "circuit_seeds": (f"{CIRCUIT_SEED_BASE[self.spec.key]} + i" if self.spec.kind == "random" else None),
            "gates_aer_rejected": self.rejected_gates,
            "circuits_transpiled_for_aer": self.transpiled,
            "noise": self.noise_info,
        }


def _hadamard_circuit(num_qubits: int) -> QuantumCircuit:
    """H on every qubit, all measured: ``examples/hadamard24.qasm`` itself for 24 qubits, the same
    shape otherwise."""
    from qiskit import QuantumCircuit, qasm2

    if num_qubits == 24 and HADAMARD_QASM.exists():
        circuit = qasm2.load(str(HADAMARD_QASM))
        if circuit.num_qubits != 24:
            raise BenchmarkError(f"{HADAMARD_QASM} has {circuit.num_qubits} qubits, expected 24")
        circuit.name = HADAMARD_QASM.stem
        return circuit
    circuit = QuantumCircuit(num_qubits, num_qubits, name=f"hadamard{num_qubits}")
    circuit.h(range(num_qubits))
    circuit.measure(range(num_qubits), range(num_qubits))
    return circuit


def _noise_model(circuit: QuantumCircuit) -> tuple[NoiseModel, dict[str, Any]]:
    """Depolarising error on every gate name the circuit uses: 0.001 on 1-qubit gates, 0.01 on
    2-qubit gates (and on the few 3-qubit gates random circuits contain)."""
    from qiskit_aer.noise import NoiseModel, depolarizing_error

    arity: dict[str, int] = {}
    for instruction in circuit.data:
        name = instruction.operation.name
        if name not in _NON_GATES:
            arity.setdefault(name, instruction.operation.num_qubits)
    model = NoiseModel()
    by_width: dict[int, list[str]] = {}
    for name, width in sorted(arity.items()):
        by_width.setdefault(width, []).append(name)
    for width, names in by_width.items():
        p = NOISE_1Q if width == 1 else NOISE_2Q if width == 2 else NOISE_MULTI
        model.add_all_qubit_quantum_error(depolarizing_error(p, width), names)
    info = {
        "type": "depolarizing",
        "p_1q": NOISE_1Q,
        "p_2q": NOISE_2Q,
        "p_3q_plus": NOISE_MULTI,
        "gates": {f"{w}q": names for w, names in sorted(by_width.items())},
    }
    return model, info


def build_workload(spec: WorkloadSpec, aer_supported: frozenset[str]) -> Workload:
    """Generate the circuits of a workload (not timed); transpile for Aer only where needed."""
    import numpy as np
    from qiskit import QuantumCircuit, transpile
    from qiskit.circuit.random import random_circuit
    from qiskit_aer import AerSimulator

    circuits: list[QuantumCircuit]
    if spec.kind == "hadamard":
        base = _hadamard_circuit(spec.num_qubits)
        circuits = [base.copy(name=f"{base.name or 'hadamard'}_{i}") for i in range(spec.num_circuits)]
    elif spec.kind == "oneq":
        circuits = []
        for i, theta in enumerate(np.linspace(0.0, np.pi, spec.num_circuits)):
            c = QuantumCircuit(1, 1, name=f"rx_{i}")
            c.rx(float(theta), 0)
            c.measure(0, 0)
            circuits.append(c)
    else:
        base_seed = CIRCUIT_SEED_BASE[spec.key]
        circuits = []
        for i in range(spec.num_circuits):
            c = random_circuit(spec.num_qubits, spec.depth, measure=True, seed=base_seed + i)
            c.name = f"{spec.key.lower()}_{i}"
            circuits.append(c)

    raw = list(circuits)
    rejected: set[str] = set()
    needs = []
    for i, c in enumerate(circuits):
        unknown = set(c.count_ops()) - aer_supported
        if unknown:
            rejected |= unknown
            needs.append(i)
    if needs:
        sim = AerSimulator()
        done = transpile([circuits[i] for i in needs], backend=sim, optimization_level=0, seed_transpiler=0)
        for i, c in zip(needs, done if isinstance(done, list) else [done]):
            c.name = circuits[i].name
            circuits[i] = c
    workload = Workload(spec, circuits, raw, SIM_SEED[spec.key], rejected_gates=sorted(rejected),
                        transpiled=len(needs))
    if spec.noisy:
        workload.noise_model, workload.noise_info = _noise_model(circuits[0])
    return workload


# --------------------------------------------------------------------------------------------
# Cells: one (workload, configuration) with its repetitions
# --------------------------------------------------------------------------------------------


@dataclass
class Cell:
    workload: str
    config: str
    times: list[float] = field(default_factory=list)  # seconds, extrapolated to the whole workload
    raw_times: list[float] = field(default_factory=list)  # seconds actually measured
    extrapolated: bool = False
    measured_circuits: int | None = None
    total_circuits: int | None = None
    na_reason: str | None = None
    error: str | None = None
    notes: list[str] = field(default_factory=list)
    runs: list[dict[str, Any]] = field(default_factory=list)  # per repetition: qscale job details

    @property
    def status(self) -> str:
        if self.error:
            return "error"
        if self.na_reason:
            return "n/a"
        return "ok" if self.times else "not run"

    @property
    def median(self) -> float | None:
        return statistics.median(self.times) if self.times and not self.error else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "workload": self.workload,
            "config": self.config,
            "status": self.status,
            "times_s": [round(t, 6) for t in self.times],
            "median_s": _round(self.median),
            "min_s": _round(min(self.times)) if self.times else None,
            "max_s": _round(max(self.times)) if self.times else None,
            "extrapolated": self.extrapolated,
            "measured_times_s": [round(t, 6) for t in self.raw_times] if self.extrapolated else None,
            "measured_circuits": self.measured_circuits,
            "total_circuits": self.total_circuits,
            "na_reason": self.na_reason,
            "error": self.error,
            "notes": self.notes,
            "runs": self.runs or None,
        }


def _round(x: float | None, digits: int = 6) -> float | None:
    return None if x is None else round(x, digits)


def _check_counts(label: str, counts_per_circuit: Sequence[dict[str, int]], workload: Workload) -> None:
    if len(counts_per_circuit) != len(workload.circuits):
        raise BenchmarkError(f"{label}: {len(counts_per_circuit)} results for {len(workload.circuits)} circuits")
    for i, counts in enumerate(counts_per_circuit):
        total = sum(counts.values())
        if total != workload.shots:
            raise BenchmarkError(f"{label}: circuit {i} has {total} shots in its counts, asked {workload.shots}")


# --------------------------------------------------------------------------------------------
# Runners
# --------------------------------------------------------------------------------------------


def run_qscale_once(cluster: LocalCluster, workload: Workload, job_timeout: float, cell: Cell,
                    as_built: bool = False) -> float:
    """One timed submit + result + counts on a running cluster (of the circuits as built if ``as_built``,
    else of the ones transpiled up front); checks every total and records the job's shards, nodes
    and failed attempts in ``cell.runs`` (and a note if any attempt failed)."""
    circuits = workload.raw_circuits if as_built else workload.circuits
    start = time.perf_counter()
    job = cluster.client.submit(circuits, shots=workload.shots, seed=workload.seed,
                                noise_model=workload.noise_model)
    result = job.result(timeout=job_timeout)
    counts = result.counts  # {bitstring: count} per circuit: formatted on first use, so timed here
    elapsed = time.perf_counter() - start
    label = f"qscale job {job.job_id}"
    failed = [a for a in result.attempts if a.outcome != "done"]
    cell.runs.append({"job_id": job.job_id, "shards": result.status.shards_total, "attempts": len(result.attempts),
                      "failed_attempts": len(failed), "nodes_used": len(result.nodes_used),
                      "method": result.method, "coordinator_wall_s": round(result.wall_time_s, 6)})
    if failed:
        cell.notes.append(f"job {job.job_id}: {len(failed)} of {len(result.attempts)} shard attempts did not "
                          f"succeed and were retried (first: {failed[0].outcome}: {failed[0].error})")
    if result.shots != workload.total_shots:
        raise BenchmarkError(f"{label}: returned {result.shots:,} shots in total, asked {workload.total_shots:,}")
    if result.status.shots_done != workload.total_shots:
        raise BenchmarkError(f"{label}: status says {result.status.shots_done:,} shots done, "
                             f"asked {workload.total_shots:,}")
    for r in result.results:
        if r.shots != workload.shots:
            raise BenchmarkError(f"{label}: circuit {r.index} reports {r.shots} shots, asked {workload.shots}")
    _check_counts(label, counts, workload)
    return elapsed


def run_aer_once(simulator: Any, workload: Workload, threads: int | None, cell: Cell,
                 transpile_options: dict[str, Any] | None = None) -> float:
    """One timed in-process Aer run, up to the counts as bitstring dicts (``get_counts()``, what
    qscale's result holds); checks every total. With ``transpile_options`` the timed region starts
    with ``transpile(circuits as built, simulator, **transpile_options)``, and the split between
    transpiling and the rest goes in ``cell.runs``."""
    from qiskit import transpile

    options: dict[str, Any] = {"shots": workload.shots, "seed_simulator": workload.seed}
    if threads is not None:
        options["max_parallel_threads"] = threads
    if workload.noise_model is not None:
        options["noise_model"] = workload.noise_model
    start = time.perf_counter()
    circuits = workload.circuits
    if transpile_options is not None:
        circuits = transpile(workload.raw_circuits, simulator, **transpile_options)
    transpiled = time.perf_counter()
    result = simulator.run(circuits, **options).result()
    counts = result.get_counts() if result.success else None
    elapsed = time.perf_counter() - start
    if counts is None:
        raise BenchmarkError(f"aer run failed: {result.status}")
    if transpile_options is not None:
        cell.runs.append({"transpile_s": round(transpiled - start, 6),
                          "run_and_counts_s": round(start + elapsed - transpiled, 6)})
    _check_counts("aer", counts if isinstance(counts, list) else [counts], workload)
    return elapsed


def _pool_init() -> None:
    """Pool worker start-up: import the simulator once, outside any timed region."""
    importlib.import_module("qiskit.providers.basic_provider")


def _basic_run(task: tuple[QuantumCircuit, int, int]) -> dict[str, int]:
    """Pool task: one circuit on Qiskit's BasicSimulator in a pool worker; returns its counts."""
    from qiskit.providers.basic_provider import BasicSimulator

    circuit, shots, seed = task
    return BasicSimulator().run(circuit, shots=shots, seed_simulator=seed).result().get_counts()


def run_pool_cell(pool: Pool, workers: int, workload: Workload, repeat: int, budget: float,
                  log: Callable[[str], None]) -> Cell:
    """Time the pool on (the first k circuits of) a workload; extrapolate if k < all."""
    cell = Cell(workload.spec.key, "pool-basic", total_circuits=len(workload.circuits))
    if workload.noise_model is not None:
        cell.na_reason = "BasicSimulator has no noise models"
        return cell
    if workload.max_qubits > BASIC_MAX_QUBITS:
        cell.na_reason = f"BasicSimulator holds at most {BASIC_MAX_QUBITS} qubits (statevector)"
        return cell
    tasks = [(c, workload.shots, workload.seed + i) for i, c in enumerate(workload.circuits)]
    n = len(tasks)
    # Probe (not a repetition): one circuit, to choose k.
    start = time.perf_counter()
    probe = pool.map(_basic_run, tasks[:1], chunksize=1)
    per_circuit = time.perf_counter() - start
    if sum(probe[0].values()) != workload.shots:
        raise BenchmarkError(f"BasicSimulator probe returned {sum(probe[0].values())} shots")
    rounds_that_fit = max(1, int(budget // max(per_circuit, 1e-9)))
    k = n if math.ceil(n / workers) <= rounds_that_fit else min(n, rounds_that_fit * workers)
    cell.measured_circuits = k
    cell.extrapolated = k < n
    if cell.extrapolated:
        cell.notes.append(f"ran the first {k} of {n} circuits per repetition (one circuit: "
                          f"{_fmt_seconds(per_circuit)} s; budget {budget:g} s); time scaled by {n}/{k}")
    sub = Workload(workload.spec, workload.circuits[:k], workload.raw_circuits[:k], workload.seed)
    for rep in range(repeat):
        start = time.perf_counter()
        counts = pool.map(_basic_run, tasks[:k])
        elapsed = time.perf_counter() - start
        _check_counts("pool-basic", counts, sub)
        cell.raw_times.append(elapsed)
        cell.times.append(elapsed * n / k)
        log(f"  {workload.spec.key} rep {rep + 1}/{repeat}: {elapsed:.3f} s"
            + (f" for {k}/{n} circuits -> ~{elapsed * n / k:.3f} s" if cell.extrapolated else ""))
    return cell


def _tiny_circuits(count: int) -> list[QuantumCircuit]:
    from qiskit import QuantumCircuit

    circuits = []
    for i in range(count):
        c = QuantumCircuit(2, 2, name=f"warmup_{i}")
        c.h(0)
        c.cx(0, 1)
        c.measure([0, 1], [0, 1])
        circuits.append(c)
    return circuits


def _timed_cell(key: str, config: str, workload: Workload, repeat: int, once: Callable[[Cell], float],
                log: Callable[[str], None]) -> Cell:
    cell = Cell(key, config, total_circuits=len(workload.circuits), measured_circuits=len(workload.circuits))
    try:
        for rep in range(repeat):
            elapsed = once(cell)
            cell.times.append(elapsed)
            cell.raw_times.append(elapsed)
            log(f"  {key} rep {rep + 1}/{repeat}: {elapsed:.3f} s")
    except Exception as exc:  # recorded and reported loudly; the other cells still run
        cell.error = f"{type(exc).__name__}: {exc}"
        log(f"  [bold red]{key} ERROR[/]: {cell.error}")
    return cell


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def cluster_shape(config: str) -> dict[str, int]:
    """``LocalCluster`` arguments of a qscale configuration: one-thread nodes, or one node whose
    single slot has all the machine's cores."""
    if config == "qscale-1node-all":
        return {"nodes": 1, "slots_per_node": 1, "cores_per_node": usable_cores()}
    return {"nodes": 1 if config == "qscale-1node" else 2, "slots_per_node": 1, "cores_per_node": 1}


def run_config(config: str, workloads: dict[str, Workload], args: argparse.Namespace,
               log: Callable[[str], None]) -> list[Cell]:
    """The given workloads' repetitions through one configuration (its cluster/pool set up once)."""
    cells: list[Cell] = []
    if config.startswith("qscale"):
        from qscale.local import LocalCluster

        shape = cluster_shape(config)
        cluster = LocalCluster(**shape)
        as_built = config in AS_BUILT
        try:
            t0 = time.perf_counter()
            cluster.start()
            warm = _tiny_circuits(2 * shape["nodes"])
            result = cluster.client.submit(warm, shots=100, seed=1).result(timeout=120)
            if result.shots != 100 * len(warm):
                raise BenchmarkError(f"warm-up job returned {result.shots} shots, asked {100 * len(warm)}")
            log(f"  cluster of {shape['nodes']} node(s), {shape['cores_per_node']} core(s) each, up and warm in "
                f"{time.perf_counter() - t0:.1f} s (not timed)")
            for key, wl in workloads.items():
                cells.append(_timed_cell(key, config, wl, args.repeat, lambda cell, wl=wl: run_qscale_once(
                    cluster, wl, args.job_timeout, cell, as_built), log))
        finally:
            cluster.stop()
    elif config.startswith("aer"):
        from qiskit import transpile
        from qiskit_aer import AerSimulator

        threads = 1 if config == "aer-1thread" else None
        transpile_options = None
        simulator = AerSimulator()
        warm = _tiny_circuits(2)
        if config in AS_BUILT:
            transpile_options = {"seed_transpiler": 0}
            if args.aer_transpile_level is not None:
                transpile_options["optimization_level"] = args.aer_transpile_level
            warm = transpile(warm, simulator, **transpile_options)  # loads the transpiler's passes
        simulator.run(warm, shots=100, seed_simulator=1,
                      **({"max_parallel_threads": threads} if threads else {})).result()
        for key, wl in workloads.items():
            cell = _timed_cell(key, config, wl, args.repeat, lambda cell, wl=wl: run_aer_once(
                simulator, wl, threads, cell, transpile_options), log)
            if cell.runs:
                cell.notes.append("transpile + run and counts, per run: " + ", ".join(
                    f"{r['transpile_s']:.3f} + {r['run_and_counts_s']:.3f} s" for r in cell.runs))
            cells.append(cell)
    elif config == "pool-basic":
        workers = os.cpu_count() or 1
        ctx = multiprocessing.get_context("spawn")
        pool = ctx.Pool(workers, initializer=_pool_init)
        try:
            t0 = time.perf_counter()
            pool.map(_basic_run, [(c, 10, 1) for c in _tiny_circuits(2 * workers)], chunksize=1)
            log(f"  pool of {workers} workers up and warm in {time.perf_counter() - t0:.1f} s (not timed)")
            for key, wl in workloads.items():
                try:
                    cell = run_pool_cell(pool, workers, wl, args.repeat, args.pool_budget, log)
                except Exception as exc:
                    cell = Cell(key, config, error=f"{type(exc).__name__}: {exc}")
                    log(f"  [bold red]{key} ERROR[/]: {cell.error}")
                if cell.na_reason:
                    log(f"  {key}: n/a ({cell.na_reason})")
                cells.append(cell)
            pool.close()
        except BaseException:
            pool.terminate()
            raise
        finally:
            pool.join()
    else:  # pragma: no cover - argparse rejects unknown configurations
        raise ValueError(config)
    return cells


# --------------------------------------------------------------------------------------------
# Ratios, machine, reports
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RatioSpec:
    name: str
    workload: str
    numerator: str
    denominator: str  # a configuration, or "" for a throughput
    op: str  # "<=" or ">="
    target: float


RATIO_SPECS: tuple[RatioSpec, ...] = (
    RatioSpec("overhead, all cores", "W3", "qscale-1node-all", "aer-default", "<=", 1.10),
    RatioSpec("overhead, all cores", "W7", "qscale-1node-all", "aer-default", "<=", 1.25),
    RatioSpec("overhead, one thread", "W2", "qscale-1node", "aer-1thread", "<=", 1.10),
    RatioSpec("overhead, one thread", "W3", "qscale-1node", "aer-1thread", "<=", 1.05),
    RatioSpec("scaling", "W2", "qscale-1node", "qscale-2nodes", ">=", 1.85),
    RatioSpec("scaling", "W5", "qscale-1node", "qscale-2nodes", ">=", 1.85),
    RatioSpec("vs Aer, each transpiling", "W2", "qscale-2nodes-raw", "aer-default-transpile", "<=", 0.70),
    RatioSpec("throughput (circuits/s)", "W6", "qscale-2nodes", "", ">=", 5_000.0),
    RatioSpec("vs BasicSimulator pool", "W1", "pool-basic", "qscale-2nodes", ">=", 100.0),
)
MIN_RUNS = 3  # a ratio is a median of at least this many runs on each side; fewer is flagged


def compute_ratios(cells: dict[tuple[str, str], Cell], workloads: dict[str, Workload]) -> list[dict[str, Any]]:
    out = []
    for spec in RATIO_SPECS:
        if spec.workload not in workloads:
            continue
        expr = (f"{spec.numerator} / {spec.denominator}" if spec.denominator
                else f"circuits / {spec.numerator} seconds")
        entry: dict[str, Any] = {"name": spec.name, "workload": spec.workload, "expression": expr,
                                 "target": f"{spec.op} {spec.target:g}", "value": None, "status": "n/a",
                                 "extrapolated": False, "reason": None}
        num = cells.get((spec.workload, spec.numerator))
        den = cells.get((spec.workload, spec.denominator)) if spec.denominator else None
        missing = [c for c, cell in ((spec.numerator, num), (spec.denominator, den))
                   if c and (cell is None or cell.median is None)]
        if missing:
            reasons = []
            for c in missing:
                cell = cells.get((spec.workload, c))
                reasons.append(f"{c}: " + ("not run" if cell is None else cell.na_reason or cell.error or "no time"))
            entry["reason"] = "; ".join(reasons)
            if any((cell := cells.get((spec.workload, c))) is not None and cell.error for c in missing):
                entry["status"] = "ERROR"
        else:
            assert num is not None and num.median is not None
            if spec.denominator:
                assert den is not None and den.median is not None
                value = num.median / den.median
                entry["extrapolated"] = num.extrapolated or den.extrapolated
            else:
                value = len(workloads[spec.workload].circuits) / num.median
            ok = value <= spec.target if spec.op == "<=" else value >= spec.target
            entry["value"] = round(value, 4)
            entry["status"] = "PASS" if ok else "MISS"
            entry["runs"] = min(len(c.times) for c in (num, den) if c is not None)
            if entry["runs"] < MIN_RUNS:
                entry["reason"] = f"median of {entry['runs']} run(s), fewer than {MIN_RUNS}: indicative only"
        out.append(entry)
    return out


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Hardware", "Processor", "cpu model") and value.strip():
                cpu = value.strip()
                break
    except OSError:
        pass
    memory = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory = int(line.split()[1]) * 1024
                break
    except (OSError, ValueError, IndexError):
        pass

    def version(dist: str) -> str | None:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    try:
        import qscale

        qscale_version: str | None = qscale.__version__
    except ImportError:
        qscale_version = None
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                                text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {
        "cpu_model": cpu,
        "cores": os.cpu_count(),
        "cores_usable": usable_cores(),
        "memory_bytes": memory,
        "memory_gib": round(memory / 2**30, 1) if memory else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "qiskit": version("qiskit"),
        "qiskit_aer": version("qiskit-aer"),
        "qscale": qscale_version,
        "git_commit": commit,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def _fmt_seconds(x: float) -> str:
    return f"{x:.4f}" if x < 0.01 else f"{x:.3f}" if x < 100 else f"{x:.1f}"


def cell_text(cell: Cell | None, repeat: int) -> str:
    """Plain text of a table cell: median (min-max), ``~`` when extrapolated."""
    if cell is None:
        return "-"
    if cell.error:
        return "ERROR"
    if cell.na_reason:
        return "n/a"
    if cell.median is None:
        return "-"
    mark = "~" if cell.extrapolated else ""
    text = f"{mark}{_fmt_seconds(cell.median)}"
    if len(cell.times) > 1:
        text += f" ({_fmt_seconds(min(cell.times))}-{_fmt_seconds(max(cell.times))})"
    return text


def _ratio_value(entry: dict[str, Any]) -> str:
    if entry["value"] is None:
        return "n/a"
    v = entry["value"]
    text = f"{v:,.0f}" if v >= 1000 else f"{v:.2f}" if v < 100 else f"{v:,.1f}"
    return ("~" if entry["extrapolated"] else "") + text


def write_markdown(path: Path, report: dict[str, Any], workloads: dict[str, Workload], configs: Sequence[str],
                   cells: dict[tuple[str, str], Cell], repeat: int) -> None:
    m = report["machine"]
    lines = [
        f"Wall seconds, median of {repeat} run(s) (min-max); `~` = extrapolated from a subset, "
        f"n/a = not possible on that configuration, - = not run."
        + (" **Quick (smoke) mode: shrunk workloads.**" if report["quick"] else ""),
        "",
        f"Machine: {m['cpu_model']}, {m['cores']} cores, {m['memory_gib']} GiB; Python {m['python']}, "
        f"qiskit {m['qiskit']}, qiskit-aer {m['qiskit_aer']}, qscale {m['qscale']}; {m['date']}.",
        "",
        "| Workload | " + " | ".join(configs) + " |",
        "|---|" + "---:|" * len(configs),
    ]
    for key, wl in workloads.items():
        row = [f"{key}: {wl.spec.title}"] + [cell_text(cells.get((key, c)), repeat) for c in configs]
        lines.append("| " + " | ".join(row) + " |")
    notes = [f"- {c.workload} {c.config}: n/a, {c.na_reason}" for c in cells.values() if c.na_reason]
    notes += [f"- {c.workload} {c.config}: {n}" for c in cells.values() for n in c.notes]
    if notes:
        lines += ["", *notes]
    if report["ratios"]:
        lines += ["", "| Ratio | Workload | Expression | Value | Target | Result |", "|---|---|---|---:|---|---|"]
        for r in report["ratios"]:
            result = r["status"] + (f" ({r['reason']})" if r["reason"] else "")
            lines.append(f"| {r['name']} | {r['workload']} | {r['expression']} | {_ratio_value(r)} | "
                         f"{r['target']} | {result} |")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def _csv_choice(allowed: Sequence[str]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        items = [x.strip() for x in text.split(",") if x.strip()]
        lookup = {a.lower(): a for a in allowed}
        bad = [x for x in items if x.lower() not in lookup]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"choose from {', '.join(allowed)} (comma-separated); got {text!r}")
        chosen = {lookup[x.lower()] for x in items}
        return [a for a in allowed if a in chosen]

    return parse


def _estimator() -> ModuleType:
    """benchmarks/estimator.py (imported on demand: it imports this module)."""
    if __package__:
        from benchmarks import estimator
    else:  # run as a script: benchmarks/ is on the path; estimator's ``import bench`` is this module
        sys.modules.setdefault("bench", sys.modules[__name__])
        import estimator
    return estimator


def output_paths(output: Path | None) -> tuple[Path, Path, Path]:
    """The files of ``--output``: in a directory ``results.json``, ``results.md`` and (estimator
    workloads) ``estimator-results.json``; for a ``.json`` file, the ``.md`` and ``-estimator.json``
    beside it. Without ``--output``, a new directory under the system's temporary directory
    (nothing is written inside the checkout unless asked)."""
    if output is None:
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        output = Path(tempfile.mkdtemp(prefix=f"qscale-bench-{stamp}-"))
    if output.suffix == ".json":
        return output, output.with_suffix(".md"), output.with_name(f"{output.stem}-estimator.json")
    return output / "results.json", output / "results.md", output / "estimator-results.json"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    est = _estimator()
    everything = (*WORKLOADS, *est.WORKLOADS)
    parse_only = _csv_choice(everything)
    parser = argparse.ArgumentParser(
        description="Benchmark qscale against in-process qiskit-aer and a multiprocessing pool of Qiskit "
                    "BasicSimulator processes; and run estimator.py's workloads.")
    parser.add_argument("--only", type=lambda t: list(everything) if t.strip().lower() == "all" else parse_only(t),
                        default=list(WORKLOADS),
                        help=f"workloads to run, e.g. W1,W3 or E1,C1, or `all` (default: {','.join(WORKLOADS)}; "
                             f"{','.join(est.WORKLOADS)} are estimator.py's, run with its configurations)")
    parser.add_argument("--configs", type=_csv_choice(CONFIGS), default=None,
                        help=f"configurations to run on every chosen W workload: {','.join(CONFIGS)} (default: "
                             f"each workload's own list: {','.join(BASE_CONFIGS)}, plus "
                             + "; ".join(f"{','.join(v)} on {k}" for k, v in EXTRA_CONFIGS.items()) + ")")
    parser.add_argument("--repeat", type=int, default=None,
                        help="repetitions per (workload, configuration); default 3, or 1 with --quick (estimator "
                             "workloads: estimator.py's defaults)")
    parser.add_argument("--pool-budget", type=float, default=None,
                        help="seconds one timed pool-basic run may take before it runs only a subset and "
                             "extrapolates; default 60, or 5 with --quick")
    parser.add_argument("--quick", action="store_true",
                        help="smoke mode: shrunk workloads, --repeat 1, --pool-budget 5")
    parser.add_argument("--job-timeout", type=float, default=None,
                        help="seconds to wait for one qscale job (default 3600; estimator workloads: 1800)")
    parser.add_argument("--aer-transpile-level", type=int, choices=range(4), default=None,
                        help="optimization_level of aer-default-transpile's transpile() (default: Qiskit's "
                             "default; 0 is what the nodes do)")
    parser.add_argument("--c2-cap", type=int, default=None, help="estimator C2: see estimator.py")
    parser.add_argument("--profile", action="store_true", help="estimator workloads: see estimator.py")
    parser.add_argument("--output", type=Path, default=None,
                        help="where the results go: a directory (results.json, results.md and, for estimator "
                             "workloads, estimator-results.json in it; `--output benchmarks` updates the tracked "
                             "files) or a .json file (the others beside it); default: a new directory under the "
                             "system's temporary directory, never inside the checkout")
    args = parser.parse_args(argv)
    if args.repeat is not None and args.repeat < 1:
        parser.error("--repeat must be >= 1")
    est_keys = [k for k in args.only if k in est.WORKLOADS]
    args.estimator = None
    if est_keys:  # estimator.py's own options, its defaults where this command line gives none
        est_argv = ["--only", ",".join(est_keys), *(["--quick"] if args.quick else []),
                    *(["--profile"] if args.profile else [])]
        for flag, value in (("--repeat", args.repeat), ("--job-timeout", args.job_timeout),
                            ("--c2-cap", args.c2_cap)):
            if value is not None:
                est_argv += [flag, str(value)]
        args.estimator = est.parse_args(est_argv)
    args.only = [k for k in args.only if k in WORKLOADS]
    if args.repeat is None:
        args.repeat = 1 if args.quick else 3
    if args.job_timeout is None:
        args.job_timeout = 3600.0
    if args.pool_budget is None:
        args.pool_budget = 5.0 if args.quick else 60.0
    if args.pool_budget <= 0:
        parser.error("--pool-budget must be > 0")
    return args


# --------------------------------------------------------------------------------------------
# Duration estimate
# --------------------------------------------------------------------------------------------

# Seconds per repetition of each (workload, configuration) at full size on a 2-core Xeon (medians of
# the full run in results.md; the cells added since, single runs): for the duration estimate only.
REFERENCE_SECONDS: dict[tuple[str, str], float] = {
    ("W1", "qscale-1node"): 0.09, ("W1", "qscale-2nodes"): 0.06, ("W1", "qscale-1node-all"): 0.09,
    ("W1", "aer-1thread"): 0.06, ("W1", "aer-default"): 0.05, ("W1", "pool-basic"): 34.1,
    ("W2", "qscale-1node"): 2.0, ("W2", "qscale-2nodes"): 1.14, ("W2", "qscale-1node-all"): 2.0,
    ("W2", "qscale-2nodes-raw"): 20.0, ("W2", "aer-1thread"): 1.64, ("W2", "aer-default"): 1.58,
    ("W2", "aer-default-transpile"): 20.0, ("W2", "pool-basic"): 2.5,
    ("W3", "qscale-1node"): 1.76, ("W3", "qscale-2nodes"): 1.70, ("W3", "qscale-1node-all"): 1.0,
    ("W3", "aer-1thread"): 1.42, ("W3", "aer-default"): 0.70, ("W3", "pool-basic"): 8.5,
    ("W4", "qscale-1node"): 65.9, ("W4", "qscale-2nodes"): 33.0, ("W4", "qscale-1node-all"): 33.0,
    ("W4", "aer-1thread"): 63.5, ("W4", "aer-default"): 32.0,
    ("W5", "qscale-1node"): 41.3, ("W5", "qscale-2nodes"): 23.1, ("W5", "qscale-1node-all"): 21.0,
    ("W5", "aer-1thread"): 42.2, ("W5", "aer-default"): 20.6, ("W5", "pool-basic"): 116.4,
    ("W6", "qscale-1node"): 3.4, ("W6", "qscale-2nodes"): 2.44, ("W6", "qscale-1node-all"): 3.4,
    ("W6", "aer-1thread"): 2.0, ("W6", "aer-default"): 1.95, ("W6", "pool-basic"): 1.15,
    ("W7", "qscale-1node"): 10.0, ("W7", "qscale-2nodes"): 6.0, ("W7", "qscale-1node-all"): 9.0,
    ("W7", "aer-1thread"): 15.0, ("W7", "aer-default"): 14.0,
}
POOL_PROBE_S = {"W1": 6.8, "W3": 8.5, "W5": 110.0}  # pool-basic's untimed one-circuit probe, where it counts
CLUSTER_START_S = 5.0  # starting and warming up one local cluster
GENERATION_S = 15.0  # generating (and transpiling up front) the full workloads' circuits


def estimate_seconds(per_repetition: dict[tuple[str, str], float], runs: Iterable[tuple[str, str, int]]
                     ) -> tuple[float, list[str]]:
    """Sum of ``repetitions x seconds`` over ``(workload, configuration, repetitions)``, and the
    cells without a figure."""
    total, unknown = 0.0, []
    for key, config, repeat in runs:
        seconds = per_repetition.get((key, config))
        if seconds is None:
            unknown.append(f"{key} {config}")
        else:
            total += seconds * repeat
    return total, unknown


def estimate_plan(plan: dict[str, list[str]], repeat: int) -> tuple[float, list[str]]:
    """Roughly how long the W workloads of ``plan`` take on the reference machine (full sizes)."""
    if not plan:
        return 0.0, []
    total, unknown = estimate_seconds(REFERENCE_SECONDS, [(k, c, repeat) for k, cs in plan.items() for c in cs])
    total += sum(POOL_PROBE_S.get(k, 0.0) for k, cs in plan.items() if "pool-basic" in cs)
    total += CLUSTER_START_S * len({c for cs in plan.values() for c in cs if c.startswith("qscale")})
    return total + GENERATION_S, unknown


def _fmt_minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def run_workloads(plan: dict[str, list[str]], args: argparse.Namespace, log: Callable[[str], None]
                  ) -> tuple[dict[str, Workload], dict[tuple[str, str], Cell]]:
    """Generate the W workloads of ``plan`` (workload -> its configurations) and time them, one
    configuration at a time."""
    from qiskit_aer import AerSimulator

    aer_supported = frozenset(AerSimulator().target.operation_names) | _NON_GATES
    specs = workload_specs(args.quick)
    workloads: dict[str, Workload] = {}
    t0 = time.perf_counter()
    for key in plan:
        wl = build_workload(specs[key], aer_supported)
        workloads[key] = wl
        extra = ""
        if wl.transpiled:
            extra = (f"; {wl.transpiled} circuit(s) transpiled for Aer (opt. level 0), it rejected: "
                     f"{', '.join(wl.rejected_gates)}")
        if wl.noise_info:
            extra += "; noisy gates " + ", ".join(f"{w}: {len(g)}" for w, g in wl.noise_info["gates"].items())
        log(f"  {key}: {wl.spec.title}{extra}")
    log(f"circuits generated in {time.perf_counter() - t0:.1f} s (not timed)")

    cells: dict[tuple[str, str], Cell] = {}
    for config in CONFIGS:
        chosen = {k: wl for k, wl in workloads.items() if config in plan[k]}
        if chosen:
            log(f"[bold cyan]{config}[/] ({', '.join(chosen)})")
            for cell in run_config(config, chosen, args, log):
                cells[(cell.workload, cell.config)] = cell
    return workloads, cells


def print_tables(console: Any, workloads: dict[str, Workload], configs: Sequence[str],
                 cells: dict[tuple[str, str], Cell], ratios: list[dict[str, Any]], args: argparse.Namespace) -> None:
    from rich.table import Table

    log = console.print
    table = Table(title=f"Wall s, median of {args.repeat} (min-max); ~ extrapolated; - not run"
                        + (" [quick mode]" if args.quick else ""))
    table.add_column("Workload", no_wrap=True)
    for config in configs:
        table.add_column(config, justify="right")
    for key, wl in workloads.items():
        row = []
        for config in configs:
            cell = cells.get((key, config))
            text = cell_text(cell, args.repeat)
            row.append(f"[bold red]{text}[/]" if cell is not None and cell.error else text)
        table.add_row(f"{key} {wl.spec.short}", *row)
    console.print(table)
    for cell in cells.values():
        if cell.na_reason:
            log(f"  n/a {cell.workload} {cell.config}: {cell.na_reason}")
        for note in cell.notes:
            log(f"  ~ {cell.workload} {cell.config}: {note}")
    if ratios:
        rt = Table(title="Targets" + (" (quick mode: shrunk workloads, figures not meaningful)" if args.quick else ""))
        for name in ("Ratio", "Workload", "Expression", "Value", "Target", "Result"):
            rt.add_column(name, justify="right" if name == "Value" else "left")
        for r in ratios:
            colour = {"PASS": "green", "MISS": "red", "ERROR": "bold red"}.get(r["status"], "yellow")
            result = f"[{colour}]{r['status']}[/]" + (f" ({r['reason']})" if r["reason"] else "")
            rt.add_row(r["name"], r["workload"], r["expression"], _ratio_value(r), r["target"], result)
        console.print(rt)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from rich.console import Console

    # Wide enough for the tables when the output is not a terminal (rich would assume 80 columns).
    console = Console(width=None if sys.stdout.isatty() else 200)
    log = console.print
    started = time.perf_counter()
    machine = machine_info()
    est = _estimator() if args.estimator is not None else None
    est_machine = est.machine_info() if est is not None else None
    specs = workload_specs(args.quick)
    plan = {key: list(args.configs or specs[key].configs) for key in args.only}
    log(f"[bold]qscale benchmark[/] ({'quick smoke mode' if args.quick else 'full'}; repeat {args.repeat}; "
        f"pool budget {args.pool_budget:g} s)")
    log(f"{machine['cpu_model']}, {machine['cores']} cores, {machine['memory_gib']} GiB; Python "
        f"{machine['python']}, qiskit {machine['qiskit']}, qiskit-aer {machine['qiskit_aer']}, "
        f"qscale {machine['qscale']}")
    estimate: float | None = None
    if not args.quick:
        estimate, unknown = estimate_plan(plan, args.repeat)
        if est is not None:
            more, more_unknown = est.estimate_seconds(args.estimator)
            estimate, unknown = estimate + more, unknown + more_unknown
        log(f"estimated duration: ~{_fmt_minutes(estimate)} on a 2-core Xeon"
            + (f" (no figure for {', '.join(unknown)})" if unknown else ""))

    workloads, cells = run_workloads(plan, args, log)
    ratios = compute_ratios(cells, workloads)
    configs = [c for c in CONFIGS if any(c in cs for cs in plan.values())]
    if workloads:
        print_tables(console, workloads, configs, cells, ratios, args)
    errors = [f"{c.workload} {c.config}: {c.error}" for c in cells.values() if c.error]
    est_result = None
    if est is not None:
        log("[bold]estimator workloads[/] (benchmarks/estimator.py)")
        est_result = est.run(args.estimator, log)
        est.print_report(console, est_result, args.quick)

    json_path, md_path, est_path = output_paths(args.output)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    written = []
    if workloads:
        report = {
            "benchmark": "qscale",
            "quick": args.quick,
            "repeat": args.repeat,
            "pool_budget_s": args.pool_budget,
            "aer_transpile_level": args.aer_transpile_level,
            "plan": plan,
            "machine": machine,
            "workloads": {k: wl.describe() for k, wl in workloads.items()},
            "cells": [c.to_dict() for c in cells.values()],
            "ratios": ratios,
            "errors": errors,
            "estimated_s": _round(estimate, 1),
            "total_wall_s": round(time.perf_counter() - started, 3),
        }
        json_path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        write_markdown(md_path, report, workloads, configs, cells, args.repeat)
        written += [json_path, md_path]
    if est is not None and est_result is not None:
        est_path.write_text(json.dumps(est.report(est_result, args.estimator, est_machine), indent=2) + "\n",
                            encoding="utf-8")
        written.append(est_path)
        errors += est_result.errors
    total = time.perf_counter() - started
    log(f"results: {', '.join(str(p) for p in written)}")
    log(f"took {_fmt_minutes(total)}" + (f" (estimated ~{_fmt_minutes(estimate)})" if estimate is not None else ""))
    if errors:
        console.print("[bold red]ERRORS[/] (a wrong or failed run; see the JSON):")
        for e in errors:
            console.print(f"  [red]{e}[/]")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
