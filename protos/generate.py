"""Regenerate the checked-in protobuf/gRPC code from ``protos/qscale/proto/v1/*.proto``.

Usage::

    python protos/generate.py            # rewrite qscale/proto/v1/*_pb2*.py{,i}
    python protos/generate.py --check    # exit 1 if the checked-in code is stale

Needs ``grpcio-tools`` (the ``dev`` extra); ``pip install .`` does not, because the
output is committed.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
PROTO_DIR = PROTO_ROOT / "qscale" / "proto" / "v1"
OUT_DIR = ROOT / "qscale" / "proto" / "v1"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def generate(out_root: Path) -> list[Path]:
    """Run protoc over every .proto file, writing under ``out_root``; return the files written."""
    from grpc_tools import protoc  # imported late: only this script needs grpcio-tools

    protos = sorted(PROTO_DIR.glob("*.proto"))
    include = Path(protoc.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        *[str(p) for p in protos],
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    out = out_root / "qscale" / "proto" / "v1"
    return sorted(p for p in out.iterdir() if p.name.endswith(GENERATED_SUFFIXES))


def stale_files() -> list[str]:
    """Names of generated files that differ from (or are missing in) the checked-in tree."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = {p.name: p for p in generate(Path(tmp))}
        checked_in = {p.name for p in OUT_DIR.iterdir() if p.name.endswith(GENERATED_SUFFIXES)}
        stale = [n for n, p in fresh.items() if n not in checked_in or not filecmp.cmp(p, OUT_DIR / n, shallow=False)]
        stale += sorted(checked_in - fresh.keys())
        return sorted(stale)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only report whether the checked-in code is stale")
    args = parser.parse_args()
    if args.check:
        stale = stale_files()
        if stale:
            print("stale generated files (run python protos/generate.py):", ", ".join(stale))
            return 1
        print("generated code is up to date")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        files = generate(Path(tmp))
        OUT_DIR.mkdir(parents=True, exist_ok=True)
        for p in files:
            shutil.copyfile(p, OUT_DIR / p.name)
    (OUT_DIR / "__init__.py").touch()
    (OUT_DIR.parent / "__init__.py").touch()
    print(f"wrote {len(files)} files to {OUT_DIR.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
