"""The qscale error tree.

Every error qscale raises on purpose derives from :class:`QScaleError`; each class carries
the gRPC status code it travels as, and :mod:`qscale.rpc_status` converts in both directions::

    QScaleError
    ├── InvalidArgumentError      INVALID_ARGUMENT     bad circuit, QPY, OpenQASM, shots, ids
    ├── NotFoundError             NOT_FOUND            unknown job
    ├── FailedPreconditionError   FAILED_PRECONDITION  e.g. result of an unfinished job
    │   └── NoCapableNodeError                         no node can hold a circuit
    ├── UnauthenticatedError      UNAUTHENTICATED      missing or wrong credentials
    ├── PermissionDeniedError     PERMISSION_DENIED    credentials of the wrong role
    ├── ResourceExhaustedError    RESOURCE_EXHAUSTED   a size limit was exceeded
    ├── UnavailableError          UNAVAILABLE          coordinator unreachable or draining
    ├── JobError                  (client side)        the job ended without a result
    │   ├── JobFailedError                             a shard failed too often
    │   └── JobCancelledError                          someone cancelled it
    └── JobTimeoutError           DEADLINE_EXCEEDED    waiting for a result timed out

Importing this module does not import gRPC: its C core reads ``GRPC_VERBOSITY`` once, when it
loads, and the command-line tools set that first (see :mod:`qscale.coordinator.cli`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import grpc

__all__ = [
    "QScaleError",
    "InvalidArgumentError",
    "NotFoundError",
    "FailedPreconditionError",
    "NoCapableNodeError",
    "UnauthenticatedError",
    "PermissionDeniedError",
    "ResourceExhaustedError",
    "UnavailableError",
    "JobError",
    "JobFailedError",
    "JobCancelledError",
    "JobTimeoutError",
]


class _StatusCode:
    """A class attribute holding the ``grpc.StatusCode`` of that name, looked up on first use.
    An instance may set its own (``exc.code = ...``)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.attr = "code"

    def __set_name__(self, owner: type, attr: str) -> None:
        self.attr = attr

    def __get__(self, obj: object | None, owner: type | None = None) -> grpc.StatusCode:
        own: grpc.StatusCode | None = vars(obj).get(self.attr) if obj is not None else None
        if own is not None:
            return own
        import grpc

        return grpc.StatusCode[self.name]

    def __set__(self, obj: object, value: grpc.StatusCode) -> None:
        vars(obj)[self.attr] = value


class QScaleError(Exception):
    """Base of every error qscale raises on purpose."""

    code = _StatusCode("INTERNAL")


class InvalidArgumentError(QScaleError, ValueError):
    """The request itself is wrong: a malformed circuit, bad shots, an unknown option."""

    code = _StatusCode("INVALID_ARGUMENT")


class NotFoundError(QScaleError, LookupError):
    """No such job (or node)."""

    code = _StatusCode("NOT_FOUND")


class FailedPreconditionError(QScaleError):
    """The request is well formed but the system is not in a state to serve it."""

    code = _StatusCode("FAILED_PRECONDITION")


class NoCapableNodeError(FailedPreconditionError):
    """No node of the cluster can hold one of the job's circuits."""


class UnauthenticatedError(QScaleError):
    """Missing or invalid credentials."""

    code = _StatusCode("UNAUTHENTICATED")


class PermissionDeniedError(QScaleError):
    """Valid credentials, but not for this call."""

    code = _StatusCode("PERMISSION_DENIED")


class ResourceExhaustedError(QScaleError):
    """A configured size limit was exceeded."""

    code = _StatusCode("RESOURCE_EXHAUSTED")


class UnavailableError(QScaleError, ConnectionError):
    """The coordinator cannot be reached, or is shutting down."""

    code = _StatusCode("UNAVAILABLE")


class JobError(QScaleError):
    """A job ended without a result."""

    def __init__(self, message: str, job_id: str = "") -> None:
        super().__init__(message)
        self.job_id = job_id


class JobFailedError(JobError):
    """A shard of the job failed on too many attempts; the message says which circuit and why."""

    code = _StatusCode("ABORTED")


class JobCancelledError(JobError):
    """The job was cancelled before it finished."""

    code = _StatusCode("CANCELLED")


class JobTimeoutError(QScaleError, TimeoutError):
    """A wait for a job ran out of time; the job itself goes on."""

    code = _StatusCode("DEADLINE_EXCEEDED")
