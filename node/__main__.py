"""``python -m qscale.node``: the same as ``qscale-node``."""

from __future__ import annotations

import sys

from qscale.node.cli import main

if __name__ == "__main__":
    sys.exit(main())
