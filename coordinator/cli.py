"""``qscale-coordinator`` (alias ``qscale``): serve a coordinator, or talk to one.

    qscale-coordinator serve [--listen HOST:PORT] [--state-dir DIR] ...
    qscale-coordinator run FILE... --shots N [--seed S] --local-nodes K
    qscale-coordinator submit FILE... --shots N [--seed S] [--priority low|normal|high] [--wait]
    qscale-coordinator watch JOB [--top N] [--interval S]
    qscale-coordinator status|result|cancel JOB
    qscale-coordinator nodes|users
    qscale-coordinator jobs [--user NAME]
    qscale-coordinator tls-init DIR --host NAME [--host NAME ...] [--client NAME] [--node NAME]

Every client command takes ``--coordinator ADDR`` (default ``$QSCALE_COORDINATOR``),
``--json``, ``--token-file`` (default ``$QSCALE_CLIENT_TOKEN`` / ``$QSCALE_CLIENT_TOKEN_FILE``),
``--tls-ca/--tls-cert/--tls-key`` and ``--connect-timeout`` (default ``$QSCALE_CONNECT_TIMEOUT`` or
5 s: how long to wait for a coordinator that does not answer at all); tokens are never taken as
flags. Exit codes: 0 success, 1 the job failed or was cancelled, 2 bad input, 3 coordinator
unavailable (nothing answers, or TLS settings that do not match: the message says which),
4 other errors (a quota reached included), 5 credentials refused (no or a wrong API token, a
token of the node role, or another user's job without an admin token), 130 interrupted (Ctrl-C;
the job goes on).

``watch``, and ``submit --wait`` / ``run`` while they wait, draw a live progress bar
(:mod:`qscale.progress`) when stdout is a terminal and ``--json`` is not given. ``watch --json``
prints JSON Lines: one object per update, the last one with the final state; ``watch`` into a
pipe or file prints a plain line now and then and one at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

import qscale._grpc_env  # noqa: F401  (first: quiets gRPC's own log lines before grpc loads)
from qscale import errors
from qscale._version import __version__
from qscale.logs import configure_logging

__all__ = ["main"]

log = logging.getLogger(__name__)

EXIT_OK, EXIT_JOB, EXIT_INPUT, EXIT_UNAVAILABLE, EXIT_OTHER, EXIT_AUTH = 0, 1, 2, 3, 4, 5
EXIT_INTERRUPTED = 130
EXIT_PIPE = 141  # stdout closed early, as a command killed by SIGPIPE reports it
_BAR_TOP = 5  # outcomes per circuit under the bar of ``submit --wait`` and ``run``


def _console(stderr: bool = False) -> Console:
    """A rich console; wide when the output is a file or a pipe, so ids are never wrapped."""
    stream = sys.stderr if stderr else sys.stdout
    return Console(stderr=stderr, width=None if stream.isatty() else 160)


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, sort_keys=False))


# ------------------------------------------------------------------- serve

def _serve(args: argparse.Namespace) -> int:
    from qscale.coordinator.config import CoordinatorConfig, Limits, Planning
    from qscale.coordinator.server import CoordinatorServer
    from qscale.settings import flag_values

    config = CoordinatorConfig.from_env(**flag_values(args, CoordinatorConfig, Limits, Planning))
    if args.print_config:
        _print_json(config.to_dict())  # tokens show as <hidden>; file paths are fine
        return EXIT_OK
    configure_logging(config.log_level, config.log_format)
    address_file = config.address_file

    async def serve() -> None:
        server = CoordinatorServer(config)
        address = await server.start()
        # A coordinator holds many long-lived objects (nodes, up to 1,000 finished jobs): collect
        # young objects less often and never rescan what start-up created. Measured with
        # benchmarks/scale.py, full collections otherwise pause the event loop up to 235 ms.
        gc.collect()
        gc.freeze()
        gc.set_threshold(20_000, 20, 20)
        # Intake threads (decoding replies, writing jobs) share the GIL with the event loop: hand
        # it back sooner so that heartbeats are not held up behind them.
        sys.setswitchinterval(0.001)
        if address_file:
            Path(address_file).write_text(address + "\n")
        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stopping.set)
        await stopping.wait()
        log.info("shutting down")
        await server.stop(grace=5.0)

    asyncio.run(serve())
    return EXIT_OK


# ------------------------------------------------------------------ client

def _client(args: argparse.Namespace) -> Any:
    from qscale.client import Client
    from qscale.settings import ClientSettings, flag_values

    settings = ClientSettings.from_env(**flag_values(args, ClientSettings))
    return Client(settings.coordinator, token=settings.resolved_token(), tls=settings.tls_config(),
                  connect_timeout=settings.connect_timeout_s)


def _share(count: int, shots: int) -> str:
    """``count`` of ``shots`` as a share people can read at any scale, never 0 unless the count
    is: 4 decimals from 0.001 up (``0.5017``), 3 significant digits below (``1.00e-04``)."""
    if count <= 0:
        return "0"
    share = count / max(1, shots)
    return f"{share:.4f}" if share >= 0.001 else f"{share:.2e}"


def _plan_line(result: Any) -> str | None:
    """Why the job has its shards (the planner's own words), and how to spread it further."""
    plan = result.status.plan
    if plan is None or not plan.explanation:
        return None
    hint = "; --shots-per-shard N spreads it further" if plan.limit == "min_shard_cost" and plan.splittable else ""
    return plan.explanation + hint


def _render_result(result: Any, console: Console, top: int) -> None:
    for r in result.results:
        ran = f", {r.method} method" if r.method else ""
        console.print(f"circuit {r.index} {escape(repr(r.name))}: {r.shots} shots, {len(r.outcomes)} distinct "
                      f"outcomes{escape(ran)}", soft_wrap=True)
        if top == 0:
            continue
        table = Table()
        table.add_column("outcome", style="cyan")
        table.add_column("count", justify="right")
        table.add_column("share", justify="right")
        for key, value in r.most_frequent(top):
            table.add_row(key, str(value), _share(value, r.shots))
        console.print(table)
    s = result.status
    console.print(f"job {result.job_id}: {result.shots} shots, {s.shards_total} shards, {len(result.attempts)} "
                  f"attempts, {len(result.nodes_used)} nodes, {result.wall_time_s:.2f} s (seed {result.seed})")
    why = _plan_line(result)
    if why:
        console.print(escape(why), soft_wrap=True)


def _submit(args: argparse.Namespace) -> int:
    """``submit``: print the job id, or with ``--wait`` the result (see :func:`_wait_for_result`)."""
    if args.wait:
        _check_plot(args)
    client = _client(args)
    job = client.submit_files(args.files, shots=args.shots, seed=args.seed, method=args.method,
                              shots_per_shard=args.shots_per_shard, priority=args.priority)
    if not args.wait:
        if args.json:
            _print_json({"job_id": job.job_id, "seed": job.seed})
        else:
            print(job.job_id)
        return EXIT_OK
    try:
        result = _wait_for_result(job, args)
    except KeyboardInterrupt:
        return _interrupted(job.job_id)
    return _show_result(result, args)


def _estimate(args: argparse.Namespace) -> int:
    """``estimate FILE --observable P ...``: exact (or, with ``--precision``, sampled) expectation
    values of Pauli observables for every circuit of a file, and what cutting did."""
    from qiskit.quantum_info import SparsePauliOp

    from qscale.client import circuits_from_file
    from qscale.estimator import EstimatorV2
    from qscale.primitives import QScalePrimitiveJob

    circuits = circuits_from_file(args.file)
    for circuit in circuits:
        for label in args.observable:
            if len(label) != circuit.num_qubits or label.strip("IXYZ"):
                raise errors.InvalidArgumentError(
                    f"--observable {label!r}: {circuit.name!r} has {circuit.num_qubits} qubits; give one letter of "
                    "IXYZ per qubit, qubit 0 rightmost")
    estimator = EstimatorV2(_client(args), seed=args.seed,
                            options={"max_subexperiments": args.max_subexperiments,
                                     "method": args.method or "automatic", "priority": args.priority})
    pubs = [(circuit, [SparsePauliOp(label) for label in args.observable]) for circuit in circuits]
    job = estimator.run(pubs, precision=args.precision)
    try:
        # A sampled estimate is Qiskit's own job (BackendEstimatorV2), whose result() has no timeout.
        result = job.result(timeout=args.timeout) if isinstance(job, QScalePrimitiveJob) else job.result()
    except KeyboardInterrupt:
        return _interrupted(job.job_id())
    rows = [{"circuit": circuit.name, "num_qubits": circuit.num_qubits,
             "values": [{"observable": label, "value": float(ev), "std": float(sd)}
                        for label, ev, sd in zip(args.observable, pub.data.evs, pub.data.stds)],
             **({"cutting": pub.metadata["cutting"]} if "cutting" in pub.metadata else {})}
            for circuit, pub in zip(circuits, result)]
    if args.json:
        _print_json({"job_id": result.metadata.get("job_id", ""), "precision": args.precision or 0.0,
                     "seed": result.metadata.get("seed"), "results": rows})
        return EXIT_OK
    console = _console()
    for row in rows:
        console.print(f"{escape(repr(row['circuit']))}: {row['num_qubits']} qubits")
        table = Table()
        table.add_column("observable", style="cyan")
        table.add_column("value", justify="right")
        table.add_column("std error", justify="right")
        for item in row["values"]:
            table.add_row(item["observable"], f"{item['value']:.12g}", f"{item['std']:.3g}")
        console.print(table)
        if "cutting" in row:
            cut = row["cutting"]
            console.print(f"cut into {len(cut.get('subcircuit_widths', ()))} subcircuits of "
                          f"{cut.get('subcircuit_widths')} qubits: {cut.get('cuts')} cuts, "
                          f"{cut.get('subexperiments')} subexperiments, sampling overhead "
                          f"{cut.get('sampling_overhead', 0):.4g}")
    meta = result.metadata
    if "job_id" in meta:
        console.print(f"job {meta['job_id']}: exact, {meta['shards']} shards, {len(meta['nodes_used'])} nodes")
    else:
        console.print(f"sampled estimate, target precision {args.precision:g} (seed {args.seed})")
    return EXIT_OK


def _show_bar(args: argparse.Namespace) -> bool:
    """Whether to draw the live bar: stdout is a terminal and ``--json`` was not given."""
    return not args.json and sys.stdout.isatty()


def _interrupted(job_id: str) -> int:
    print(f"\ninterrupted; job {job_id} goes on (stop it with: qscale-coordinator cancel {job_id})",
          file=sys.stderr)
    return EXIT_INTERRUPTED


def _wait_for_result(job: Any, args: argparse.Namespace) -> Any:
    """The job's result; with the live bar (see :func:`_show_bar`) while it runs."""
    if not _show_bar(args):
        return job.result(timeout=args.timeout)
    from qscale.progress import BarView, follow

    deadline = None if args.timeout is None else time.monotonic() + args.timeout
    with BarView(_console(), top=_BAR_TOP, keep_outcomes=False) as view:
        final = follow(job, view, top=_BAR_TOP, timeout=args.timeout)
        try:
            result = job.result(timeout=None if deadline is None else max(0.0, deadline - time.monotonic()))
        except errors.QScaleError:
            view.finish(final)
            raise
        view.finish(final, result.nodes_used)
    return result


def _watch(args: argparse.Namespace) -> int:
    """``watch JOB``: follow a job until it is final; exit 0 if done, 1 if failed or cancelled."""
    from qscale.progress import BarView, JsonLinesView, PlainView, ProgressView, follow
    from qscale.results import JobState

    client = _client(args)
    job = client.job(args.job)  # fails at once on a wrong address or job id
    view: ProgressView
    if args.json:
        view = JsonLinesView(sys.stdout, top=args.top, interval=args.interval or 0.0)
    elif sys.stdout.isatty():
        view = BarView(_console(), top=args.top)
    else:
        view = PlainView(sys.stdout, interval=10.0 if args.interval is None else args.interval)
    try:
        with view:
            final = follow(job, view, top=args.top, timeout=args.timeout)
            nodes_used = None
            if final.status.state == JobState.DONE:
                try:
                    nodes_used = job.result(timeout=client.timeout).nodes_used
                except errors.QScaleError as exc:  # the summary is still worth printing without them
                    log.debug("no result for job %s: %s", job.job_id, exc)
            view.finish(final, nodes_used)
    except KeyboardInterrupt:
        return _interrupted(job.job_id)
    status = final.status
    if status.state == JobState.FAILED:
        raise errors.JobFailedError(f"job {status.job_id} failed: {status.error}", status.job_id)
    if status.state == JobState.CANCELLED:
        raise errors.JobCancelledError(f"job {status.job_id} was cancelled", status.job_id)
    return EXIT_OK


def _show_result(result: Any, args: argparse.Namespace) -> int:
    if getattr(args, "output", None):
        Path(args.output).write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    if getattr(args, "plot", None):
        _plot(result, Path(args.plot), args.top)
    if args.json:
        _print_json(result.to_dict())
    else:
        _render_result(result, _console(), args.top)
    return EXIT_OK


_NO_MATPLOTLIB = "--plot needs matplotlib; install it with: pip install 'qscale[plot]'"


def _check_plot(args: argparse.Namespace) -> None:
    """Fail before submitting or waiting when ``--plot`` is given and matplotlib is missing."""
    import importlib.util

    if getattr(args, "plot", None):
        try:
            found = importlib.util.find_spec("matplotlib") is not None
        except (ImportError, ValueError):  # ValueError: a module set to None in sys.modules
            found = False
        if not found:
            raise errors.FailedPreconditionError(_NO_MATPLOTLIB)


def _plot(result: Any, path: Path, top: int) -> None:
    """A histogram of the most frequent outcomes of every circuit (matplotlib, the ``plot`` extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        from qiskit.visualization import plot_histogram
    except ImportError:
        raise errors.FailedPreconditionError(_NO_MATPLOTLIB) from None
    counts = []
    for r in result.results:  # only the outcomes shown are formatted; the others make one "rest" bar
        shown = dict(r.most_frequent(top))
        rest = r.shots - sum(shown.values())
        counts.append({**shown, **({"rest": rest} if rest > 0 else {})})
    legend = [f"{r.index}: {r.name}" for r in result.results] if len(counts) > 1 else None
    figure = plot_histogram(counts, legend=legend, bar_labels=len(counts) == 1,
                            title=f"job {result.job_id}: {result.shots} shots", figsize=(10, 5))
    figure.savefig(path, dpi=120, bbox_inches="tight")


_PRUNED = "results pruned by retention"


def _status_line(status: Any) -> str:
    """``status JOB``'s line: state, progress, who submitted it at what priority, and what
    retention left of it."""
    who = [f"user {status.user}"] if status.user else []
    who += [f"priority {status.priority}"]
    return (f"{status.job_id} {status.state.value}: {status.shots_done}/{status.shots_total} shots, "
            f"{status.shards_done}/{status.shards_total} shards ({status.shards_running} running), "
            f"{', '.join(who)}" + (f"; {_PRUNED}" if status.pruned else "")
            + (f"; {status.error}" if status.error else ""))


def _status(args: argparse.Namespace) -> int:
    status = _client(args).job(args.job).status()
    if args.json:
        _print_json(status.to_dict())
    else:
        print(_status_line(status))
    return EXIT_OK


def _result(args: argparse.Namespace) -> int:
    """``result``: a finished job's result (``--wait`` for an unfinished one)."""
    from qscale.client import Job

    _check_plot(args)
    job = Job(_client(args), args.job)
    status = job.status()  # fails at once on a wrong address or job id
    if status.pruned:
        raise errors.FailedPreconditionError(
            f"job {status.job_id} is {status.state.value}, but its results were pruned by the coordinator's "
            f"retention (--keep-jobs, --keep-jobs-for): only its status is left (qscale-coordinator status "
            f"{status.job_id})")
    if not args.wait:
        if not status.state.final:
            raise errors.FailedPreconditionError(
                f"job {status.job_id} is {status.state.value}; pass --wait to wait for it")
    return _show_result(job.result(timeout=args.timeout), args)


def _cancel(args: argparse.Namespace) -> int:
    status = _client(args).job(args.job).cancel()
    if args.json:
        _print_json(status.to_dict())
    else:
        print(f"{status.job_id} {status.state.value}")
    return EXIT_OK


@dataclasses.dataclass(frozen=True)
class _Col:
    """A column of a listing: ``kind`` is ``text`` (left, never wraps), ``num`` (right, never
    wraps) or ``fold`` (left, wraps when narrow); ``drop`` orders the columns left out, first
    to last, when the terminal is too narrow for all (None: always shown)."""

    header: str
    kind: str = "num"
    drop: int | None = None


def _print_listing(title: str, columns: Sequence[_Col], rows: Sequence[Sequence[str]]) -> None:
    """Print an aligned table (a rule under the header, no vertical lines); on a terminal too
    narrow for every column, the optional ones are left out rather than squeezed."""
    from rich import box

    console = _console()
    shown = list(columns)
    while True:
        table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False,
                      collapse_padding=True)
        for col in shown:
            fold = col.kind == "fold"
            table.add_column(col.header, justify="right" if col.kind == "num" else "left", no_wrap=not fold,
                             overflow="fold" if fold else "ellipsis", min_width=12 if fold else None,
                             max_width=60 if fold else None)
        index = [columns.index(col) for col in shown]
        for row in rows:
            table.add_row(*(row[i] for i in index))
        optional = [col for col in shown if col.drop is not None]
        # Unwrapped width, a folding column counted at its least (12) only.
        natural = console.measure(table, options=console.options.update_width(100_000)).maximum
        folded = sum(max(0, min(60, max((len(row[columns.index(col)]) for row in rows), default=0)) - 12)
                     for col in shown if col.kind == "fold")
        if not optional or natural - folded <= console.width:
            break
        shown.remove(min(optional, key=lambda col: col.drop or 0))
    console.print(table)


