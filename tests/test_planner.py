"""The planner is a pure function of the job and the policy."""

from __future__ import annotations

import numpy as np
from qiskit import QuantumCircuit
from qiskit.circuit.random import random_circuit

from qscale.circuits import CircuitInfo, describe
from qscale.coordinator.planner import PlanningPolicy, choose_method, chunk_seed, plan_and_explain, splits_shots


def plan_job(*args, **kwargs):
    """The plan alone (what the planner's explanation comes with is tested on its own)."""
    return plan_and_explain(*args, **kwargs)[0]


def _clifford(n: int) -> QuantumCircuit:
    qc = QuantumCircuit(n)
    qc.h(range(n))
    qc.measure_all()
    return qc


def _random(n: int, seed: int) -> QuantumCircuit:
    return random_circuit(n, 4, measure=True, seed=seed)


def test_shots_add_up_and_split_only_where_shots_cost() -> None:
    infos = [describe(_clifford(24)), describe(_random(10, 1)), describe(_random(20, 2))]
    policy = PlanningPolicy(shots_per_shard=1000)
    plan = plan_job(infos, [10_000] * 3, [1] * 3, seed=5, method="automatic", policy=policy)
    per_circuit = [0, 0, 0]
    for shard in plan:
        for chunk in shard.chunks:
            for e in chunk.entries:
                per_circuit[e.circuit] += chunk.shots * e.set_count
    assert per_circuit == [10_000, 10_000, 10_000]
    # The Clifford circuit runs on the stabilizer method (cost per shot): split in 10.
    assert sum(1 for s in plan if s.circuit_indices == (0,)) == 10
    # The statevector circuits sample one final state: never split.
    assert sum(1 for s in plan if 1 in s.circuit_indices) == 1
    assert sum(1 for s in plan if 2 in s.circuit_indices) == 1


def test_mid_circuit_measurement_splits_shots() -> None:
    qc = QuantumCircuit(2, 2)
    qc.h(0)
    qc.measure(0, 0)
    qc.t(0)
    qc.cx(0, 1)
    qc.measure([0, 1], [0, 1])
    info = describe(qc)
    assert not info.final_measurements_only
    assert splits_shots(info, "statevector")
    plan = plan_job([info], [2500], [1], seed=1, method="statevector", policy=PlanningPolicy(shots_per_shard=1000))
    assert [s.shots for s in plan] == [834, 833, 833]


def test_small_circuits_are_batched_in_chunks() -> None:
    infos = [describe(_random(4, s)) for s in range(100)]
    policy = PlanningPolicy(max_circuits_per_shard=40, circuits_per_chunk=16)
    plan = plan_job(infos, [100] * 100, [1] * 100, seed=3, method="statevector", policy=policy)
    assert [len(s.circuit_indices) for s in plan] == [40, 40, 20]
    assert [c.experiments for c in plan[0].chunks] == [16, 16, 8]
    assert [i for s in plan for i in s.circuit_indices] == list(range(100))


def test_plan_is_deterministic_and_seeds_differ() -> None:
    infos = [describe(_clifford(5)) for _ in range(3)]
    a = plan_job(infos, [5000] * 3, [1] * 3, seed=42, method="", policy=PlanningPolicy())
    b = plan_job(infos, [5000] * 3, [1] * 3, seed=42, method="", policy=PlanningPolicy())
    c = plan_job(infos, [5000] * 3, [1] * 3, seed=43, method="", policy=PlanningPolicy())
    assert a == b
    seeds = [ch.seed for s in a for ch in s.chunks]
    assert len(set(seeds)) == len(seeds)
    assert seeds != [ch.seed for s in c for ch in s.chunks]
    assert chunk_seed(42, 0, 0) == a[0].chunks[0].seed
    assert all(0 <= s < 2**31 for s in seeds)


def test_memory_estimate_by_method() -> None:
    info = describe(_random(20, 7))
    (shard,) = plan_job([info], [10], [1], seed=1, method="statevector", policy=PlanningPolicy())
    assert shard.memory_bytes == 16 * 2**20
    (shard,) = plan_job([info], [10], [1], seed=1, method="density_matrix", policy=PlanningPolicy())
    assert shard.memory_bytes == 16 * 4**20
    wide = describe(_clifford(200))
    shards = plan_job([wide], [10], [1], seed=1, method="automatic", policy=PlanningPolicy())
    assert shards[0].memory_bytes < 2**21
    assert np.all([s.num_qubits == 200 for s in shards])


