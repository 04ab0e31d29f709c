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

import qscale._grpc_env  # noqa: F401  (first: quiets gRPC's own log lines before grpc loads)
from qscale._version import __version__
from qscale.errors import FailedPreconditionError, InvalidArgumentError
from qscale.logs import configure_logging
from qscale.node.config import NodeConfig
from qscale.settings import add_flags, flag_values

__all__ = ["main", "build_parser"]

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    """The ``qscale-node`` argument parser: a flag for every setting of :class:`NodeConfig`."""
    from qscale.security import refuse_secret_options

    p = argparse.ArgumentParser(
        prog="qscale-node",
        description="Run a qscale node: join a coordinator and simulate the shards it hands out.",
        epilog="Every setting also comes from the QSCALE_* variable named in its help; flags win over variables, "
        "which win over defaults. Secrets never come from flags: $QSCALE_NODE_TOKEN, $QSCALE_NODE_TOKEN_FILE "
        "or --token-file.",
    )
    add_flags(p, NodeConfig)
    p.add_argument("--print-config", action="store_true", help="print the effective configuration as JSON and exit")
    p.add_argument("--version", action="version", version=f"qscale-node {__version__}")
    refuse_secret_options(p, "--token", hint="use --token-file FILE, $QSCALE_NODE_TOKEN or $QSCALE_NODE_TOKEN_FILE")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``qscale-node``; returns the exit code (0 after a drain, 1 when no worker
    could start, 2 for a bad setting, 5 when the coordinator refused the join token). A
    coordinator that cannot be reached is tried again and again, never an exit."""
    args = build_parser().parse_args(argv)
    try:
        config = NodeConfig.from_env(**flag_values(args, NodeConfig))
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
