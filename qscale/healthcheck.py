"""``qscale-healthcheck``: probe a qscale coordinator (or a node's health port) through the
standard gRPC health service (``grpc.health.v1``).

    qscale-healthcheck [HOST:PORT] [--service NAME] [--timeout SECONDS]
                       [--tls-ca PEM [--tls-cert PEM --tls-key PEM] [--server-name NAME]]

Exit status 0 when the service answers SERVING, 1 otherwise (NOT_SERVING while it shuts down,
unreachable, timed out, a TLS error, an unreadable PEM file), 2 for bad arguments. The health
service needs no token: the coordinator leaves it open for probes. It is a console script of
the package, so it is on ``PATH`` wherever qscale is installed (the container image included):
the compose healthcheck runs it, and it serves as a Kubernetes ``exec`` probe where the native
``grpc`` probe cannot be used (that one speaks plaintext only, so not against a TLS coordinator).

The coordinator reports ``""`` (the whole server), ``qscale.v1.JobService`` and
``qscale.v1.NodeService`` on its gRPC port. A node started with ``--health-port PORT``
reports ``""`` while it runs and ``qscale.node`` while it is connected to its coordinator, in
plaintext on that port.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import qscale._grpc_env  # noqa: F401  (first: quiets gRPC's own log lines before grpc loads)

__all__ = ["main", "DEFAULT_ADDRESS"]

DEFAULT_ADDRESS = "127.0.0.1:50051"


def _read(path: str | None) -> bytes | None:
    if path is None:
        return None
    with open(path, "rb") as fh:
        return fh.read()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qscale-healthcheck",
        description="Probe a qscale coordinator (or a node's --health-port) through the standard gRPC health "
                    "service: exit 0 when it answers SERVING, 1 otherwise.")
    parser.add_argument("address", nargs="?", default=DEFAULT_ADDRESS,
                        help=f"HOST:PORT of the coordinator, or of a node's --health-port (default {DEFAULT_ADDRESS})")
    parser.add_argument("--service", default="",
                        help='health service name: "" (default, the whole server), qscale.v1.JobService or '
                             "qscale.v1.NodeService on a coordinator, qscale.node on a node (SERVING while it is "
                             "connected to its coordinator)")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the answer (default 3)")
    parser.add_argument("--tls-ca", metavar="PEM", help="CA of the coordinator's certificate: probe over TLS")
    parser.add_argument("--tls-cert", metavar="PEM", help="client certificate, for a mutual-TLS coordinator")
    parser.add_argument("--tls-key", metavar="PEM", help="key of --tls-cert")
    parser.add_argument("--server-name", metavar="NAME",
                        help="name to expect in the coordinator's certificate when it differs from the address "
                             "(probing 127.0.0.1 with a certificate for coordinator.example)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``qscale-healthcheck``; returns the exit status (0 SERVING, 1 not, 2 bad
    arguments)."""
    parser = _parser()
    args = parser.parse_args(argv)
    if (args.tls_cert is None) != (args.tls_key is None):
        parser.error("--tls-cert and --tls-key go together")
    if not args.timeout > 0:
        parser.error("--timeout must be a positive number of seconds")

    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    options = [("grpc.ssl_target_name_override", args.server_name)] if args.server_name else []
    try:
        if args.tls_ca or args.tls_cert:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=_read(args.tls_ca), private_key=_read(args.tls_key),
                certificate_chain=_read(args.tls_cert))
            channel = grpc.secure_channel(args.address, credentials, options=options)
        else:
            channel = grpc.insecure_channel(args.address, options=options)
    except OSError as exc:
        print(f"qscale-healthcheck: {exc}", file=sys.stderr)
        return 1
    with channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout)
        except grpc.RpcError as exc:
            code = exc.code() if isinstance(exc, grpc.Call) else None
            details = exc.details() if isinstance(exc, grpc.Call) else str(exc)
            print(f"qscale-healthcheck: {args.address}: {code.name if code else 'ERROR'}: {details}", file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        print(f"qscale-healthcheck: {args.address} {args.service or '(server)'}: {status}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