def test_parameter_sweeps_are_split_by_sets_and_batched() -> None:
    from qiskit.circuit import Parameter

    theta = Parameter("t")
    qc = QuantumCircuit(3)
    qc.rx(theta, range(3))
    qc.measure_all()
    info = describe(qc)
    policy = PlanningPolicy(max_circuits_per_shard=64, circuits_per_chunk=16)
    plan = plan_job([info, info], [100, 200], [1000, 10], seed=1, method="statevector", policy=policy)
    covered = sorted((e.circuit, s) for sh in plan for c in sh.chunks for e in c.entries
                     for s in range(e.set_start, e.set_start + e.set_count))
    assert covered == [(0, s) for s in range(1000)] + [(1, s) for s in range(10)]
    assert all(len(sh.circuit_indices) <= 2 and sum(c.experiments for c in sh.chunks) <= 64 for sh in plan)
    assert all(c.experiments <= 16 for sh in plan for c in sh.chunks)
    # Chunks never mix shots: a shard holding both circuits calls Aer once per shot count.
    mixed = [sh for sh in plan if len(sh.circuit_indices) == 2]
    assert mixed and all(len({e.circuit for e in c.entries}) == 1 for c in mixed[0].chunks)
    assert mixed[0].set_range(1) == (0, 10)


def _noisy_info(n: int, dm_ok: bool) -> CircuitInfo:
    qc = QuantumCircuit(n)
    for layer in range(10):
        qc.rx(0.1 * layer, range(n))
        qc.cx(range(0, n - 1, 2), range(1, n, 2))
    if not dm_ok:
        qc.cswap(0, 1, 2)  # Aer's density-matrix method does not simulate cswap
    qc.measure_all()
    return describe(qc)


def test_noise_picks_density_matrix_when_it_is_cheaper_and_valid() -> None:
    small = _noisy_info(4, dm_ok=True)
    assert choose_method(small, "automatic", 1000, noisy=True) == "density_matrix"
    (shard,) = plan_job([small], [100_000], [1], seed=1, method="automatic", policy=PlanningPolicy(), noisy=True)
    assert shard.method == "density_matrix" and shard.shots == 100_000  # one simulation for every shot
    # Not when shots are few (trajectories are cheaper), nor when it cannot simulate the circuit.
    assert choose_method(small, "automatic", 1, noisy=True) == "statevector"
    assert choose_method(_noisy_info(4, dm_ok=False), "automatic", 1000, noisy=True) == "statevector"
    # An explicit method is honoured.
    assert choose_method(small, "statevector", 1000, noisy=True) == "statevector"


def test_trajectories_are_split_by_cost() -> None:
    info = _noisy_info(12, dm_ok=False)
    policy = PlanningPolicy()
    plan = plan_job([info], [20_000], [1], seed=1, method="automatic", policy=policy, noisy=True)
    assert sum(s.shots for s in plan) == 20_000
    assert len(plan) == policy.target_shards  # enough work for the full fan-out
    assert {s.method for s in plan} == {"statevector"}
    assert max(s.shots for s in plan) - min(s.shots for s in plan) <= 1


def test_shard_cost_is_balanced_and_independent_of_the_cluster() -> None:
    infos = [describe(random_circuit(12, 10, measure=True, seed=s)) for s in range(200)]
    policy = PlanningPolicy()
    plan = plan_job(infos, [1000] * 200, [1] * 200, seed=1, method="automatic", policy=policy)
    assert [i for s in plan for i in s.circuit_indices] == list(range(200))
    assert 8 <= len(plan) <= 2 * policy.target_shards
    costs = sorted(s.cost for s in plan[:-1])  # the last one takes what is left
    assert costs[-1] <= 2 * costs[0]
    # Wide circuits get a shard each; one circuit sampled from one state keeps its shots together.
    wide = [describe(random_circuit(22, 5, measure=True, seed=s)) for s in range(8)]
    assert len(plan_job(wide, [1000] * 8, [1] * 8, seed=1, method="automatic", policy=policy)) == 8
    (one,) = plan_job([wide[0]], [100_000], [1], seed=1, method="automatic", policy=policy)
    assert one.shots == 100_000
    # Tiny circuits are packed so per-shard overhead is amortised (>= min_shard_seconds each).
    tiny = [describe(_clifford(1)) for _ in range(10_000)]
    packed = plan_job(tiny, [10] * 10_000, [1] * 10_000, seed=1, method="automatic", policy=policy)
    assert len(packed) <= policy.target_shards + 1
    assert all(s.cost >= policy.min_shard_seconds for s in packed[:-1])


