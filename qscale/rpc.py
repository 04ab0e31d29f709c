"""How clients and nodes reach the coordinator: connect timeout, retries and reconnection.

Every channel comes from :func:`qscale.security.make_channel`, which takes its options from
:func:`channel_options`; nothing else in qscale sleeps and tries a call again. The policy:

- **Connect timeout** (:data:`DEFAULT_CONNECT_TIMEOUT_S`, 5 s; clients: ``connect_timeout=``,
  ``--connect-timeout``, ``$QSCALE_CONNECT_TIMEOUT``): a connection attempt that gets no answer
  (no TCP handshake, or no HTTP/2 settings from the other end: packets dropped, a firewall, a
  port that is not gRPC) is given up after that long, and the calls waiting on it fail with
  ``UNAVAILABLE``. This is gRPC's ``grpc.min_reconnect_backoff_ms``, which despite its name is
  its minimum connect timeout (20 s unless set; see ``ParseArgsForBackoffValues`` in gRPC's
  ``subchannel.cc``). A refused connection fails at once.
- **Retries** (:data:`RETRY_POLICY`): calls that are safe to repeat (every JobService call:
  reads, ``Watch``, ``Cancel``, and ``Submit``, whose request key makes a repeat return the same
  job; ``NodeService.Register``) are retried by gRPC itself, on ``UNAVAILABLE`` only: 4 attempts,
  0.1, 0.2 and 0.4 s apart (gRPC adds 20 % jitter), so a refused port fails in under a second
  and a blip (a connection reset, a coordinator handing over) goes unnoticed. Nothing else is
  retried: a refused token or a bad request fails at once. Riding through a restart is left to
  reconnection, below.
- **Reconnection**: the channel reconnects on its own, with gRPC's exponential backoff between
  attempts (``grpc.initial_reconnect_backoff_ms`` to ``grpc.max_reconnect_backoff_ms``: 0.25 s to
  2 s for clients, the node's ``reconnect_min_s``/``reconnect_max_s`` for nodes). Code that
  must outlive a coordinator restart (:meth:`qscale.Job.wait`, :func:`qscale.progress.follow`)
  calls again with ``wait_for_ready=True``: the call then waits, up to its own deadline, until
  that reconnection succeeds. A client's unary calls wait for the channel to be ready for up to
  the connect timeout (``Client._await_ready``): a restart within it goes unnoticed, while a
  client that has never reached the coordinator fails at the first refused connection.

:func:`transport_hint` explains the connection errors that come from settings rather than
from a coordinator that is down: TLS on one side only, an untrusted certificate, a missing
client certificate.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any


__all__ = [
    "CLIENT_RECONNECT_BACKOFF_S",
    "DEFAULT_CONNECT_TIMEOUT_S",
    "RETRIED_METHODS",
    "RETRY_POLICY",
    "channel_options",
    "service_config",
    "transport_hint",
]

#: Seconds to wait for a coordinator that does not answer at all.
DEFAULT_CONNECT_TIMEOUT_S = 5.0

#: gRPC retry policy (gRFC A6) for :data:`RETRIED_METHODS`. gRPC caps ``maxAttempts`` at 5.
RETRY_POLICY: Mapping[str, Any] = {
    "maxAttempts": 4,
    "initialBackoff": "0.1s",
    "maxBackoff": "1s",
    "backoffMultiplier": 2,
    "retryableStatusCodes": ["UNAVAILABLE"],
}

#: Methods that may be sent again after ``UNAVAILABLE``, per service. ``Submit`` carries a
#: request key (the coordinator answers a repeat with the job it already made); ``Cancel`` of
#: a cancelled job changes nothing; ``Register`` of a node whose reply was lost leaves a node
#: entry that expires. The node's ``Work`` stream is not retried here: the node opens a new
#: session instead.
RETRIED_METHODS: Mapping[str, tuple[str, ...]] = {
    "qscale.v1.JobService": ("Submit", "GetJob", "Watch", "GetResult", "Cancel", "ListJobs", "ListNodes",
                             "ListUsers"),
    "qscale.v1.NodeService": ("Register",),
}

#: A client's first and longest delay between connection attempts, in seconds.
CLIENT_RECONNECT_BACKOFF_S = (0.25, 2.0)


def service_config(methods: Mapping[str, Sequence[str]] = RETRIED_METHODS,
                   policy: Mapping[str, Any] = RETRY_POLICY) -> str:
    """The gRPC service config (JSON) that retries ``methods`` with ``policy``."""
    names = [{"service": service, "method": method} for service, names in methods.items() for method in names]
    return json.dumps({"methodConfig": [{"name": names, "retryPolicy": dict(policy)}]})


def channel_options(connect_timeout: float = DEFAULT_CONNECT_TIMEOUT_S, *,
                    reconnect_backoff_s: tuple[float, float] = CLIENT_RECONNECT_BACKOFF_S) -> list[tuple[str, Any]]:
    """Channel options for the policy above: retries, the connect timeout (seconds) and the
    reconnect backoff (first and longest delay between connection attempts, in seconds; gRPC
    multiplies the delay by 1.6 after each failed attempt, with 20 % jitter, and waits at least
    0.1 s)."""
    first, longest = (max(100, int(seconds * 1000)) for seconds in reconnect_backoff_s)
    return [
        ("grpc.enable_retries", 1),
        ("grpc.service_config", service_config()),
        ("grpc.service_config_disable_resolution", 1),  # ours, not one a DNS TXT record names
        ("grpc.min_reconnect_backoff_ms", max(100, int(connect_timeout * 1000))),  # the connect timeout
        ("grpc.initial_reconnect_backoff_ms", first),
        ("grpc.max_reconnect_backoff_ms", max(first, longest)),
    ]


# ------------------------------------------------------------------- hints

def transport_hint(details: str, *, tls: bool, client_cert: bool = False, python: bool = True) -> str | None:
    """What to do when a connection failed with ``details`` (gRPC's status details): nothing
    answered within the connect timeout, or the TLS settings do not match the coordinator's;
    None when the details point at neither (a refused connection says enough).

    Args:
        details: the failed call's details (gRPC puts the last connection error there).
        tls: whether the caller connected with TLS.
        client_cert: whether it presented a client certificate.
        python: also name the Python API's arguments, not only the flags and variables.
    """
    tls_settings = "--tls-ca PEM or $QSCALE_TLS_CA" + ("; in Python, tls=TLSConfig(ca=...)" if python else "")
    cert_settings = "--tls-cert PEM --tls-key PEM or $QSCALE_TLS_CERT and $QSCALE_TLS_KEY" + (
        "; in Python, tls=TLSConfig(cert=..., key=..., ca=...)" if python else "")
    text = details.lower()
    if "before receiving settings" in text or "handshaker shutdown" in text or "timed out" in text:
        wait = "--connect-timeout SECONDS or $QSCALE_CONNECT_TIMEOUT to wait longer" + (
            "; in Python, Client(connect_timeout=...)" if python else "")
        return ("nothing answered within the connect timeout: check the address, and that the coordinator runs "
                "and can be reached from here" + (f" ({wait})" if python else ""))
    closed = any(s in text for s in ("socket closed", "connection reset", "end of tcp stream"))
    if not tls:
        if closed or "tls" in text or "ssl" in text:
            return ("the coordinator probably speaks TLS and this connection is plain: give the CA that signed "
                    f"its certificate ({tls_settings})")
        return None
    if "wrong_version_number" in text or "http_request" in text or "packet_length_too_long" in text:
        return ("the coordinator probably does not speak TLS and this connection does: leave out --tls-ca, "
                "--tls-cert and --tls-key (and $QSCALE_TLS_CA, $QSCALE_TLS_CERT, $QSCALE_TLS_KEY), or serve TLS "
                "on the coordinator")
    if "certificate_verify_failed" in text or "unable to get local issuer" in text or "self signed" in text \
            or "self-signed" in text:
        return ("the coordinator's certificate is not signed by the CA this connection trusts: give the CA that "
                f"signed it ({tls_settings})")
    if "peer name" in text or "hostname" in text or "subject alternative name" in text:
        return ("the coordinator's certificate does not name the host dialled: dial a name it holds, or give "
                "it a certificate for this name (qscale-coordinator tls-init --host NAME)")
    if closed or "certificate" in text or "alert" in text:
        if client_cert:
            return ("the coordinator closed the TLS connection: it probably does not accept this client "
                    f"certificate; present one signed by its CA ({cert_settings})")
        return ("the coordinator closed the TLS connection: it probably requires a client certificate "
                f"(mutual TLS); present one signed by its CA ({cert_settings})")
    return None
