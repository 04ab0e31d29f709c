"""Every ```python block of the README runs as written, and prints what its comments say.

Each block runs verbatim in a fresh interpreter from the repository root, with no ``QSCALE_*``
variable set and nothing else started (the blocks start their own embedded clusters). A line
``print(...)  # TEXT`` promises that ``TEXT`` is a line of the block's output: those lines must
appear in the output, in order.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"

_BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
_PROMISE = re.compile(r"^\s*print\(.*\)\s+#\s*(?P<text>\S.*?)\s*$")


def python_blocks(text: str) -> list[tuple[int, str]]:
    """The README's python blocks with the line each starts on."""
    return [(text[: m.start()].count("\n") + 1, m.group(1)) for m in _BLOCK.finditer(text)]


def promised_lines(code: str) -> list[str]:
    """The outputs a block's ``print(...)  # TEXT`` comments promise."""
    return [m.group("text") for line in code.splitlines() if (m := _PROMISE.match(line))]


def _unfulfilled(promises: list[str], output: str) -> list[str]:
    """The promised lines not found in ``output``, in order."""
    lines = [line.strip() for line in output.splitlines()]
    missing, at = [], 0
    for promise in promises:
        try:
            at = lines.index(promise, at) + 1
        except ValueError:
            missing.append(promise)
    return missing


def test_promises_are_checked_in_order() -> None:
    """The checker itself: a wrong or reordered output is caught."""
    assert promised_lines("x = 1\nprint(x)   # 1\nprint(x)\n") == ["1"]
    assert _unfulfilled(["1", "2"], "1\n2\n") == []
    assert _unfulfilled(["1", "2"], "2\n1\n") == ["2"]
    assert _unfulfilled(["{'0': 3}"], "{'0': 4}\n") == ["{'0': 3}"]


BLOCKS = python_blocks(README.read_text(encoding="utf-8"))


def test_readme_has_python_blocks() -> None:
    assert len(BLOCKS) >= 3


@pytest.mark.timeout(400)
@pytest.mark.parametrize("line, code", BLOCKS, ids=[f"README.md:{line}" for line, _ in BLOCKS])
def test_readme_block_runs(line: int, code: str, tmp_path: Path) -> None:
    script = tmp_path / "block.py"
    script.write_text(code, encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith("QSCALE_")}
    env["PYTHONUNBUFFERED"] = "1"
    proc = subprocess.Popen([sys.executable, str(script)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=360)
    except subprocess.TimeoutExpired:
        output = ""
        pytest.fail(f"the block at README.md:{line} did not finish within 360 s")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
        else:  # whatever the block started and left behind
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert proc.returncode == 0, f"the block at README.md:{line} failed:\n{output[-4000:]}"
    missing = _unfulfilled(promised_lines(code), output)
    assert not missing, f"README.md:{line}: these commented outputs were not printed: {missing}\n{output[-4000:]}"