def test_per_shot_memory_is_kept_under_the_chunk_cap() -> None:
    info = describe(_random(16, 3))
    policy = PlanningPolicy(max_memory_chunk_bytes=1 << 16)
    plan = plan_job([info], [100_000], [1], seed=1, method="statevector", policy=policy, memory=True)
    assert sum(s.shots for s in plan) == 100_000
    assert all(c.shots * 2 <= 1 << 16 for s in plan for c in s.chunks)  # 16 clbits: 2 bytes a shot


def test_the_plan_says_why_it_has_as_many_shards_as_it_has() -> None:
    from qscale.coordinator.planner import plan_and_explain

    seed24 = describe(_clifford(24))  # as the quick start's job, with a barrier: about 118 ms of stabilizer work
    plan, why = plan_and_explain([seed24], [10_000], [1], seed=1, method="automatic", policy=PlanningPolicy())
    assert len(plan) == why.shards == 3
    assert why.limit == "min_shard_cost" and why.splittable and why.shots_per_shard == 0
    assert why.estimated_cost_s == sum(s.cost for s in plan)
    assert why.shard_target_s == PlanningPolicy().min_shard_seconds
    assert why.text == ("3 shards: the job is about 118 ms of estimated work, and the planner's smallest shard "
                        "target is 50 ms")

    # A cap on shots per shard spreads it; the figures say so.
    plan, why = plan_and_explain([seed24], [10_000], [1], seed=1, method="automatic",
                                 policy=PlanningPolicy().with_shots_per_shard(1000))
    assert len(plan) == why.shards == 10 and why.limit == "shots_per_shard" and why.shots_per_shard == 1000
    assert why.text == "10 shards: at most 1,000 shots per shard (the job is about 118 ms of estimated work)"

    # A statevector circuit that samples every shot from one final state is one simulation.
    dense = describe(_random(20, 2))
    plan, why = plan_and_explain([dense], [10_000], [1], seed=1, method="automatic",
                                 policy=PlanningPolicy(shots_per_shard=100))
    assert len(plan) == 1 and why.limit == "unsplittable" and not why.splittable
    assert why.text.startswith("1 shard: the job is about ") and "cannot be split" in why.text

    # Enough work: about target_shards shards of equal cost.
    plan, why = plan_and_explain([dense] * 64, [100] * 64, [1] * 64, seed=1, method="automatic",
                                 policy=PlanningPolicy(target_shards=8))
    assert why.limit == "target_shards" and why.shards == len(plan) == 8
    assert why.text.endswith("cut into about 8 shards of equal cost")

    # A tiny job is one shard.
    plan, why = plan_and_explain([describe(_clifford(2))], [10], [1], seed=1, method="automatic",
                                 policy=PlanningPolicy())
    assert len(plan) == 1 and why.limit == "min_shard_cost"
    assert why.text.startswith("1 shard: the job is about 0.3")


def test_a_jobs_shots_per_shard_and_the_coordinators_the_smaller_wins() -> None:
    assert PlanningPolicy(shots_per_shard=1000).with_shots_per_shard(500).shots_per_shard == 500
    assert PlanningPolicy(shots_per_shard=1000).with_shots_per_shard(5000).shots_per_shard == 1000
    assert PlanningPolicy().with_shots_per_shard(700).shots_per_shard == 700
    assert PlanningPolicy(shots_per_shard=300).with_shots_per_shard(0).shots_per_shard == 300
    # The plan (and so every chunk's seed) depends on the cap, never on the cluster.
    info = describe(_clifford(10))
    policy = PlanningPolicy().with_shots_per_shard(250)
    a = plan_job([info], [1000], [1], seed=9, method="automatic", policy=policy)
    b = plan_job([info], [1000], [1], seed=9, method="automatic", policy=policy)
    assert a == b and len(a) == 4
