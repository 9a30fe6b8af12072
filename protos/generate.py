"""Generates the Python protobuf and gRPC modules from the .proto files beside this script.

    python protos/generate.py            # writes clients/proto/*_pb2*.py
    python protos/generate.py --check    # exits 1 when the committed modules differ
"""

import argparse
import filecmp
import pathlib
import shutil
import sys
import tempfile

from grpc_tools import protoc

PROTO_ROOT = pathlib.Path(__file__).resolve().parent
OUT_DIR = PROTO_ROOT.parent / "clients" / "proto"
PACKAGE = ("loraplex", "v1")


def generate(out_root: pathlib.Path) -> list[pathlib.Path]:
    """Runs protoc over every .proto under protos/loraplex into out_root; returns the generated files."""
    # only our API: grpc/health/v1 is here for other languages; Python has it from grpcio-health-checking
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in (PROTO_ROOT / "loraplex").rglob("*.proto"))
    include = pathlib.Path(protoc.__file__).parent / "_proto"
    args = ["protoc", f"-I{PROTO_ROOT}", f"-I{include}", f"--python_out={out_root}",
            f"--pyi_out={out_root}", f"--grpc_python_out={out_root}", *protos]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    return sorted(out_root.joinpath(*PACKAGE).glob("*_pb2*.py*"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="compare with the committed modules, write nothing")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(pathlib.Path(tmp))
        committed = sorted(OUT_DIR.glob("*_pb2*.py*"))
        if args.check:
            stale = [p.name for p in fresh if not (OUT_DIR / p.name).exists()
                     or not filecmp.cmp(p, OUT_DIR / p.name, shallow=False)]
            extra = sorted({p.name for p in committed} - {p.name for p in fresh})
            if stale or extra:
                print(f"generated modules are out of date: {stale + extra}; run python protos/generate.py")
                return 1
            print(f"generated modules match the protos ({len(fresh)} files)")
            return 0
        for old in committed:
            old.unlink()
        for new in fresh:
            shutil.copy(new, OUT_DIR / new.name)
        print(f"wrote {len(fresh)} files to {OUT_DIR}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
