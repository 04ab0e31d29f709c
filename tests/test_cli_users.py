"""Users and priorities on the client side, without a server: the priority checked by the
client, the primitives and the backend, what goes on the wire (``SubmitRequest.priority``,
``ListJobsRequest.user``, ``ListUsers``), and how the CLI renders users, jobs and a status from
hand-built protobuf messages."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from conftest import bell
from qscale.client import Client, check_priority
from qscale.coordinator import cli
from qscale.errors import InvalidArgumentError, PermissionDeniedError
from qscale.proto.v1 import common_pb2, jobs_pb2
from qscale.results import JobState, JobStatus, UserStatus, priority_name

LOW, NORMAL, HIGH = common_pb2.PRIORITY_LOW, common_pb2.PRIORITY_NORMAL, common_pb2.PRIORITY_HIGH


class _Recorder:
    """Stands in for ``Client._call``: records each request and answers with a canned reply."""

    def __init__(self, replies: dict[str, Any]) -> None:
        self.replies = replies
        self.calls: list[tuple[str, Any]] = []

    def __call__(self, method: str, request: Any) -> Any:
        self.calls.append((method, request))
        return self.replies[method]


@pytest.fixture()
def client() -> Iterator[Client]:
    """A client of an address nothing listens on: only what it checks before calling can pass."""
    with Client("127.0.0.1:1", token=None, timeout=5, connect_timeout=1) as c:
        yield c


def _recording(client: Client, **replies: Any) -> _Recorder:
    recorder = _Recorder({"Submit": jobs_pb2.SubmitReply(job_id="j1", seed=7), **replies})
    client._call = recorder  # type: ignore[method-assign]
    return recorder


# ------------------------------------------------------------------ priority

@pytest.mark.parametrize(("value", "wire"), [
    ("low", LOW), ("normal", NORMAL), ("high", HIGH), ("HIGH", HIGH), (" Low ", LOW), (None, NORMAL),
    (LOW, LOW), (NORMAL, NORMAL), (HIGH, HIGH), (0, NORMAL), (np.int64(3), HIGH),
])
def test_priorities_accepted(value: object, wire: int) -> None:
    assert check_priority(value) == wire


@pytest.mark.parametrize("value", ["urgent", "", "3", 4, -1, True, 2.0, b"high", object()])
def test_priorities_refused(value: object) -> None:
    with pytest.raises(InvalidArgumentError, match=r"priority must be one of low, normal, high"):
        check_priority(value)


def test_priority_names_from_the_wire() -> None:
    assert [priority_name(v) for v in (0, LOW, NORMAL, HIGH, 9)] == ["normal", "low", "normal", "high", "priority 9"]


def test_submit_sends_the_priority_and_refuses_a_bad_one_before_calling(client: Client, tmp_path: Path) -> None:
    recorder = _recording(client)
    assert client.submit(bell(), shots=10, priority="high").job_id == "j1"
    client.submit(bell(), shots=10)
    client.submit(bell(), shots=10, priority=LOW)
    qasm = tmp_path / "bell.qasm"
    qasm.write_text('OPENQASM 2.0;\ninclude "qelib1.inc";\nqreg q[2];\ncreg c[2];\nh q[0];\nmeasure q -> c;\n')
    client.submit_files([qasm], shots=10, priority="low")
    client.estimate(bell().remove_final_measurements(inplace=False), [["ZZ"]], priority="high")
    assert [(m, r.priority) for m, r in recorder.calls] == [
        ("Submit", HIGH), ("Submit", NORMAL), ("Submit", LOW), ("Submit", LOW), ("Submit", HIGH)]
    for call in (lambda: client.submit(bell(), shots=10, priority="urgent"),
                 lambda: client.submit_files([qasm], shots=10, priority=7),
                 lambda: client.estimate(bell().remove_final_measurements(inplace=False), [["ZZ"]], priority="")):
        with pytest.raises(InvalidArgumentError, match="priority must be"):
            call()
    assert len(recorder.calls) == 5


def test_primitives_and_backend_take_a_priority_option(client: Client) -> None:
    from qscale.backend import QScaleBackend
    from qscale.estimator import EstimatorOptions, EstimatorV2
    from qscale.primitives import SamplerOptions, SamplerV2

    recorder = _recording(client)
    SamplerV2(client, options={"priority": "high"}).run([bell()], shots=10)
    SamplerV2(client).run([bell()], shots=10)
    backend = QScaleBackend(client, priority="low")
    backend.run(bell(), shots=10)
    backend.run(bell(), shots=10, priority="high")
    assert [r.priority for _, r in recorder.calls] == [HIGH, NORMAL, LOW, HIGH]
    estimator = EstimatorV2(client, options={"priority": "low"})
    assert estimator.options.priority == "low" and estimator.backend.options.priority == "low"

    for make in (lambda: SamplerOptions(priority="urgent"), lambda: EstimatorOptions(priority=0.5),
                 lambda: QScaleBackend(client, priority="soon"), lambda: backend.set_options(priority=9),
                 lambda: backend.run(bell(), shots=10, priority="later")):
        with pytest.raises(InvalidArgumentError, match="priority must be"):
            make()
    assert len(recorder.calls) == 4


def test_jobs_and_users_on_the_wire(client: Client) -> None:
    jobs = jobs_pb2.ListJobsReply(jobs=[jobs_pb2.JobStatus(job_id="a", user="alice", priority=HIGH, pruned=True)])
    users = jobs_pb2.ListUsersReply(users=[jobs_pb2.UserInfo(name="alice", weight=2.0, max_jobs=5),
                                           jobs_pb2.UserInfo(name="bob")])
    recorder = _recording(client, ListJobs=jobs, ListUsers=users)
    (job,) = client.jobs(10, user="alice")
    assert (job.user, job.priority, job.pruned) == ("alice", "high", True)
    assert job.to_dict()["priority"] == "high" and job.to_dict()["user"] == "alice"
    client.jobs()
    assert [(r.limit, r.user) for m, r in recorder.calls if m == "ListJobs"] == [(10, "alice"), (100, "")]
    alice, bob = client.users()
    assert alice == UserStatus("alice", 2.0, False, 0, 0, 0, 0.0, 5, 0, 0)
    assert bob.weight == 1.0 and bob.to_dict()["name"] == "bob"
    assert recorder.calls[-1] == ("ListUsers", jobs_pb2.ListUsersRequest())


# ------------------------------------------------------------------ the CLI

def _job(job_id: str, user: str = "alice", priority: int = NORMAL, **fields: Any) -> JobStatus:
    values: dict[str, Any] = dict(state=common_pb2.JOB_STATE_DONE, shots_total=100, shots_done=100, shards_total=2,
                                  shards_done=2, created_at=1000.0, finished_at=1001.0)
    values.update(fields)
    return JobStatus.from_proto(jobs_pb2.JobStatus(job_id=job_id, user=user, priority=priority, **values))


def _plain(text: str) -> str:
    return re.sub(r"\[/?[a-z ]+\]", "", text)  # rich's style tags


def test_jobs_listing_shows_users_and_priorities_where_they_differ() -> None:
    jobs = [_job("j3", "bob", HIGH, state=common_pb2.JOB_STATE_RUNNING, shots_done=40, finished_at=0.0),
            _job("j2", "alice", LOW, pruned=True), _job("j1", "alice")]
    title, columns, rows = cli._jobs_listing(jobs, 1002.0)
    assert title == "3 job(s)"
    assert [c.header for c in columns][:4] == ["job", "user", "state", "priority"]
    assert [[_plain(cell) for cell in row[:6]] for row in rows] == [
        ["j3", "bob", "running", "high", "40%", "40/100"],
        ["j2", "alice", "done", "low", "100%", "100/100"],
        ["j1", "alice", "done", "normal", "100%", "100/100"],
    ]
    assert rows[1][-1] == "results pruned by retention" and rows[0][-1] == ""
    (row,) = cli._jobs_listing([_job("j4", pruned=True, error="boom")], 1002.0)[2]
    assert row[-1] == "results pruned by retention; boom"

    # One user's jobs, all normal: neither column, the user in the title.
    title, columns, rows = cli._jobs_listing([_job("j2"), _job("j1")], 1002.0)
    assert title == "2 job(s) of user alice" and "user" not in [c.header for c in columns]
    assert "priority" not in [c.header for c in columns] and len(rows[0]) == len(columns)
    title, _, _ = cli._jobs_listing([], 1002.0, user="carol")
    assert title == "0 job(s) of user carol"
    # A coordinator that does not say who submitted: no user column, no name in the title.
    assert cli._jobs_listing([_job("j1", user="")], 1002.0)[0] == "1 job(s)"


def test_users_listing_shows_quotas_with_dashes_for_none(capsys: pytest.CaptureFixture[str]) -> None:
    users = [UserStatus.from_proto(u) for u in (
        jobs_pb2.UserInfo(name="alice", weight=2.0, jobs_unfinished=3, shots_queued=1_500_000, slots_busy=4,
                          slot_seconds=12.345, max_jobs=50, max_queued_shots=0, max_slots=8),
        jobs_pb2.UserInfo(name="ops", weight=0.5, admin=True, max_jobs=0),
        jobs_pb2.UserInfo(name="default", weight=0.0))]  # a weight left out reads as 1
    title, columns, rows = cli._users_listing(users)
    assert title == "3 user(s), 4 slot(s) busy" and len(columns) == 10
    assert rows == [
        ["alice", "2", "-", "3", "1,500,000", "4", "12.3", "50", "-", "8"],
        ["ops", "0.5", "yes", "0", "0", "0", "0.0", "-", "-", "-"],
        ["default", "1", "-", "0", "0", "0", "0.0", "-", "-", "-"],
    ]
    cli._print_listing(title, columns, rows)
    out = capsys.readouterr().out
    assert "3 user(s)" in out and "alice" in out and "1,500,000" in out and "max queued" in out


def test_status_line_names_user_priority_and_pruning() -> None:
    line = cli._status_line(_job("j1", "alice", HIGH, pruned=True))
    assert line == "j1 done: 100/100 shots, 2/2 shards (0 running), user alice, priority high; results pruned by " \
                   "retention"
    line = cli._status_line(_job("j2", "", NORMAL, state=common_pb2.JOB_STATE_FAILED, error="boom"))
    assert line == "j2 failed: 100/100 shots, 2/2 shards (0 running), priority normal; boom"
    assert _job("j3").state == JobState.DONE


@pytest.mark.parametrize(("argv", "expected"), [
    (["submit", "x.qasm", "--shots", "1", "--priority", "urgent"], "invalid choice: 'urgent'"),
    (["estimate", "x.qasm", "--observable", "Z", "--priority", "1"], "invalid choice: '1'"),
    (["jobs", "--user", "two words"], "argument --user: a user name is 1-64 characters"),
    (["jobs", "--user", "admin"], "a user name is"),
])
def test_bad_priority_or_user_is_a_usage_error(argv: list[str], expected: str,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == cli.EXIT_INPUT
    assert expected in capsys.readouterr().err


def test_parser_defaults() -> None:
    parser = cli._parser()
    assert parser.parse_args(["submit", "x.qasm", "--shots", "1"]).priority == "normal"
    assert parser.parse_args(["submit", "x.qasm", "--shots", "1", "--priority", "high"]).priority == "high"
    assert parser.parse_args(["jobs", "--user", "alice@example.org"]).user == "alice@example.org"
    assert parser.parse_args(["jobs"]).user is None
    assert parser.parse_args(["users"]).func is cli._users


def test_another_users_job_is_refused_plainly() -> None:
    text = cli._refused(PermissionDeniedError("job j1 belongs to another user"))
    assert text.startswith("job j1 belongs to another user") and "admin" in text
    text = cli._refused(PermissionDeniedError("/qscale.v1.JobService/GetJob needs a client token; this is a node "
                                              "token"))
    assert "probably a node's join token" in text


def test_commands_render_what_the_coordinator_answers(client: Client, monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """``status``, ``result``, ``jobs`` and ``users`` through ``main``, on canned replies."""
    pruned = jobs_pb2.JobStatus(job_id="j1", state=common_pb2.JOB_STATE_DONE, shots_total=10, shots_done=10,
                                user="alice", priority=HIGH, pruned=True)
    recorder = _recording(client, GetJob=pruned, ListJobs=jobs_pb2.ListJobsReply(jobs=[pruned]),
                          ListUsers=jobs_pb2.ListUsersReply(users=[jobs_pb2.UserInfo(name="alice", weight=2)]))
    monkeypatch.setattr(cli, "_client", lambda args: client)

    assert cli.main(["status", "j1"]) == cli.EXIT_OK
    assert "user alice, priority high; results pruned by retention" in capsys.readouterr().out
    assert cli.main(["result", "j1"]) == cli.EXIT_INPUT
    err = capsys.readouterr().err
    assert "its results were pruned by the coordinator's retention" in err and "status j1" in err
    assert not any(m == "GetResult" for m, _ in recorder.calls)

    assert cli.main(["jobs", "--user", "alice", "--limit", "5"]) == cli.EXIT_OK
    out = capsys.readouterr().out
    assert "1 job(s) of user alice" in out and "high" in out and "results pruned by retention" in out
    assert [(r.limit, r.user) for m, r in recorder.calls if m == "ListJobs"] == [(5, "alice")]
    assert cli.main(["jobs", "--json"]) == cli.EXIT_OK
    (row,) = json.loads(capsys.readouterr().out)
    assert (row["user"], row["priority"], row["pruned"]) == ("alice", "high", True)

    assert cli.main(["users"]) == cli.EXIT_OK
    out = capsys.readouterr().out
    assert "1 user(s), 0 slot(s) busy" in out and "alice" in out
    assert cli.main(["users", "--json"]) == cli.EXIT_OK
    (user,) = json.loads(capsys.readouterr().out)
    assert user == {"name": "alice", "weight": 2.0, "admin": False, "jobs_unfinished": 0, "shots_queued": 0,
                    "slots_busy": 0, "slot_seconds": 0.0, "max_jobs": 0, "max_queued_shots": 0, "max_slots": 0}