def _age(seconds: float) -> str:
    """A short duration: ``0.4 s``, ``12.3 s``, ``4m 05s``, ``3h 02m``."""
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.1f} s"
    whole = int(seconds)
    if whole < 3600:
        return f"{whole // 60}m {whole % 60:02d}s"
    return f"{whole // 3600}h {whole // 60 % 60:02d}m"


def _when(timestamp: float, now: float) -> str:
    """A local time: ``09:14:51`` today, ``2026-11-23 09:14`` before."""
    local = time.localtime(timestamp)
    if time.strftime("%Y-%m-%d", local) == time.strftime("%Y-%m-%d", time.localtime(now)):
        return time.strftime("%H:%M:%S", local)
    return time.strftime("%Y-%m-%d %H:%M", local)


_STATE_STYLES = {"alive": "green", "draining": "yellow", "lost": "red", "done": "green", "failed": "red",
                 "cancelled": "yellow", "running": "cyan", "queued": "dim"}


def _state_cell(state: str) -> str:
    style = _STATE_STYLES.get(state)
    return f"[{style}]{state}[/{style}]" if style else escape(state)


def _nodes(args: argparse.Namespace) -> int:
    """``nodes``: every node the coordinator knows, as a table (or JSON with ``--json``)."""
    nodes = _client(args).nodes()
    if args.json:
        _print_json([n.to_dict() for n in nodes])
        return EXIT_OK
    columns = [_Col("node", "text"), _Col("host", "fold", drop=4), _Col("state", "text"), _Col("slots", drop=3),
               _Col("running"), _Col("cores", drop=2), _Col("memory", drop=5), _Col("max sv\nqubits", drop=1),
               _Col("last\nheartbeat"), _Col("shards\ndone")]
    rows = [[escape(n.node_id), escape(n.hostname), _state_cell(n.state), str(n.slots), str(n.running),
             str(n.cores),
             f"{n.memory_budget_bytes / 2**30:.1f} GiB", str(n.max_statevector_qubits),
             f"{_age(n.last_heartbeat_age_s)} ago", f"{n.shards_done:,}"] for n in nodes]
    _print_listing(f"{sum(n.state == 'alive' for n in nodes)} node(s) alive", columns, rows)
    return EXIT_OK


