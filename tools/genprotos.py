"""Generate the Python code of protos/*.proto, or check that it is current.

The .proto files sit in protos/ but are compiled as hostmaint/protos/*.proto
so the generated modules import each other as `hostmaint.protos.x_pb2`.

    python tools/genprotos.py          # regenerate in place
    python tools/genprotos.py --check  # exit 1 when the checked-in code drifts
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc  # type: ignore[import-untyped]

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")


def generate(out_dir: Path) -> list[Path]:
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "src"
        (src / "hostmaint").mkdir(parents=True)
        shutil.copytree(
            PROTOS, src / "hostmaint" / "protos", ignore=shutil.ignore_patterns("*.py*")
        )
        out = Path(tmp) / "out"
        out.mkdir()
        protos = sorted(f"hostmaint/protos/{p.name}" for p in PROTOS.glob("*.proto"))
        include = str(Path(protoc.__file__).parent / "_proto")
        bindir = Path(sys.executable).parent
        args = [
            "protoc",
            f"--plugin=protoc-gen-mypy={bindir / 'protoc-gen-mypy'}",
            f"--plugin=protoc-gen-mypy_grpc={bindir / 'protoc-gen-mypy_grpc'}",
            f"-I{src}",
            f"-I{include}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            f"--mypy_out={out}",
            f"--mypy_grpc_out={out}",
            *protos,
        ]
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed")
        written = []
        for f in sorted((out / "hostmaint" / "protos").iterdir()):
            if f.name.endswith(GENERATED_SUFFIXES):
                shutil.copy(f, out_dir / f.name)
                written.append(out_dir / f.name)
        return written


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail when the generated code drifts")
    args = parser.parse_args()
    if not args.check:
        for stale in PROTOS.iterdir():
            if stale.name.endswith(GENERATED_SUFFIXES):
                stale.unlink()
        for f in generate(PROTOS):
            print(f"wrote {f.relative_to(ROOT)}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        fresh = {f.name for f in generate(Path(tmp))}
        current = {f.name for f in PROTOS.iterdir() if f.name.endswith(GENERATED_SUFFIXES)}
        drift = sorted(fresh ^ current)
        drift += [
            n
            for n in sorted(fresh & current)
            if not filecmp.cmp(Path(tmp) / n, PROTOS / n, shallow=False)
        ]
    if drift:
        print("generated code is out of date; run `tox -e protos`: " + ", ".join(drift))
        return 1
    print("generated code matches protos/*.proto")
    return 0


if __name__ == "__main__":
    sys.exit(main())
