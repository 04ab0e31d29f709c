"""``qscale-node``: run a node daemon that joins a qscale coordinator.

Settings come from defaults, then ``QSCALE_*`` environment variables, then the flags below
(see :class:`~qscale.node.config.NodeConfig`). SIGTERM and SIGINT drain the node (a second
SIGINT stops it at once).
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from collections.abc import Sequence
from types import FrameType

from qscale._version import __version__
from qscale.errors import FailedPreconditionError, InvalidArgumentError
from qscale.logs import configure_logging
from qscale.node.config import NodeConfig, parse_bytes

__all__ = ["main", "build_parser"]

logger = logging.getLogger(__name__)


def _byte_count(text: str) -> int:
    try:
        return parse_bytes(text)
    except InvalidArgumentError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    """The ``qscale-node`` argument parser."""
    p = argparse.ArgumentParser(
        prog="qscale-node",
        description="Run a qscale node: join a coordinator and simulate the shards it hands out.",
        epilog="Every setting also comes from its QSCALE_* variable (named in each help); flags win. "
        "Secrets never come from flags: $QSCALE_NODE_TOKEN, $QSCALE_NODE_TOKEN_FILE or --token-file.",
    )
    p.add_argument("--coordinator", metavar="HOST:PORT",
                   help="coordinator address (default 127.0.0.1:50051; $QSCALE_COORDINATOR)")
    p.add_argument("--name", help="node name shown by the coordinator (default: the hostname; $QSCALE_NODE_NAME)")
    p.add_argument("--slots", type=int, metavar="N",
                   help="shards run at once, one worker process each (default 1; $QSCALE_NODE_SLOTS)")
    p.add_argument("--cores", type=int, metavar="N",
                   help="CPU cores to use, shared by the slots (default: all; $QSCALE_NODE_CORES)")
    p.add_argument(
        "--memory-budget", type=_byte_count, metavar="BYTES",
        help="memory for simulations, all slots together: bytes or 512M, 4G (default: half the machine's; "
             "$QSCALE_NODE_MEMORY_BUDGET)",
    )
    p.add_argument(
        "--max-qubits", type=int, metavar="N",
        help="widest statevector this node simulates: shards that need a wider one are not sent to it "
             "(statevector and automatic count their qubits, density_matrix twice its qubits; stabilizer, "
             "extended_stabilizer and matrix_product_state are not capped) (default 0: only the memory "
             "budget caps it; $QSCALE_NODE_MAX_QUBITS)",
    )
    p.add_argument("--drain-grace", type=float, metavar="S",
                   help="seconds running shards get on SIGTERM (default 30; $QSCALE_NODE_DRAIN_GRACE)")
    p.add_argument("--parent-pid", type=int, metavar="PID",
                   help="exit when this process is gone ($QSCALE_NODE_PARENT_PID)")
    p.add_argument("--metrics-port", type=int, metavar="PORT",
                   help="serve Prometheus metrics on http://0.0.0.0:PORT/metrics (default 0: off; "
                        "$QSCALE_NODE_METRICS_PORT)")
    p.add_argument("--health-port", type=int, metavar="PORT",
                   help="serve the standard gRPC health service on this port (default 0: off; "
                        "$QSCALE_NODE_HEALTH_PORT)")
    p.add_argument("--log-level", metavar="LEVEL",
                   help="DEBUG, INFO, WARNING or ERROR (default INFO; $QSCALE_LOG_LEVEL)")
    p.add_argument("--log-format", choices=("text", "json"),
                   help="text, or json: one object per line for log shippers (default text; $QSCALE_LOG_FORMAT)")
    p.add_argument("--print-config", action="store_true", help="print the effective configuration as JSON and exit")
    p.add_argument("--token-file", metavar="FILE",
                   help="file holding the join token ($QSCALE_NODE_TOKEN_FILE; or the token itself in "
                        "$QSCALE_NODE_TOKEN)")
    p.add_argument("--tls-ca", metavar="PEM",
                   help="CA that signed the coordinator's certificate; turns on TLS ($QSCALE_TLS_CA)")
    p.add_argument("--tls-cert", metavar="PEM", help="client certificate for a mutual-TLS coordinator ($QSCALE_TLS_CERT)")
    p.add_argument("--tls-key", metavar="PEM", help="private key of --tls-cert ($QSCALE_TLS_KEY)")
    p.add_argument("--version", action="version", version=f"qscale-node {__version__}")
    from qscale.security import refuse_secret_options

    refuse_secret_options(p, "--token", hint="use --token-file FILE, $QSCALE_NODE_TOKEN or $QSCALE_NODE_TOKEN_FILE")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``qscale-node``; returns the exit code (0 after a drain, 1 when no worker
    could start, 2 for a bad setting)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = NodeConfig.from_env(
            coordinator=args.coordinator,
            name=args.name,
            slots=args.slots,
            cores=args.cores,
            memory_budget=args.memory_budget,
            max_qubits=args.max_qubits,
            drain_grace_s=args.drain_grace,
            parent_pid=args.parent_pid,
            log_level=args.log_level,
            log_format=args.log_format,
            metrics_port=args.metrics_port,
            health_port=args.health_port,
            token_file=args.token_file,
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
            tls_ca=args.tls_ca,
        )
    except InvalidArgumentError as exc:
        print(f"qscale-node: error: {exc}", file=sys.stderr)
        return 2
    if args.print_config:
        print(json.dumps(config.to_dict(), indent=2, sort_keys=True))
        return 0
    try:  # read the token and TLS files now: a bad one is a setting error, not a retry loop
        config.resolved_token()
        tls = config.tls_config()
        if tls is not None:
            tls.channel_credentials()
    except (InvalidArgumentError, FailedPreconditionError) as exc:
        print(f"qscale-node: error: {exc}", file=sys.stderr)
        return 2

    try:
        configure_logging(config.log_level, config.log_format)
    except ValueError as exc:
        print(f"qscale-node: error: {exc}", file=sys.stderr)
        return 2
    from qscale.node.daemon import NodeDaemon  # grpc is only needed from here on

    daemon = NodeDaemon(config)
    interrupts = 0

    def on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal interrupts
        if signum == signal.SIGINT:
            interrupts += 1
            if interrupts > 1:
                daemon.stop()
                return
        daemon.request_drain()

    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, on_signal)
    try:
        return daemon.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