_PRIORITY_STYLES = {"high": "bold", "low": "dim"}


def _jobs_listing(jobs: Sequence[Any], now: float, user: str | None = None
                  ) -> tuple[str, list[_Col], list[list[str]]]:
    """The title, columns and rows of ``jobs``: a user column unless every job is one user's,
    a priority column when some job is not of normal priority."""
    from qscale.progress import percent_done

    users = {j.user for j in jobs}
    show_user = len(users) > 1
    show_priority = any(j.priority != "normal" for j in jobs)
    columns = [_Col("job", "text")]
    columns += [_Col("user", "text", drop=4)] if show_user else []
    columns += [_Col("state", "text")]
    columns += [_Col("priority", "text", drop=5)] if show_priority else []
    columns += [_Col("progress"), _Col("shots"), _Col("shards", drop=2), _Col("created", "text", drop=1),
                _Col("wall time", drop=3), _Col("error", "fold")]
    rows = []
    for j in jobs:
        wall = (j.finished_at if j.finished_at else now) - j.created_at  # so far, for a job not yet final
        style = _PRIORITY_STYLES.get(j.priority)
        row = [escape(j.job_id)]
        row += [escape(j.user or "-")] if show_user else []
        row += [_state_cell(j.state.value)]
        row += [f"[{style}]{j.priority}[/{style}]" if style else escape(j.priority)] if show_priority else []
        note = "; ".join(text for text in (_PRUNED if j.pruned else "", j.error) if text)
        row += [f"{percent_done(j):.0f}%", f"{j.shots_done:,}/{j.shots_total:,}",
                f"{j.shards_done}/{j.shards_total}" if j.shards_total else "-", _when(j.created_at, now),
                _age(wall), escape(note[:120])]
        rows.append(row)
    owner = user or (next(iter(users)) if len(users) == 1 and jobs and jobs[0].user else None)
    title = f"{len(jobs)} job(s)" + (f" of user {escape(owner)}" if owner else "")
    return title, columns, rows


