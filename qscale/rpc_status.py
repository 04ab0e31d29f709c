"""The one place where qscale errors and gRPC status codes are translated.

Servers call :func:`abort_with` (or :func:`status_for`) on a :class:`~qscale.errors.QScaleError`;
clients wrap every RPC in :func:`translate_rpc_errors`, which turns a ``grpc.RpcError`` into the
matching :class:`~qscale.errors.QScaleError` with ``raise ... from``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import grpc

from qscale import errors

_BY_CODE: dict[grpc.StatusCode, type[errors.QScaleError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: errors.InvalidArgumentError,
    grpc.StatusCode.NOT_FOUND: errors.NotFoundError,
    grpc.StatusCode.FAILED_PRECONDITION: errors.FailedPreconditionError,
    grpc.StatusCode.UNAUTHENTICATED: errors.UnauthenticatedError,
    grpc.StatusCode.PERMISSION_DENIED: errors.PermissionDeniedError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: errors.ResourceExhaustedError,
    grpc.StatusCode.UNAVAILABLE: errors.UnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: errors.JobTimeoutError,
}


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and client-facing message for an exception raised while serving."""
    if isinstance(exc, errors.QScaleError):
        return exc.code, str(exc)
    return grpc.StatusCode.INTERNAL, "internal error in the coordinator; see its log"


def error_from_rpc(err: grpc.RpcError) -> errors.QScaleError:
    """The :class:`~qscale.errors.QScaleError` for a failed call."""
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    details = (err.details() if hasattr(err, "details") else None) or str(code)
    if code == grpc.StatusCode.UNAVAILABLE:
        details = f"coordinator unavailable: {details}"
    cls = _BY_CODE.get(code, errors.QScaleError)
    exc = cls(details)
    exc.code = code
    return exc


@contextlib.contextmanager
def translate_rpc_errors() -> Iterator[None]:
    """Re-raise any ``grpc.RpcError`` in the block as a :class:`~qscale.errors.QScaleError`."""
    try:
        yield
    except grpc.RpcError as err:
        raise error_from_rpc(err) from err
