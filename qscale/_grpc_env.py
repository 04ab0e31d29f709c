"""Imported first by the command-line tools (``qscale-coordinator``, ``qscale-node``), for its
effect: gRPC's C core reads ``GRPC_VERBOSITY`` once, when grpc is first imported, and without it
prints its own log lines (TLS handshake failures and the like, which the tools report in their
own words) on stderr. ``ERROR`` keeps only its errors; a value already set wins.

Nothing before this module may import grpc (:mod:`qscale.errors` loads it lazily for that).
"""

from __future__ import annotations

import os

os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