def _jobs(args: argparse.Namespace) -> int:
    """``jobs``: the newest jobs, newest first, as a table (or JSON with ``--json``)."""
    jobs = _client(args).jobs(limit=args.limit, user=args.user)
    if args.json:
        _print_json([j.to_dict() for j in jobs])
        return EXIT_OK
    _print_listing(*_jobs_listing(jobs, time.time(), args.user))
    return EXIT_OK


def _quota(value: int) -> str:
    return f"{value:,}" if value > 0 else "-"


def _users_listing(users: Sequence[Any]) -> tuple[str, list[_Col], list[list[str]]]:
    """The title, columns and rows of ``users``: each user's share, use now and quotas ("-": none)."""
    columns = [_Col("user", "text"), _Col("weight"), _Col("admin", "text", drop=4), _Col("jobs\nunfinished"),
               _Col("shots\nqueued"), _Col("slots\nbusy"), _Col("slot-\nseconds", drop=5),
               _Col("max\njobs", drop=3), _Col("max queued\nshots", drop=1), _Col("max\nslots", drop=2)]
    rows = [[escape(u.name), f"{u.weight:g}", "yes" if u.admin else "-", f"{u.jobs_unfinished:,}",
             f"{u.shots_queued:,}", f"{u.slots_busy:,}", f"{u.slot_seconds:,.1f}", _quota(u.max_jobs),
             _quota(u.max_queued_shots), _quota(u.max_slots)] for u in users]
    busy = sum(u.slots_busy for u in users)
    return f"{len(users)} user(s), {busy:,} slot(s) busy", columns, rows


