"""The gRPC servicers. Thin by design: decode the request, hand the event to the
:class:`~qscale.coordinator.scheduler.Scheduler`, have the
:class:`~qscale.coordinator.runtime.Runtime` carry out its decisions, encode the reply. Errors
become gRPC statuses through :mod:`qscale.rpc_status`."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Executor
from typing import Any, TypeVar

import grpc

from qscale.coordinator import views
from qscale.coordinator.config import CoordinatorConfig
from qscale.coordinator.intake import prepare_job
from qscale.coordinator.jobs import Job, state_name
from qscale.coordinator.runtime import Runtime
from qscale.coordinator.users import Identity, Users
from qscale.errors import (FailedPreconditionError, InvalidArgumentError, PermissionDeniedError, QScaleError,
                           UnavailableError)
from qscale.proto.v1 import common_pb2, jobs_pb2, jobs_pb2_grpc, node_pb2, node_pb2_grpc
from qscale.rpc_status import status_for

__all__ = ["NodeServicer", "JobServicer", "add_services", "MALFORMED"]

log = logging.getLogger(__name__)

_F = TypeVar("_F", bound=Callable[..., Any])
_HELLO_TIMEOUT_S = 30.0


class _Malformed:
    """Stands for a request whose bytes did not decode (see :func:`add_services`)."""


MALFORMED = _Malformed()


def _decode_or_mark(deserializer: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def decode(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception:  # any decoding failure is the caller's bytes' fault
            return MALFORMED

    return decode


class _Capture:
    """Collects what a generated ``add_*Servicer_to_server`` registers."""

    def __init__(self) -> None:
        self.services: list[tuple[str, dict[str, grpc.RpcMethodHandler]]] = []

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        pass

    def add_registered_method_handlers(self, service: str, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        self.services.append((service, handlers))


def add_services(server: grpc.aio.Server, *registrations: tuple[Callable[[Any, Any], None], Any]) -> None:
    """Register servicers like the generated ``add_*Servicer_to_server`` functions, but with
    request deserializers that never fail: undecodable bytes reach the handler as
    :data:`MALFORMED` and get INVALID_ARGUMENT, instead of gRPC's own status naming a Python
    exception class (and a logged traceback per call)."""
    for add, servicer in registrations:
        capture = _Capture()
        add(servicer, capture)
        for service, handlers in capture.services:
            safe = {name: handler._replace(request_deserializer=_decode_or_mark(handler.request_deserializer))
                    for name, handler in handlers.items()}
            server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, safe),))
            server.add_registered_method_handlers(service, safe)


def _check_decoded(request: Any) -> None:
    if request is MALFORMED:
        raise InvalidArgumentError("malformed request: its bytes are not a valid message of this method")
_MAX_LIST = 1000


def _unary(method: _F) -> _F:
    """Turn QScaleError (and unexpected errors) raised by a unary handler into a gRPC status."""

    @functools.wraps(method)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            _check_decoded(request)
            return await method(self, request, context)
        except QScaleError as exc:
            await context.abort(*status_for(exc))
        except Exception as exc:
            log.exception("%s failed", method.__name__)
            await context.abort(*status_for(exc))

    return wrapper  # type: ignore[return-value]


def _streaming(method: _F) -> _F:
    """The same for handlers that are async generators."""

    @functools.wraps(method)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        try:
            _check_decoded(request)
            async for item in method(self, request, context):
                yield item
        except QScaleError as exc:
            await context.abort(*status_for(exc))
        except Exception as exc:
            log.exception("%s failed", method.__name__)
            await context.abort(*status_for(exc))

    return wrapper  # type: ignore[return-value]


class NodeServicer(node_pb2_grpc.NodeServiceServicer):
    """Register and the node-initiated Work stream, which also carries the node's heartbeats and
    their replies."""

    def __init__(self, runtime: Runtime, config: CoordinatorConfig, clock: Callable[[], float]) -> None:
        self.runtime = runtime
        self.core = runtime.core
        self.config = config
        self.clock = clock

    @_unary
    async def Register(self, request: node_pb2.RegisterRequest, context: grpc.aio.ServicerContext
                       ) -> node_pb2.RegisterReply:
        node, adopted, decisions = self.core.register(request.capabilities, self.clock(), request.previous_node_id,
                                                      request.attempts_in_hand)
        self.runtime.apply(decisions)
        return node_pb2.RegisterReply(node_id=node.node_id, heartbeat_interval_s=self.config.heartbeat_interval_s,
                                      heartbeat_timeout_s=self.config.heartbeat_timeout_s, adopted_attempts=adopted)

    @_streaming
    async def Work(self, request_iterator: AsyncIterator[node_pb2.NodeMessage], context: grpc.aio.ServicerContext
                   ) -> AsyncIterator[node_pb2.CoordinatorMessage]:
        try:
            first = await asyncio.wait_for(request_iterator.__anext__(), _HELLO_TIMEOUT_S)
        except (StopAsyncIteration, asyncio.TimeoutError):
            raise InvalidArgumentError("a work stream must start with a hello message") from None
        if first is MALFORMED or first.WhichOneof("kind") != "hello":
            raise InvalidArgumentError("a work stream must start with a hello message")
        node_id = first.hello.node_id
        outbox: asyncio.Queue[node_pb2.CoordinatorMessage | None] = asyncio.Queue()
        self.runtime.apply(self.core.attach_stream(node_id, outbox, self.clock()))
        reader = asyncio.ensure_future(self._read(node_id, request_iterator, outbox))
        try:
            while (message := await outbox.get()) is not None:
                yield message
        finally:
            reader.cancel()
            self.runtime.apply(self.core.detach_stream(node_id, outbox, self.clock(), "work stream closed"))

    async def _read(self, node_id: str, requests: AsyncIterator[node_pb2.NodeMessage],
                    outbox: asyncio.Queue[node_pb2.CoordinatorMessage | None]) -> None:
        core, apply, clock = self.core, self.runtime.apply, self.clock
        interval, timeout = self.config.heartbeat_interval_s, self.config.heartbeat_timeout_s
        try:
            async for msg in requests:
                if msg is MALFORMED:
                    log.warning("node %s sent a message that does not decode; closing its stream", node_id)
                    break
                kind = msg.WhichOneof("kind")
                now = clock()
                if kind == "heartbeat":
                    beat = msg.heartbeat
                    known, decisions = core.heartbeat(node_id, now, beat.attempts_in_hand, stream=outbox)
                    apply(decisions)
                    outbox.put_nowait(node_pb2.CoordinatorMessage(heartbeat_reply=node_pb2.HeartbeatReply(
                        sequence=beat.sequence, known=known, heartbeat_interval_s=interval,
                        heartbeat_timeout_s=timeout)))
                elif kind == "chunk":
                    apply(core.chunk_result(node_id, msg.chunk, now))
                elif kind == "done":
                    apply(core.shard_done(node_id, msg.done.attempt_token, now))
                elif kind == "failed":
                    apply(core.shard_failed(node_id, msg.failed.attempt_token, msg.failed.error, msg.failed.refused,
                                            now))
                elif kind == "draining":
                    apply(core.node_draining(node_id, now))
                else:
                    log.warning("node %s sent an unexpected %s message; closing its stream", node_id, kind)
                    break
        except asyncio.CancelledError:
            raise
        except grpc.aio.AioRpcError:
            pass
        except Exception:
            log.exception("error handling a message from node %s; closing its stream", node_id)
        finally:
            outbox.put_nowait(None)


class JobServicer(jobs_pb2_grpc.JobServiceServicer):
    """Submit, inspect, watch and cancel jobs; list nodes and users. Every call acts as the user
    of its token: a user sees and cancels their own jobs, an admin every job."""

    def __init__(self, runtime: Runtime, config: CoordinatorConfig, clock: Callable[[], float],
                 executor: Executor, users: Users) -> None:
        self.runtime = runtime
        self.core = runtime.core
        self.config = config
        self.clock = clock
        self.executor = executor
        self.users = users
        self._stopping = asyncio.Event()

    def _caller(self, context: grpc.aio.ServicerContext) -> Identity:
        return self.users.identify(context.invocation_metadata())

    def _job(self, job_id: str, context: grpc.aio.ServicerContext) -> Job:
        """The job, if the caller may see it (their own, or they are an admin)."""
        job = self.runtime.get_job(job_id)
        who = self._caller(context)
        if not who.admin and job.user != who.user:
            raise PermissionDeniedError(f"job {job.job_id} belongs to another user; only its owner or an admin "
                                        "may read, watch or cancel it")
        return job

    @property
    def draining(self) -> bool:
        """True once :meth:`begin_shutdown` ran."""
        return self._stopping.is_set()

    def begin_shutdown(self) -> None:
        """Refuse new jobs and end every Watch stream with UNAVAILABLE (clients retry)."""
        self._stopping.set()

    @_unary
    async def Submit(self, request: jobs_pb2.SubmitRequest, context: grpc.aio.ServicerContext
                     ) -> jobs_pb2.SubmitReply:
        if self.draining:
            raise UnavailableError("the coordinator is shutting down; submit again when it is back")
        who = self._caller(context)
        priority = request.priority or common_pb2.PRIORITY_NORMAL  # (unspecified: normal)
        if not common_pb2.PRIORITY_LOW <= priority <= common_pb2.PRIORITY_HIGH:
            raise InvalidArgumentError(f"priority must be low, normal or high, got {request.priority}")
        key = request.request_key
        existing = self.runtime.existing_job(key)
        if existing is None:
            self.core.check_jobs_quota(who.user)  # refuse at once, before decoding anything
            loop = asyncio.get_running_loop()
            job = await loop.run_in_executor(self.executor, prepare_job, request, self.config.limits)
            existing = self.runtime.existing_job(key)  # a retry of this request may have won meanwhile
            if existing is None:
                job.request_key = key
                job.user, job.priority = who.user, priority
                job.policy = self.config.policy.with_shots_per_shard(request.shots_per_shard)  # the smaller wins
                plan = self.core.plan(job)
                self.core.admit(job)  # quotas: from here until accepted, the job counts for its user
                try:
                    # The write (JSON, fsync) happens off the event loop: heartbeats are not held up.
                    inserted = await loop.run_in_executor(self.executor, self.runtime.store.insert_job, job)
                except BaseException:
                    self.core.withdraw(job)
                    raise
                if inserted:
                    self.runtime.apply(self.core.accept(job, plan, self.clock()))
                    existing = job
                else:
                    self.core.withdraw(job)
                    existing = self.runtime.existing_job(key)
                    if existing is None:  # pragma: no cover - the key's job vanished
                        raise UnavailableError("could not record the job; submit again")
        if existing.user != who.user:
            raise PermissionDeniedError("this request key names another user's job; use a key of your own")
        return jobs_pb2.SubmitReply(job_id=existing.job_id, seed=existing.seed)

    @_unary
    async def GetJob(self, request: jobs_pb2.JobRef, context: grpc.aio.ServicerContext) -> jobs_pb2.JobStatus:
        return views.job_status(self._job(request.job_id, context))

    @_streaming
    async def Watch(self, request: jobs_pb2.WatchRequest, context: grpc.aio.ServicerContext
                    ) -> AsyncIterator[jobs_pb2.JobProgress]:
        job = self._job(request.job_id, context)
        stopping = asyncio.ensure_future(self._stopping.wait())
        waiter: asyncio.Future[Any] | None = None
        try:
            with self.runtime.events.subscribe(job.job_id) as changed:
                while True:
                    changed.clear()
                    yield views.job_progress(job, request.include_counts, request.max_outcomes)
                    if job.final:
                        return
                    waiter = asyncio.ensure_future(changed.wait())
                    await asyncio.wait({waiter, stopping}, return_when=asyncio.FIRST_COMPLETED)
                    waiter.cancel()
                    waiter = None
                    if stopping.done():
                        raise UnavailableError("the coordinator is shutting down; watch again when it is back")
                    await self._throttle(job, changed)
        finally:  # also when the client hangs up: no task is left pending
            stopping.cancel()
            if waiter is not None:
                waiter.cancel()

    async def _throttle(self, job: Job, changed: asyncio.Event) -> None:
        """Let at least ``watch_min_interval_s`` pass between two updates of a running job, but
        report a job that finishes meanwhile at once."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.watch_min_interval_s
        while not job.final:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            changed.clear()
            try:
                await asyncio.wait_for(changed.wait(), remaining)
            except asyncio.TimeoutError:
                return

    @_unary
    async def GetResult(self, request: jobs_pb2.JobRef, context: grpc.aio.ServicerContext) -> jobs_pb2.JobResult:
        job = self._job(request.job_id, context)
        if not job.final:
            raise FailedPreconditionError(f"job {job.job_id} is {state_name(job.state)}; its result is not ready yet")
        await self.runtime.writer.settled()  # reported final only once its results are on disk
        return views.job_result(job)

    @_unary
    async def Cancel(self, request: jobs_pb2.JobRef, context: grpc.aio.ServicerContext) -> jobs_pb2.JobStatus:
        job = self._job(request.job_id, context)
        self.runtime.apply(self.core.cancel(job, self.clock()))
        return views.job_status(job)

    @_unary
    async def ListJobs(self, request: jobs_pb2.ListJobsRequest, context: grpc.aio.ServicerContext
                       ) -> jobs_pb2.ListJobsReply:
        limit = min(request.limit if request.limit > 0 else 100, _MAX_LIST)
        who = self._caller(context)
        if who.admin:
            user = request.user or None  # every user's jobs, unless one is named
        elif request.user and request.user != who.user:
            raise PermissionDeniedError("only an admin may list another user's jobs")
        else:
            user = who.user
        reply = jobs_pb2.ListJobsReply()
        for row in self.runtime.store.list_jobs(limit, user=user):
            job = self.core.jobs.get(row.job_id)
            reply.jobs.append(views.job_status(job) if job is not None else views.row_status(row))
        return reply

    @_unary
    async def ListNodes(self, request: jobs_pb2.ListNodesRequest, context: grpc.aio.ServicerContext
                        ) -> jobs_pb2.ListNodesReply:
        now = self.clock()
        return jobs_pb2.ListNodesReply(nodes=[views.node_info(n, now) for n in self.core.registry.listed()],
                                       stale_results_dropped=self.core.stale_dropped)

    @_unary
    async def ListUsers(self, request: jobs_pb2.ListUsersRequest, context: grpc.aio.ServicerContext
                        ) -> jobs_pb2.ListUsersReply:
        who = self._caller(context)
        if who.admin:  # every declared user, and any other with jobs or slots now (or before)
            names = sorted({u.name for u in self.users.declared()} | set(self.core.usage))
        else:
            names = [who.user]
        now = self.clock()
        return jobs_pb2.ListUsersReply(users=[
            views.user_info(self.users.get(name), self.core.usage.get(name), self.core.slot_seconds(name, now))
            for name in names])
