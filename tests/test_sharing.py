"""A shared cluster, end to end: two users and an admin from a client tokens file, on a real
local cluster (a coordinator and one real node). Each user sees and touches only their own
jobs, an admin every user's; a quota refuses a submission at once and leaves the user's other
jobs alone; a HIGH priority job overtakes a backlog of normal ones."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import fast_config, ghz, slow_circuit, wait_until
from qscale.client import Client, Job
from qscale.errors import PermissionDeniedError, ResourceExhaustedError
from qscale.local import LocalCluster

ALICE = "alice-token-0123456789abcdefghij"
BOB = "bob-token-0123456789abcdefghijkl"
ROOT = "root-token-0123456789abcdefghijk"
TOKENS = f"""# two users and an admin
{ALICE} alice
{BOB} bob max-jobs=2
{ROOT} root admin
"""


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """One node of one slot, shared by alice, bob (at most 2 unfinished jobs) and root (admin)."""
    path: Path = tmp_path_factory.mktemp("sharing") / "client.tokens"
    path.touch(mode=0o600)
    path.write_text(TOKENS)
    cluster = LocalCluster(1, cores_per_node=1, config=fast_config(), client_tokens_file=path)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def alice(shared: LocalCluster) -> Client:
    return shared.client_for(ALICE, timeout=30)


@pytest.fixture
def bob(shared: LocalCluster) -> Client:
    return shared.client_for(BOB, timeout=30)


@pytest.fixture
def root(shared: LocalCluster) -> Client:
    return shared.client_for(ROOT, timeout=30)


def test_the_cluster_client_is_the_admin(shared: LocalCluster) -> None:
    """Without ``client_token``, ``LocalCluster.client`` presents the file's admin token."""
    assert shared.client_token == ROOT
    assert {u.name for u in shared.client.users()} == {"alice", "bob", "root"}


def test_users_list_their_own_jobs_and_an_admin_every_job(alice: Client, bob: Client, root: Client) -> None:
    mine = alice.submit(ghz(3), shots=100, seed=1)
    theirs = bob.submit(ghz(3), shots=100, seed=2)
    mine.result(timeout=60)
    theirs.result(timeout=60)
    listed = {j.job_id: j.user for j in alice.jobs()}
    assert mine.job_id in listed and theirs.job_id not in listed
    assert set(listed.values()) == {"alice"}
    assert {j.user for j in bob.jobs()} == {"bob"}
    every = {j.job_id: j.user for j in root.jobs()}
    assert every[mine.job_id] == "alice" and every[theirs.job_id] == "bob"
    assert {j.job_id for j in root.jobs(user="bob")} == {j.job_id for j in bob.jobs()}
    with pytest.raises(PermissionDeniedError):
        alice.jobs(user="bob")


def test_another_users_job_is_out_of_reach(alice: Client, bob: Client, root: Client) -> None:
    job = alice.submit(slow_circuit(10, 2), shots=2000, seed=3)
    theirs = Job(bob, job.job_id)
    for action in (theirs.status, lambda: theirs.result(timeout=30), lambda: list(theirs.watch(timeout=30)),
                   theirs.cancel):
        with pytest.raises(PermissionDeniedError) as info:
            action()
        assert job.job_id in str(info.value)
    result = job.result(timeout=60)  # bob's cancel changed nothing
    assert result.status.state.value == "done" and sum(result.counts[0].values()) == 2000
    assert result.status.user == "alice"
    assert Job(root, job.job_id).status().state.value == "done"  # an admin reads it


def test_over_max_jobs_is_refused_at_once_and_changes_nothing(bob: Client) -> None:
    held = [bob.submit(slow_circuit(10, 2), shots=4000, seed=10 + k) for k in range(2)]  # ~2 s each
    before = [j.status() for j in held]
    t = time.monotonic()
    with pytest.raises(ResourceExhaustedError) as info:
        bob.submit(ghz(3), shots=10)
    took = time.monotonic() - t
    message = str(info.value)
    assert "max-jobs 2" in message and "2 unfinished" in message and "'bob'" in message, message
    assert took < 5.0, took
    assert {j.job_id for j in held} <= {j.job_id for j in bob.jobs()}
    (line,) = bob.users()
    assert (line.name, line.jobs_unfinished, line.max_jobs) == ("bob", 2, 2)
    for job, status in zip(held, before):
        result = job.result(timeout=60)  # untouched: it runs to the end, exactly
        assert result.status.state.value == "done" and status.state.value in ("queued", "running")
        assert sum(result.counts[0].values()) == 4000
    bob.submit(ghz(3), shots=10).result(timeout=60)  # room again


def test_high_priority_job_finishes_before_the_backlog(alice: Client) -> None:
    """The node holds a running normal shard and one waiting (prefetch): each of the high job's
    shards is sent to run ahead of the waiting one, so at most the shard running when it came
    ends before the high job does. (A normal job of the same user overtakes with its first
    shard only, having nothing running; then the waiting shard goes first.)"""
    backlog = [alice.submit(slow_circuit(10, 2), shots=3000, seed=20 + k) for k in range(3)]
    try:
        wait_until(lambda: backlog[0].status().shards_done >= 1, 60, "the backlog to get under way")
        high = alice.submit(slow_circuit(8, 1), shots=3000, seed=4, priority="high")
        done = high.result(timeout=60)
        left = sum(j.status().shards_total - j.status().shards_done for j in backlog)
        assert done.status.priority == "high" and done.status.shards_total == 3
        assert sum(done.counts[0].values()) == 3000
        assert left >= 4, f"the backlog had only {left} shard(s) left when the high job finished"
        results = [j.result(timeout=90) for j in backlog]
        assert done.status.finished_at < min(r.status.finished_at for r in results[1:])
        first = min(a.started_at for a in done.attempts)
        last = max(a.ended_at for a in done.attempts)
        ended_meanwhile = [(a.shard_index, a.started_at - first, a.ended_at - first) for r in results
                           for a in r.attempts if a.outcome == "done" and first < a.ended_at < last]
        assert len(ended_meanwhile) <= 1, ended_meanwhile
    finally:
        for job in backlog:  # (no effect on a finished job)
            job.cancel()


def test_a_user_lists_their_own_line_and_an_admin_every_user(shared: LocalCluster, alice: Client, bob: Client,
                                                             root: Client) -> None:
    alice.submit(ghz(3), shots=100).result(timeout=60)
    (own,) = alice.users()
    assert (own.name, own.admin, own.weight) == ("alice", False, 1.0)
    assert own.max_jobs == shared.config.max_jobs_per_user  # not in the file: the coordinator's default
    assert [u.name for u in bob.users()] == ["bob"] and bob.users()[0].max_jobs == 2
    every = {u.name: u for u in root.users()}
    assert {"alice", "bob", "root"} <= set(every)
    assert every["root"].admin and not every["alice"].admin
    assert every["bob"].max_jobs == 2
    assert every["alice"].slot_seconds > 0
    wait_until(lambda: all(u.slots_busy == 0 and u.jobs_unfinished == 0 for u in root.users()), 30,
               "every job to end")