def _users(args: argparse.Namespace) -> int:
    """``users``: the coordinator's users (every one for an admin, else the caller), as a table
    (or JSON with ``--json``)."""
    users = _client(args).users()
    if args.json:
        _print_json([u.to_dict() for u in users])
        return EXIT_OK
    _print_listing(*_users_listing(users))
    return EXIT_OK


# -------------------------------------------------------------------- run

def _run(args: argparse.Namespace) -> int:
    """``run``: start a local cluster, run the files on it (live bar on a terminal), print the result."""
    from qscale.coordinator.config import CoordinatorConfig
    from qscale.local import LocalCluster

    if args.local_nodes < 1:
        raise errors.InvalidArgumentError("--local-nodes must be at least 1")
    _check_plot(args)
    config = CoordinatorConfig.from_env(state_dir=args.state_dir)  # the rest from $QSCALE_*, as for serve
    configure_logging(args.log_level, config.log_format)
    console = _console(stderr=True)
    started = time.perf_counter()
    with LocalCluster(args.local_nodes, slots_per_node=args.slots_per_node, config=config) as cluster:
        ready = time.perf_counter()
        if not args.json:
            console.print(f"local cluster: coordinator {cluster.address}, {args.local_nodes} node(s) "
                          f"up in {ready - started:.1f} s")
        job = cluster.client.submit_files(args.files, shots=args.shots, seed=args.seed, method=args.method,
                                          shots_per_shard=args.shots_per_shard)
        result = _wait_for_result(job, args)
    code = _show_result(result, args)
    if not args.json:
        console.print(f"total wall time {time.perf_counter() - started:.1f} s (cluster start, job, shutdown)")
    return code


