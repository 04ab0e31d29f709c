"""The checked-in generated code must match protos/*.proto."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_generated_code_matches_protos() -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "protos" / "generate.py"), "--check"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
