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
from qscale.rpc import transport_hint

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


# The exact error class travels in trailing metadata, so a client can raise e.g.
# NoCapableNodeError rather than only its status-code class.
ERROR_KEY = "qscale-error"
_BY_NAME: dict[str, type[errors.QScaleError]] = {
    name: cls
    for name in errors.__all__
    if isinstance(cls := getattr(errors, name), type) and issubclass(cls, errors.QScaleError)
}


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str, tuple[tuple[str, str], ...]]:
    """Status code, client-facing message and trailing metadata for an exception raised while
    serving (``context.abort(*status_for(exc))``). Unexpected exceptions never leak details."""
    if isinstance(exc, errors.QScaleError):
        return exc.code, str(exc), ((ERROR_KEY, type(exc).__name__),)
    return grpc.StatusCode.INTERNAL, "internal error in the coordinator; see its log", ()


def error_from_rpc(err: grpc.RpcError, *, tls: bool | None = None, client_cert: bool = False
                   ) -> errors.QScaleError:
    """The :class:`~qscale.errors.QScaleError` for a failed call.

    Args:
        err: what the call raised.
        tls: whether the channel used TLS; when known (not None), an ``UNAVAILABLE`` error that
            the TLS settings explain (:func:`qscale.rpc.transport_hint`) says what to change.
        client_cert: whether the channel presented a client certificate.
    """
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    details = (err.details() if hasattr(err, "details") else None) or str(code)
    if code == grpc.StatusCode.UNAVAILABLE:
        hint = transport_hint(details, tls=tls, client_cert=client_cert) if tls is not None else None
        details = f"coordinator unavailable: {hint} (gRPC: {details})" if hint else f"coordinator unavailable: {details}"
    cls = _BY_CODE.get(code, errors.QScaleError)
    trailing = err.trailing_metadata() if hasattr(err, "trailing_metadata") else None
    for key, value in trailing or ():
        named = _BY_NAME.get(value) if key == ERROR_KEY else None
        if named is not None and named.code == code:
            cls = named
    exc = cls(details)
    exc.code = code
    return exc


@contextlib.contextmanager
def translate_rpc_errors(*, tls: bool | None = None, client_cert: bool = False) -> Iterator[None]:
    """Re-raise any ``grpc.RpcError`` in the block as a :class:`~qscale.errors.QScaleError`
    (see :func:`error_from_rpc` for the arguments)."""
    try:
        yield
    except grpc.RpcError as err:
        raise error_from_rpc(err, tls=tls, client_cert=client_cert) from err