# --------------------------------------------------------------- tls-init

def _tls_init(args: argparse.Namespace) -> int:
    """``tls-init``: write a new CA, the coordinator's certificate and client and node
    certificates into a directory, then print how to use them."""
    from qscale.certificates import DEFAULT_CLIENTS, DEFAULT_NODES, usage_text, write_tls_files

    files = write_tls_files(args.directory, args.host, clients=args.client or DEFAULT_CLIENTS,
                            nodes=args.node or DEFAULT_NODES, days=args.days, force=args.force)
    print(usage_text(files))
    return EXIT_OK


# ----------------------------------------------------------------- parser

PRIORITY_CHOICES = ("low", "normal", "high")


def _user_name(text: str) -> str:
    """``--user NAME``: a user name as token files write them."""
    from qscale.security import check_user_name

    try:
        return check_user_name(text.strip(), "--user")
    except errors.InvalidArgumentError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("--user: ")) from None


def _top(text: str) -> int:
    """``--top N``: outcomes shown per circuit, 0 for none."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a whole number, 0 or more (0: no outcomes shown), not {text!r}")
    return value


def _parser() -> argparse.ArgumentParser:
    """The ``qscale-coordinator`` parser. Settings get their flags and help (with their variable
    and default) from their one definition, via :func:`qscale.settings.add_flags`."""
    from qscale.coordinator.config import CoordinatorConfig, Limits, Planning
    from qscale.security import refuse_secret_options
    from qscale.settings import ClientSettings, add_flags

    parser = argparse.ArgumentParser(prog="qscale-coordinator", description="qscale coordinator and client CLI")
    parser.add_argument("--version", action="version", version=f"qscale {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    client_opts = argparse.ArgumentParser(add_help=False)
    add_flags(client_opts, ClientSettings)
    client_opts.add_argument("--json", action="store_true", help="machine-readable output")
    refuse_secret_options(client_opts, "--token",
                          hint="use --token-file FILE, $QSCALE_CLIENT_TOKEN or $QSCALE_CLIENT_TOKEN_FILE")

    job_opts = argparse.ArgumentParser(add_help=False)
    job_opts.add_argument("files", nargs="+", metavar="FILE", help=".qpy or OpenQASM 2/3 .qasm files")
    job_opts.add_argument("--shots", type=int, required=True, help="shots per circuit")
    job_opts.add_argument("--seed", type=int, help="seed for reproducible counts")
    job_opts.add_argument("--method", help="Aer method (default: automatic)")
    job_opts.add_argument("--shots-per-shard", type=int, metavar="N",
                          help="at most N shots of a circuit per shard where each shot costs a simulation (the "
                               "stabilizer method, noise, mid-circuit measurement): spreads a small job over more "
                               "nodes (default: the coordinator's setting; with both, the smaller wins). Seeded "
                               "counts are the same for the same N on any number of nodes")
    job_opts.add_argument("--top", type=_top, default=10, help="outcomes to show per circuit (default 10)")
    job_opts.add_argument("--timeout", type=float, metavar="SECONDS",
                          help="seconds to wait for the result (default: no limit)")
    job_opts.add_argument("--output", metavar="FILE.json", help="also write the result as JSON to this file")
    job_opts.add_argument("--plot", metavar="FILE.png", help="also write a histogram of the counts (needs matplotlib)")

    p = sub.add_parser("serve", help="run a coordinator",
                       epilog="Every setting also comes from the QSCALE_* variable named in its help; flags win "
                              "over variables, which win over defaults. Tokens never come from flags.")
    add_flags(p, CoordinatorConfig, Limits, Planning)
    p.add_argument("--print-config", action="store_true",
                   help="print the effective configuration as JSON (tokens hidden) and exit")
    refuse_secret_options(p, "--token", "--node-token", "--client-token",
                          hint="put tokens in --node-tokens-file / --client-tokens-file or in "
                               "$QSCALE_NODE_TOKEN / $QSCALE_CLIENT_TOKEN")
    p.set_defaults(func=_serve)

    p = sub.add_parser("run", parents=[job_opts], help="run files on an embedded local cluster")
    p.add_argument("--local-nodes", type=int, required=True, help="local node processes to start")
    p.add_argument("--slots-per-node", type=int, default=1, metavar="N",
                   help="slots of each local node: shards it runs at once (default 1)")
    p.add_argument("--state-dir", metavar="DIR",
                   help="keep the coordinator state here (default $QSCALE_STATE_DIR, else a temporary directory; "
                        "the other settings of serve come from their QSCALE_* variables too)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--log-level", default="WARNING", metavar="LEVEL",
                   help="logging of the local cluster: DEBUG, INFO, WARNING or ERROR (default WARNING)")
    p.set_defaults(func=_run)

    priority_help = ("the job's priority class: the coordinator runs higher classes first and, within a class, "
                     "shares the cluster between users by their weights (default: normal)")
    p = sub.add_parser("submit", parents=[client_opts, job_opts], help="submit files as a job")
    p.add_argument("--wait", action="store_true",
                   help="wait and print the result (with a live progress bar on a terminal, unless --json)")
    p.add_argument("--priority", choices=PRIORITY_CHOICES, default="normal", help=priority_help)
    p.set_defaults(func=_submit)

    p = sub.add_parser("estimate", parents=[client_opts], help="expectation values of Pauli observables",
                       description="Exact expectation values (or, with --precision, a sampled estimate) of Pauli "
                                   "observables for every circuit of a file. A circuit wider than every node is "
                                   "cut into subcircuits that fit, and its values reconstructed.")
    p.add_argument("file", metavar="FILE", help=".qpy or OpenQASM 2/3 .qasm file (measurements are ignored)")
    p.add_argument("--observable", action="append", required=True, metavar="PAULI",
                   help="a Pauli label, one letter of IXYZ per qubit, qubit 0 rightmost; repeat for more")
    p.add_argument("--precision", type=float, default=0.0,
                   help="0 (default): exact values; > 0: a sampled estimate with this standard error")
    p.add_argument("--seed", type=int, help="seed for a reproducible sampled estimate")
    p.add_argument("--method", help="Aer method (default: automatic)")
    p.add_argument("--max-subexperiments", type=int, default=10_000, metavar="N",
                   help="cut a circuit wider than every node only if it needs at most N subexperiments; "
                        "otherwise it runs uncut on the matrix-product-state method (default 10000)")
    p.add_argument("--timeout", type=float, help="seconds to wait for the values")
    p.add_argument("--priority", choices=PRIORITY_CHOICES, default="normal", help=priority_help)
    p.set_defaults(func=_estimate)

    for name, func, text in (("status", _status, "a job's status"), ("cancel", _cancel, "cancel a job")):
        p = sub.add_parser(name, parents=[client_opts], help=text)
        p.add_argument("job", help="job id (as submit prints it)")
        p.set_defaults(func=func)

    p = sub.add_parser("watch", parents=[client_opts], help="follow a job's progress until it ends",
                       description="Follow a job until it is done, failed or cancelled. On a terminal: a live bar "
                                   "(shots, shards, nodes, rate, ETA) and the most frequent outcomes so far. With "
                                   "--json: JSON Lines, one status object per update, the last one final. Into a "
                                   "pipe or file: a plain line now and then and one at the end. Survives "
                                   "coordinator restarts. Exit 0 if the job is done, 1 if it failed or was "
                                   "cancelled, 130 on Ctrl-C (the job goes on).")
    p.add_argument("job", help="job id (as submit prints it)")
    p.add_argument("--top", type=_top, default=5, metavar="N",
                   help="most frequent outcomes shown per circuit, also in --json's 'top' (default 5; 0: none)")
    p.add_argument("--interval", type=float, metavar="SECONDS",
                   help="least seconds between two printed updates with --json or into a pipe or file "
                        "(default: every update with --json, 10 otherwise); the final state always prints")
    p.add_argument("--timeout", type=float, metavar="SECONDS",
                   help="give up after this many seconds, exit 4 (the job goes on; default: no limit)")
    p.set_defaults(func=_watch)

    p = sub.add_parser("result", parents=[client_opts], help="a finished job's result")
    p.add_argument("job", help="job id (as submit prints it)")
    p.add_argument("--wait", action="store_true", help="wait for the job to finish")
    p.add_argument("--timeout", type=float, metavar="SECONDS",
                   help="seconds to wait for the result (the job goes on after; default: no limit)")
    p.add_argument("--top", type=_top, default=10, help="outcomes to show (and plot) per circuit (default 10)")
    p.add_argument("--output", metavar="FILE.json", help="also write the result as JSON to this file")
    p.add_argument("--plot", metavar="FILE.png", help="write a histogram of the counts (needs matplotlib)")
    p.set_defaults(func=_result)

    p = sub.add_parser("nodes", parents=[client_opts], help="list nodes")
    p.set_defaults(func=_nodes)
    p = sub.add_parser("jobs", parents=[client_opts], help="list recent jobs",
                       description="The newest jobs, newest first: your own, or every user's with an admin token "
                                   "(or on a coordinator without authentication).")
    p.add_argument("--limit", type=int, default=50, metavar="N", help="newest jobs to list (default 50)")
    p.add_argument("--user", type=_user_name, metavar="NAME",
                   help="only the jobs of this user (the name of their API token in the coordinator's client "
                        "tokens file; only an admin sees other users' jobs)")
    p.set_defaults(func=_jobs)
    p = sub.add_parser("users", parents=[client_opts], help="list users, their use of the cluster and their quotas",
                       description="The users of a shared coordinator: weight (share of the cluster relative to "
                                   "other users), admin, unfinished jobs, queued shots, busy slots, slot-seconds used "
                                   "since the coordinator started, and their quotas ('-': none). An admin sees every "
                                   "user, anyone else themselves.")
    p.set_defaults(func=_users)

    p = sub.add_parser("tls-init", help="write a CA and certificates for TLS and mutual TLS",
                       description="Make a new CA and write, into DIR: ca.pem and ca-key.pem, the coordinator's "
                                   "server.pem and server-key.pem naming every --host, and NAME.pem and "
                                   "NAME-key.pem for each --client and --node (certificates they present to a "
                                   "mutual-TLS coordinator). Keys are written with mode 600. Then prints the "
                                   "flags and variables that use them. Refuses to replace existing files "
                                   "unless --force is given.")
    p.add_argument("directory", metavar="DIR", help="where to write the files (created with mode 700 if missing)")
    p.add_argument("--host", action="append", required=True, metavar="NAME",
                   help="a DNS name or IP address that nodes and clients dial to reach the coordinator; repeat "
                        "for each (e.g. --host coordinator.example --host 10.0.0.5; add --host localhost "
                        "--host 127.0.0.1 to dial it locally too). The certificate names exactly these")
    p.add_argument("--client", action="append", metavar="NAME",
                   help="write a client certificate NAME.pem and NAME-key.pem; repeat for more (default: one "
                        "named client)")
    p.add_argument("--node", action="append", metavar="NAME",
                   help="write a node certificate NAME.pem and NAME-key.pem; repeat for more (default: one "
                        "named node)")
    p.add_argument("--days", type=int, default=365, metavar="N",
                   help="validity of every certificate in days (default %(default)s)")
    p.add_argument("--force", action="store_true",
                   help="replace files already in DIR (certificates signed by the old CA stop working)")
    p.set_defaults(func=_tls_init)
    return parser


def _refused(exc: errors.QScaleError) -> str:
    """What to fix when the coordinator refused this command's credentials, in flags."""
    if isinstance(exc, errors.PermissionDeniedError) and "this is a node token" not in str(exc) \
            and "no role may call" not in str(exc):
        return f"{exc} (a valid API token, without the rights this needs: only an admin's token may see or " \
               "cancel other users' jobs)"
    if isinstance(exc, errors.PermissionDeniedError):
        what = "the coordinator refused this token for client commands (it is not an API token"
        what += ", probably a node's join token)" if "node token" in str(exc) else ")"
    else:
        what = "the coordinator needs an API token and got none it accepts"
    return (f"{what}: give an API token from the coordinator's --client-tokens-file with --token-file FILE, "
            f"$QSCALE_CLIENT_TOKEN or $QSCALE_CLIENT_TOKEN_FILE (coordinator said: {exc})")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``qscale-coordinator``; returns the exit code (see the module's docstring:
    0 ok, 1 job failed or cancelled, 2 bad input, 3 coordinator unavailable, 4 other errors,
    5 credentials refused, 130 interrupted)."""
    args = _parser().parse_args(argv)
    try:
        return int(args.func(args))
    except errors.JobError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_JOB
    except (errors.InvalidArgumentError, errors.NotFoundError, errors.FailedPreconditionError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_INPUT
    except errors.UnavailableError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except (errors.UnauthenticatedError, errors.PermissionDeniedError) as exc:
        print(f"error: {_refused(exc)}", file=sys.stderr)
        return EXIT_AUTH
    except errors.QScaleError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_OTHER
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # the reader went away (``nodes --json | head``): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the exit's flush must not fail again
        return EXIT_PIPE


if __name__ == "__main__":
    sys.exit(main())
